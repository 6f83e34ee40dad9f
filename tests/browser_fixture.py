"""Headless Chromium for tests of web pages, driven by Selenium (shared by every page test).

``chromium`` (a fixture) gives a fresh ``webdriver.Chrome`` on Debian's /usr/bin/chromium and
/usr/bin/chromedriver (scripts/install.sh --dev installs both). A test that needs it FAILS when
either is missing: a page that is never opened in a browser is not tested.

Use from a test module: ``from tests.browser_fixture import chromium  # noqa: F401`` or list it in
``pytest_plugins``. Blocking Selenium calls are fine in async tests when the daemon under test is
a subprocess (its event loop is not the test's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "console_errors", "wait_for"]

CHROMIUM = os.environ.get("PYPUBSUB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PYPUBSUB_CHROMEDRIVER", "/usr/bin/chromedriver")
#: no sandbox (tests run as root), no GPU, no calls to the outside world
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", "--disable-extensions", "--window-size=1280,900")


def _require(path: str, what: str) -> str:
    found = shutil.which(path) if not os.path.isabs(path) else (path if os.path.exists(path) else None)
    if not found:
        pytest.fail(f"{what} not found at {path}: install chromium and chromium-driver "
                    "(scripts/install.sh --dev)")
    return found


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    """A headless Chromium session (closed after the test)."""
    binary = _require(CHROMIUM, "Chromium")
    driver_path = _require(CHROMEDRIVER, "chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="pypubsub-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], Any], timeout: float = 10.0,
             what: str = "the page") -> Any:
    """Poll ``cond(driver)`` until truthy (Selenium's wait: a deadline, no fixed sleeps)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond, f"timed out waiting for {what}")


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The page's SEVERE console messages (script errors, failed loads) since the last call."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e.get("level") == "SEVERE"]
