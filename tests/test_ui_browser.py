"""The dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by scripts/install-browser.sh) driven by selenium, against a real
gateway (uvicorn on a free port, in this process so a fleet stand-in can be plugged in) whose
models are simulator processes.

The page must list the models, reflect a switch started from the page within seconds, show a
queue while requests wait, render a hostile description and log line as text, and it leaves a
screenshot in artifacts/ (ARTIFACTS_DIR overrides). A browser that cannot start fails the
tier: nothing here skips.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.settings import GatewaySettings
from support.sim_fixtures import SimFactory, free_port
from support.sim_fleet import SimSwitchFleet

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR") or REPO / "artifacts")
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
ADMIN_KEY = "sk-dashboard-admin"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_LOG = "<script>window.__pwned=2</script> <b>not bold</b>"
T = TypeVar("T")


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium. It failing to start fails the test (never a skip)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: install Debian's {package} "
                        f"(bash scripts/install-browser.sh, which `make test` runs)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, what: str, check: Callable[[], T | None],
             timeout: float = 30.0) -> T:
    """Poll `check` (every 0.1 s) until it returns something truthy; fail with the page's
    text, its console and a screenshot when the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (StaleElementReferenceException, WebDriverException) as exc:
            last_error = exc  # the page re-rendered under us: look again
        time.sleep(0.1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"failed-{what.replace(' ', '-')[:40]}.png"
    driver.save_screenshot(str(shot))
    console = [e.get("message") for e in driver.get_log("browser")]
    pytest.fail(f"the page did not show {what} within {timeout} s (last error: {last_error!r});"
                f" screenshot {shot}\nconsole: {console}\npage:\n"
                f"{driver.find_element(By.TAG_NAME, 'body').text}")


def cell(driver: webdriver.Chrome, model: str, name: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'tr[data-model="{model}"] .c-{name}').text)


def state_of(driver: webdriver.Chrome, model: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'tr[data-model="{model}"] .state').text)


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click the element `css` once it is displayed and nothing covers it (the sticky header
    may, while the page scrolls): retried until the deadline."""
    def attempt() -> bool:
        target = driver.find_element(By.CSS_SELECTOR, css)
        if not target.is_displayed():
            return False
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
        target.click()
        return True

    wait_for(driver, f"a click on {css}", attempt)


def enter_key(driver: webdriver.Chrome, key: str) -> None:
    box = driver.find_element(By.ID, "key")
    box.clear()
    box.send_keys(key)
    click(driver, "#key-use")


# -- the gateway and its models ---------------------------------------------------------------


@dataclass
class Dashboard:
    base_url: str
    fleet: SimSwitchFleet
    app: Any

    @property
    def url(self) -> str:
        return self.base_url + "/ui/"


@pytest.fixture
def dashboard(sim_factory: SimFactory) -> Iterator[Dashboard]:
    """A gateway on a free port: `alpha` and `beta` managed (one awake at a time, switched by
    `SimSwitchFleet`), `slow` a remote simulator behind a queue of one, `evil` a remote
    simulator with a hostile description."""
    slow = sim_factory(served_names=("slow",), itl_ms=150)
    evil = sim_factory(served_names=("evil",))
    ports = {"alpha": free_port(), "beta": free_port()}
    registry = parse_registry(f"""
