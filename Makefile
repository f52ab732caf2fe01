# The README's commands. Each target creates (or reuses) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser run test test-fast lint format bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed

# The browser test drives Debian's Chromium through its ChromeDriver: install them if missing (root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_BROWSER := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(APT_BROWSER) || { $(SUDO) apt-get update && $(APT_BROWSER); }; }

run: install  ## set up, then run the main job: `python main.py` (a fresh run: earlier checkpoints in ./ckpt go)
	$(BIN)/python main.py --overwrite

test: install browser lint  ## set up, then run every test (slow, distributed and browser ones included) and the linter
	$(BIN)/python -m pytest

test-fast: install  ## the quick tests only (no `slow` or `distributed` marker), for the edit-test loop
	$(BIN)/python -m pytest -m "not slow and not distributed and not browser"

bench: install  ## the benchmark scripts (they print figures beside a reference; no assertions)
	$(BIN)/python bench/prepare_throughput.py
	$(BIN)/python bench/generate_speed.py
	$(BIN)/python bench/serve_load.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
