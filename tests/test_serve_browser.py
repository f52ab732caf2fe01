"""The web page of `gpt2scratch serve`, end to end in headless Chromium (Debian's chromium + chromium-driver,
which `make browser` installs; `make test` does it first): type a prompt, set the controls, click Generate, and
watch the completion stream in. Fails, with the command to run, if Chromium is not installed."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from conftest import write_model
from gpt2scratch.testing import ServerProcess

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_model(tmp_path_factory.mktemp("browser") / "page-model", context_length=512, emb_dim=64)
    process = ServerProcess(model, "--model-name", "page-model", "--api-key", "k3y")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail(
            "Chromium and ChromeDriver are not installed: run `make browser` (apt-get install chromium "
            "chromium-driver), or `make test`, which does it"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root in a container, with no network: no sandbox, no GPU, no background connections
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def set_value(driver, element_id: str, value) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_streams_a_completion(server, browser):
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    expected = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 300, "temperature": 0},
        headers={"Authorization": "Bearer k3y"},
        timeout=120,
    ).json()["choices"][0]["text"]

    browser.get(server.url + "/")
    assert browser.find_element("id", "model-name").text == "page-model"
    assert browser.find_element("id", "context").text == "512"
    set_value(browser, "prompt", prompt)
    set_value(browser, "max-tokens", 300)
    set_value(browser, "temperature", 0)
    set_value(browser, "top-k", 0)
    set_value(browser, "top-p", 1)
    set_value(browser, "api-key", "k3y")
    browser.find_element("id", "generate").click()

    status = browser.find_element("id", "status")
    completion = browser.find_element("id", "completion")
    # While it streams, part of the text is already on the page and the Stop button is live.
    partial = wait_for(
        lambda: status.get_attribute("data-state") == "streaming" and completion.text, what="the first tokens"
    )
    assert expected.startswith(partial.rstrip()[:20])
    wait_for(lambda: status.get_attribute("data-state") in ("done", "error"), what="the end of the stream")
    assert status.get_attribute("data-state") == "done", browser.find_element("id", "error").text
    assert browser.execute_script("return document.getElementById('completion').textContent") == expected
    chunks = int(browser.find_element("id", "output").get_attribute("data-chunks"))
    assert chunks > 10  # it arrived piece by piece
    assert "tokens/s" in status.text

    # nothing was fetched from anywhere but this server
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(server.url) for url in urls), urls


def test_page_shows_a_request_error(server, browser):
    browser.get(server.url + "/")
    set_value(browser, "api-key", "k3y")
    set_value(browser, "max-tokens", 5000)  # beyond the context
    browser.find_element("id", "generate").click()
    status = browser.find_element("id", "status")
    wait_for(lambda: status.get_attribute("data-state") == "error", what="the error")
    assert "maximum context length" in browser.find_element("id", "error").text