[host]
cpus = 3
gateway_cpus = 1
[models.alpha]
source = "org/alpha"
port = {ports["alpha"]}
cpus = 1
aliases = ["gpt-4o-mini"]
ttl = 900
description = "The first model"
[models.beta]
source = "org/beta"
port = {ports["beta"]}
cpus = 2
description = "Takes two cores: never awake beside alpha"
[models.slow]
url = "{slow.base_url}"
max_concurrency = 1
max_queue = 10
queue_timeout = 120
description = "One request at a time"
[models.evil]
url = "{evil.base_url}"
description = '{HOSTILE}'
""")
    fleet = SimSwitchFleet(ports, {n: registry.models[n].served_names for n in ports},
                           load_seconds=1.0, extra_log_lines=(HOSTILE_LOG,))
    port = free_port()
    settings = GatewaySettings(admin_key=ADMIN_KEY, port=port, activation_timeout=60)
    app = create_app(registry, settings, fleet_opener=lambda busy, last_used: fleet)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    try:
        fleet.ensure_awake("alpha")
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield Dashboard(f"http://127.0.0.1:{port}", fleet, app)
    finally:
        server.should_exit = True
        thread.join(15)
        fleet.close()


def chat(base_url: str, model: str, max_tokens: int = 4, stream: bool = False) -> int:
    body = {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Hello"}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      timeout=120) as resp:
        resp.read()
        return resp.status_code


# -- the tests ---------------------------------------------------------------------------------


def test_lists_the_models_and_renders_a_hostile_description_as_text(
        browser: webdriver.Chrome, dashboard: Dashboard) -> None:
    started = time.monotonic()
    browser.get(dashboard.url)
    wait_for(browser, "four model rows", lambda: len(
        browser.find_elements(By.CSS_SELECTOR, "#model-rows tr")) == 4)
    first_render = time.monotonic() - started
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#model-rows .name")]
    assert names == ["alpha", "beta", "slow", "evil"]
    wait_for(browser, "alpha awake and beta stopped",
             lambda: (state_of(browser, "alpha"), state_of(browser, "beta")) == ("awake",
                                                                                 "stopped"))
    assert state_of(browser, "slow") == "remote"
    assert "aka gpt-4o-mini" in cell(browser, "alpha", "model")
    description = browser.find_element(By.CSS_SELECTOR, 'tr[data-model="evil"] .description')
    assert description.text == HOSTILE
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert browser.execute_script("return window.__pwned") is None
    bar = wait_for(browser, "the core budget bar",
                   lambda: browser.find_elements(By.CSS_SELECTOR, '[data-bar="cpu"]'))
    assert "alpha 1 core" in bar[0].text
    # read-only without the admin key: no action buttons, no logs
    assert not browser.find_element(By.CSS_SELECTOR, 'tr[data-model="alpha"] .act-switch'
                                    ).is_displayed()
    assert not browser.find_element(By.ID, "logs-section").is_displayed()
    assert "admin key" in browser.find_element(By.ID, "actions-hint").text
    csp_violations = [e for e in browser.get_log("browser")
                      if "Content Security Policy" in e.get("message", "")]
    assert csp_violations == []
    # a phone: one card per model, nothing wider than the screen
    browser.set_window_size(390, 844)
    wait_for(browser, "no horizontal scrolling on a phone", lambda: browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1"))
    assert browser.find_element(By.CSS_SELECTOR, "#models thead").is_displayed() is False
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-phone.png"))
    print(f"first render {first_render:.2f} s")


def test_a_switch_started_from_the_page_shows_within_seconds_and_logs_stay_text(
        browser: webdriver.Chrome, dashboard: Dashboard) -> None:
    browser.get(dashboard.url)
    wait_for(browser, "alpha awake", lambda: state_of(browser, "alpha") == "awake")
    enter_key(browser, ADMIN_KEY)
    wait_for(browser, "the admin viewer", lambda: browser.find_element(By.ID, "viewer").text
             == "admin")
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    clicked = time.monotonic()
    click(browser, 'tr[data-model="beta"] .act-switch')
    wait_for(browser, "beta awake and alpha stopped", lambda: (
        state_of(browser, "beta"), state_of(browser, "alpha")) == ("awake", "stopped"))
    shown_after = time.monotonic() - clicked
    entry = wait_for(browser, "the action done", lambda: [
        e for e in browser.find_elements(By.CSS_SELECTOR, '#actions li[data-model="beta"]')
        if "done in" in e.text])
    assert "switch beta" in entry[0].text
    record = wait_for(browser, "the switch in the history", lambda: browser.find_elements(
        By.CSS_SELECTOR, '#switches li[data-model="beta"]'))
    text = record[0].text
    assert "switch beta" in text and "evict" in text and "healthy" in text, text
    assert "made room: stop alpha" in text
    assert dashboard.fleet.calls.count(("ensure_awake", "beta")) == 1
    # the switch itself takes a few seconds (a simulator starts and loads for 1 s); the page
    # showed its end within a few seconds of it
    took = httpx.get(f"{dashboard.base_url}/ui/api/snapshot", timeout=10).json()[
        "switches"][0]["seconds"]
    assert shown_after - took < 5, (shown_after, took)
    print(f"switch took {took:.2f} s; shown {shown_after:.2f} s after the click")

    click(browser, 'tr[data-model="beta"] .act-logs')
    wait_for(browser, "beta's log lines",
             lambda: HOSTILE_LOG in browser.find_element(By.ID, "logs").text)
    logs = browser.find_element(By.ID, "logs").text
    assert "beta" in logs or "Uvicorn" in logs or "vllm" in logs.lower()
    assert browser.find_elements(By.CSS_SELECTOR, "#logs *") == []  # text only, no elements
    assert browser.execute_script("return window.__pwned") is None

    click(browser, 'tr[data-model="beta"] .act-sleep')
    wait_for(browser, "beta stopped by sleep", lambda: state_of(browser, "beta") == "stopped")
    wait_for(browser, "the sleep done", lambda: [
        e for e in browser.find_elements(By.CSS_SELECTOR, '#actions li[data-action="sleep"]')
        if "done in" in e.text])
    # a remote model has no buttons
    assert not browser.find_element(By.CSS_SELECTOR, 'tr[data-model="slow"] .act-switch'
                                    ).is_displayed()
    click(browser, "#key-forget")
    wait_for(browser, "read-only again", lambda: not browser.find_element(
        By.CSS_SELECTOR, 'tr[data-model="beta"] .act-switch').is_displayed())
    assert browser.execute_script("return sessionStorage.length") == 0


def test_shows_a_queue_while_requests_wait_and_keeps_a_screenshot(
        browser: webdriver.Chrome, dashboard: Dashboard) -> None:
    browser.get(dashboard.url)
    enter_key(browser, ADMIN_KEY)
    wait_for(browser, "alpha awake", lambda: state_of(browser, "alpha") == "awake")
    # a switch from the page, then a request that brings alpha back on demand: two switches
    click(browser, 'tr[data-model="beta"] .act-switch')
    wait_for(browser, "beta awake", lambda: state_of(browser, "beta") == "awake")
    for _ in range(3):
        assert chat(dashboard.base_url, "gpt-4o-mini", stream=True) == 200  # alpha, by alias
    wait_for(browser, "two switches", lambda: len(
        browser.find_elements(By.CSS_SELECTOR, "#switches li")) == 2)
    # slow answers one request at a time (150 ms a token): four at once queue three
    results: list[int] = []
    workers = [threading.Thread(target=lambda: results.append(chat(dashboard.base_url, "slow",
                                                                   max_tokens=20)))
               for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(browser, "a queue on slow", lambda: int(cell(browser, "slow", "queued")) >= 2,
                 timeout=20)
        assert cell(browser, "slow", "inflight") == "1 / 1"
        wait_for(browser, "the oldest wait", lambda: cell(browser, "slow", "wait") != "-")
        wait_for(browser, "charts with two intervals", lambda: int(browser.find_element(
            By.CSS_SELECTOR, '.chart[data-model="alpha"]').get_attribute("data-points")) >= 2)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        height, chrome = browser.execute_script(
            "return [document.documentElement.scrollHeight, "
            "window.outerHeight - window.innerHeight]")
        browser.set_window_size(1280, min(int(height) + int(chrome) + 8, 3000))  # the whole page
        shot = ARTIFACTS / "ui-dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        for w in workers:
            w.join(120)
    assert results == [200] * 4
    wait_for(browser, "the queue drained", lambda: cell(browser, "slow", "queued") == "0")
