"""The admin status page in real headless Chromium: drawn from /status, updating live."""

from __future__ import annotations

from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser_fixture import chromium, console_errors, wait_for
from tests.support import HOST, DaemonFactory, base_config, free_port, put, subscribe, wait_subscribers

__all__ = ["chromium"]  # the fixture


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def updates(driver: webdriver.Chrome) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)


async def test_status_page_updates_live(daemon_factory: DaemonFactory, chromium: webdriver.Chrome) -> None:
    port, admin = free_port(), free_port()
    d = daemon_factory(config=base_config(port, admin={"port": admin, "bind": HOST}), port=port)
    page = chromium
    page.get(f"http://{HOST}:{admin}/")
    assert page.title == "PyPubSub status"
    wait_for(page, lambda p: text(p, "state") == "ready", what="the first /status")
    assert text(page, "subscribers") == "0"
    async with subscribe(d.url, "/live/one"), subscribe(d.url, "/live/one"), \
            subscribe(d.url, "/other", headers={"User-Agent": "svnwcsub/1.0"}):
        await wait_subscribers(d.url, 3)
        wait_for(page, lambda p: text(p, "subscribers") == "3", what="3 subscribers drawn")
        for i in range(5):
            await put(d, "/live/one", {"i": i})
        wait_for(page, lambda p: text(p, "published") == "5", what="5 events drawn")
        wait_for(page, lambda p: text(p, "deliveries") == "10", what="10 deliveries drawn")
        rows = [r.text for r in page.find_elements(By.CSS_SELECTOR, "#subs tr")]
        assert rows == ["/live/one chunked 2", "/other chunked-nul 1"]
        transports = [r.text for r in page.find_elements(By.CSS_SELECTOR, "#transports tr")]
        assert transports == ["chunked 2", "chunked-nul 1"]
        # a rate was computed between two reads: the chart has something to draw
        wait_for(page, lambda p: text(p, "eps") not in ("-", ""), what="events per second")
    wait_for(page, lambda p: "client 3" in text(p, "disconnects"), what="3 client disconnects drawn")
    n = updates(page)
    wait_for(page, lambda p: updates(p) > n, what="another refresh")  # it keeps updating
    assert console_errors(page) == []


async def test_status_page_says_unreachable_when_the_daemon_is_gone(
        daemon_factory: DaemonFactory, chromium: webdriver.Chrome) -> None:
    port, admin = free_port(), free_port()
    d = daemon_factory(config=base_config(port, admin={"port": admin, "bind": HOST}), port=port)
    chromium.get(f"http://{HOST}:{admin}/")
    wait_for(chromium, lambda p: text(p, "state") == "ready", what="ready")
    assert d.stop() == 0
    wait_for(chromium, lambda p: text(p, "state") == "unreachable", what="unreachable")
