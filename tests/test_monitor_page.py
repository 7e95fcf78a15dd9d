"""The monitor page at `/`, in real headless Chromium against a real server (transformers engine, 1 CPU worker).

Chromium is Debian's (`make test` installs it as root, through the Makefile's `browser` target) driven by its
chromedriver through selenium. The test checks the page loads from this server alone, draws its charts, reports
"no GPU" on a machine without one, and that its series move while requests run: generated tokens/s is all 0 before
and has a value > 0 after. It leaves a screenshot at `artifacts/monitor-page.png`. A missing Chromium fails it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "artifacts" / "monitor-page.png"
# What Chromium needs on a headless, closed-network machine (run as root: no sandbox).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
]
PAGE_CHARTS = ["chart-tokens", "chart-latency", "chart-requests"]


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "1")
    server.wait_until_ready(workers=1)
    return server


@contextmanager
def chromium(profile_dir: Path):
    """Headless Chromium driven by chromedriver; a missing browser fails the test (`make test` installs it)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    assert not missing, (
        f"{', '.join(missing)} missing: run `make system-tools` as root, "
        "or `sudo apt-get install chromium chromium-driver`"
    )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile_dir / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


def wait_for(browser, script: str, timeout_s: float, what: str):
    """Run `script` (returning a value) in the page until the value is truthy; return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = browser.execute_script(
                "return {polls: monitor.polls, errors: monitor.errors, lastError: monitor.lastError,"
                " series: monitor.series}"
            )
            raise AssertionError(f"timed out waiting for {what}; page state: {state}")
        time.sleep(0.25)


def series(browser, name: str) -> list:
    return browser.execute_script(f"return window.monitor.series[{name!r}].slice()")


def canvas_image(browser, chart_id: str) -> str:
    return browser.execute_script(f"return document.querySelector('#{chart_id} canvas').toDataURL()")


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_monitor_page_draws_live_metrics(server, tmp_path):
    with chromium(tmp_path) as browser:
        check_monitor_page(server, browser)


def check_monitor_page(server, browser) -> None:
    errors: list[dict] = []
    browser.get(f"{server.url}/")
    assert browser.title == "LLM server monitor"
    # Three polls: a baseline and two intervals, all without generation.
    wait_for(browser, "return window.monitor && window.monitor.series.time.length >= 3", 30, "three polls")

    for chart in PAGE_CHARTS:
        assert browser.execute_script(f"return document.querySelectorAll('#{chart} canvas').length") == 1, chart
    assert browser.execute_script("return window.monitor.errors") == 0
    if not browser.execute_script("return window.monitor.gpus.length"):
        # This server runs on CPU: the GPU panel says so instead of drawing an empty chart.
        assert browser.find_element("id", "gpu-none").is_displayed()
        assert browser.find_element("id", "gpu-none").text == "no GPU"
        assert not browser.find_element("id", "gpu-body").is_displayed()
    # Everything the page loaded came from this server: no fetch from the network.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(server.url + "/") for url in resources), resources

    assert all(value == 0 for value in series(browser, "generatedTokensPerS"))
    # The page's own polling of /metrics is not counted as requests.
    assert series(browser, "requestsPerS")[-1] == 0
    tokens_chart_idle = canvas_image(browser, "chart-tokens")
    errors += console_errors(browser)

    failures: list[BaseException] = []

    def load() -> None:
        try:
            for round_ in range(2):
                server.infer([f"Tell me a story about ship {round_}.", "List ten fruits:"], temperature=0,
                             max_tokens=24, ignore_eos=True)
                response = requests.post(
                    f"{server.url}/v1/completions", timeout=300,
                    json={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 16,
                          "temperature": 0, "ignore_eos": True},
                )
                assert response.status_code == 200, response.text
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            failures.append(error)

    started = time.monotonic()
    client = threading.Thread(target=load, name="monitor-load", daemon=True)
    client.start()
    wait_for(browser, "return window.monitor.series.generatedTokensPerS.some(v => v > 0)", 120,
             "generated tokens/s > 0")
    seen_while_running = time.monotonic() - started
    client.join(timeout=300)
    assert not client.is_alive(), "the requests did not finish"
    assert not failures, failures
    # Two more polls, so the last requests' latencies are in.
    polls = browser.execute_script("return window.monitor.polls")
    wait_for(browser, f"return window.monitor.polls >= {polls + 2}", 10, "two more polls")

    assert max(series(browser, "generatedTokensPerS")) > 0
    assert max(series(browser, "promptTokensPerS")) > 0
    assert max(series(browser, "requestsPerS")) > 0
    assert max(series(browser, "running")) >= 1
    ttft = [value for value in series(browser, "timeToFirstTokenS") if value is not None]
    durations = [value for value in series(browser, "requestDurationS") if value is not None]
    assert ttft and all(value > 0 for value in ttft)
    assert durations and max(durations) > 0
    assert canvas_image(browser, "chart-tokens") != tokens_chart_idle, "the tokens chart was not redrawn"
    # The tiles show numbers, not dashes.
    assert browser.execute_script("return document.querySelector('[data-latest=workersReady]').textContent") == "1"
    # The worker has its own engine: no shared vLLM engine core (ops/slice_engines.py)
    assert browser.execute_script("return document.querySelector('[data-latest=sharedCores]').textContent") == "none"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    errors += console_errors(browser)
    assert not errors, errors
    print(f"generated tokens/s > 0 on the page {seen_while_running:.1f} s after the requests started; "
          f"screenshot: {SCREENSHOT}")
