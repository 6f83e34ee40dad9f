"""The live page in real headless Chromium: events appear as published, and survive a daemon
restart (persistent backlog) exactly once."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server.page import CLIENT_PATH, ROOT, SCRIPT_PATH
from tests.browser_fixture import chromium
from tests.support import Daemon, DaemonFactory, base_config, free_port

__all__ = ["chromium"]  # the fixture, imported for pytest


def put_sync(d: Daemon, path: str, body: dict[str, object]) -> None:
    req = urllib.request.Request(d.url + path, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202


def state(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "state").text)


def shown(driver: webdriver.Chrome) -> list[dict[str, object]]:
    """The events on the page, newest first (as the page lists them)."""
    return [json.loads(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#events li.event pre")]


def wait(driver: webdriver.Chrome, cond: object, what: str, timeout: float = 15) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(cond, what)  # type: ignore[arg-type]


def test_page_shows_an_event_published_after_it_loaded(daemon: Daemon,
                                                       chromium: webdriver.Chrome) -> None:
    chromium.get(daemon.url + "/fruits/apples")
    wait(chromium, lambda d: state(d) == "open", "the page to connect")
    put_sync(daemon, "/fruits/pears", {"not": "ours"})
    put_sync(daemon, "/fruits/apples/green", {"hello": "browser"})
    wait(chromium, lambda d: len(shown(d)) == 1, "the event on the page")
    (ev,) = shown(chromium)
    assert ev["hello"] == "browser" and ev["pubsub_topics"] == ["fruits", "apples", "green"]
    meta = chromium.find_element(By.CSS_SELECTOR, "#events li.event .topics").text
    assert meta == "fruits / apples / green"
    logs = chromium.get_log("browser")  # type: ignore[no-untyped-call]
    assert [e for e in logs if e.get("level") == "SEVERE"] == []  # no script or CSP error


def test_page_resumes_after_a_restart_exactly_once(daemon_factory: DaemonFactory, tmp_path: Path,
                                                   chromium: webdriver.Chrome) -> None:
    port = free_port()
    cfg = base_config(port, backlog={"size": 1000, "max_age": 0,
                                     "storage": str(tmp_path / "backlog.sqlite")})
    d = daemon_factory(config=cfg, port=port)
    chromium.get(d.url + "/outage")
    wait(chromium, lambda drv: state(drv) == "open", "the page to connect")
    put_sync(d, "/outage", {"n": "before"})
    wait(chromium, lambda drv: len(shown(drv)) == 1, "the first event")
    assert d.stop() == 0
    wait(chromium, lambda drv: state(drv) != "open", "the page to notice the outage")
    d.start()
    put_sync(d, "/outage", {"n": "during"})  # published before the page is back
    wait(chromium, lambda drv: state(drv) == "open", "the page to reconnect", timeout=30)
    put_sync(d, "/outage", {"n": "after"})
    wait(chromium, lambda drv: any(e["n"] == "after" for e in shown(drv)), "the live event")
    assert [e["n"] for e in shown(chromium)] == ["after", "during", "before"]  # each exactly once


def test_page_over_websocket(daemon: Daemon, chromium: webdriver.Chrome) -> None:
    chromium.get(daemon.url + "/ws/page?transport=websocket")  # same-origin: the Origin check passes
    wait(chromium, lambda d: state(d) == "open", "the WebSocket to open")
    put_sync(daemon, "/ws/page", {"via": "websocket"})
    wait(chromium, lambda d: len(shown(d)) == 1, "the event on the page")
    assert shown(chromium)[0]["via"] == "websocket"


def test_page_pause_resume_and_change_subscription(daemon_factory: DaemonFactory,
                                                   chromium: webdriver.Chrome) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, backlog={"size": 100, "max_age": 0}), port=port)
    chromium.get(d.url + "/a")
    wait(chromium, lambda drv: state(drv) == "open", "the page to connect")
    put_sync(d, "/a", {"n": 1})
    wait(chromium, lambda drv: len(shown(drv)) == 1, "the first event")
    chromium.find_element(By.ID, "pause").click()
    wait(chromium, lambda drv: state(drv) == "paused", "the pause")
    put_sync(d, "/a", {"n": 2})  # while paused: replayed by cursor on resume
    chromium.find_element(By.ID, "pause").click()
    wait(chromium, lambda drv: len(shown(drv)) == 2, "the event published while paused")
    assert [e["n"] for e in shown(chromium)] == [2, 1]
    box = chromium.find_element(By.ID, "path")
    box.clear()
    box.send_keys("/b,/c\n")
    wait(chromium, lambda drv: drv.execute_script("return location.pathname") == "/b,/c", "the new URL")
    wait(chromium, lambda drv: state(drv) == "open", "the new subscription")
    put_sync(d, "/a", {"n": 3})
    put_sync(d, "/c", {"n": 4})
    wait(chromium, lambda drv: shown(drv)[0]["n"] == 4, "the new subscription's event")
    assert [e["n"] for e in shown(chromium)] == [4, 2, 1]


def test_browser_module_and_page_script_parse(tmp_path: Path) -> None:
    """The ES module and the page script are valid JavaScript (node parses them as modules)."""
    assert CLIENT_PATH.resolve() == (ROOT / "clients" / "browser" / "pypubsub.js").resolve()
    for src in (CLIENT_PATH, SCRIPT_PATH):
        copy = tmp_path / (src.stem + ".mjs")
        copy.write_text(src.read_text())
        subprocess.run(["node", "--check", str(copy)], check=True, capture_output=True, timeout=30)
    readme = (ROOT / "clients" / "browser" / "README.md").read_text()
    example = readme.split("```js\n", 1)[1].split("```", 1)[0]
    (tmp_path / "pypubsub.js").write_text(CLIENT_PATH.read_text())
    (tmp_path / "example.mjs").write_text(example)
    subprocess.run(["node", "--check", str(tmp_path / "example.mjs")], check=True,
                   capture_output=True, timeout=30)
