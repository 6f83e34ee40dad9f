"""Headless Chromium for tests: Debian's ``chromium`` driven by ``chromium-driver`` (selenium).

Nothing is downloaded: the binaries come from apt (scripts/install.sh --dev). A test that needs
the browser FAILS when they are missing, it never skips.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: headless, as root, with nothing phoning home (refused outbound calls only slow it down)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--window-size=1200,900")


def start_chromium(log_dir: Path) -> webdriver.Chrome:
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists() and shutil.which(Path(exe).name) is None:
            pytest.fail(f"{exe} is missing: install Debian's chromium and chromium-driver "
                        "(bash scripts/install.sh --dev)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for tests
    service = Service(CHROMEDRIVER, log_output=str(log_dir / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=opts)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium for one test, quit afterwards."""
    driver = start_chromium(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()
