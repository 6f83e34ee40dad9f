"""Replay through the real daemon: X-Fetch-Since, X-Fetch-Since-Cursor, bounds, rules, gap-free."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.replay import CURSOR_FOUND_HEADER, TRUNCATED_HEADER
from tests.support import (
    Daemon,
    DaemonFactory,
    auth_header,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
)


def backlog_daemon(factory: DaemonFactory, size: int = 1000, acl: dict[str, Any] | None = None,
                   **backlog: Any) -> Daemon:
    port = free_port()
    cfg = base_config(port)
    cfg["server"]["backlog"] = {"size": size, **backlog}
    return factory(config=cfg, port=port, acl=acl)


async def publish_all(url: str, bodies: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish one after the other (their cursors are in this order)."""
    async with aiohttp.ClientSession() as s:
        for path, body in bodies:
            async with s.put(url + path, data=json.dumps(body)) as r:
                assert r.status == 202, await r.text()


async def live_cursors(d: Daemon, n: int, path: str = "/") -> list[dict[str, Any]]:
    """Publish nothing; just a helper to read the backlog with X-Fetch-Since: 0."""
    async with subscribe(d.url, path, headers={"X-Fetch-Since": "0"}) as sub:
        return [await sub.next() for _ in range(n)]


async def test_fetch_since_time_replays_younger_events(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory)
    await publish_all(d.url, [("/a/b", {"n": i}) for i in range(5)])
    evs = await live_cursors(d, 5)
    assert [e["n"] for e in evs] == [0, 1, 2, 3, 4]
    # a float epoch: strictly younger events only
    async with subscribe(d.url, "/a", headers={"X-Fetch-Since": str(evs[2]["pubsub_timestamp"])}) as sub:
        assert [(await sub.next())["n"] for _ in range(2)] == [3, 4]
        await publish(d.url, "/a/c", {"n": 5})  # then live
        assert (await sub.next())["n"] == 5
    # an integer epoch in the future: nothing replayed, live continues
    later = str(int(evs[4]["pubsub_timestamp"]) + 60)
    async with subscribe(d.url, "/a", headers={"X-Fetch-Since": later}) as sub:
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/a/c", {"n": 6})
        assert (await sub.next())["n"] == 6


async def test_fetch_since_cursor_and_unknown_cursor(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory)
    await publish_all(d.url, [("/a/b", {"n": i}) for i in range(4)])
    evs = await live_cursors(d, 4)
    async with subscribe(d.url, "/a/b", headers={"X-Fetch-Since-Cursor": evs[1]["pubsub_cursor"]}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
        got = [await sub.next() for _ in range(2)]
        assert [e["pubsub_cursor"] for e in got] == [e["pubsub_cursor"] for e in evs[2:]]
        await publish(d.url, "/a/b", {"n": 4})
        assert (await sub.next())["n"] == 4
    # unknown cursor (asfpy's expectation): no replay, live, and the header says so
    async with subscribe(d.url, "/a/b", headers={"X-Fetch-Since-Cursor": "00000000-dead-beef"}) as sub:
        assert sub.resp.status == 200
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "false"
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/a/b", {"n": 5})
        assert (await sub.next())["n"] == 5


async def test_evicted_cursor_continues_live(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory, size=3)
    async with subscribe(d.url, "/") as live:
        await wait_subscribers(d.url, 1)
        await publish_all(d.url, [("/a", {"n": i}) for i in range(6)])
        evs = [await live.next() for _ in range(6)]
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": evs[0]["pubsub_cursor"]}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "false"
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/a", {"n": 6})
        assert (await sub.next())["n"] == 6
    # retained now: 4, 5, 6
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": evs[4]["pubsub_cursor"]}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
        assert [(await sub.next())["n"] for _ in range(2)] == [5, 6]


async def test_backlog_disabled_answers_not_found(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()  # size 0
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": "x"}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "false"
    async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/a", {"n": 1})
        assert (await sub.next())["n"] == 1


async def test_bad_fetch_since_is_refused(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory)
    async with aiohttp.ClientSession() as s:
        for bad in ("yesterday", "nan", "1e999"):
            async with s.get(d.url + "/", headers={"X-Fetch-Since": bad}) as r:
                assert r.status == 400, bad
                assert "X-Fetch-Since" in await r.text()


async def test_replay_applies_topic_filters_and_private_rules(daemon_factory: DaemonFactory) -> None:
    acl = {"alice": {"password": "alice-pw", "acl": {"foo": ["foo"]}}}
    d = backlog_daemon(daemon_factory, acl=acl)
    await publish_all(d.url, [
        ("/foo/x", {"n": 0}),
        ("/private/foo/x", {"n": 1}),
        ("/private/bar/x", {"n": 2}),
        ("/other", {"n": 3}),
        ("/foo/y", {"n": 4}),
    ])
    alice = auth_header("alice", "alice-pw")
    async with subscribe(d.url, "/foo", headers={"X-Fetch-Since": "0", **alice}) as sub:
        got = [await sub.next() for _ in range(3)]
        assert [e["n"] for e in got] == [0, 1, 4]
        assert got[1]["pubsub_path"] == "/private/foo/x" and got[1]["pubsub_topics"] == ["foo", "x"]
    async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:  # anonymous
        assert [(await sub.next())["n"] for _ in range(3)] == [0, 3, 4]
        await sub.expect_none(0.2)


async def test_max_age_evicts_from_replay(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory, max_age="1s")
    await publish(d.url, "/old", {"n": 0})
    evs = await live_cursors(d, 1)

    async def replayed() -> list[int]:
        async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:
            await wait_subscribers(d.url, 1)
            await publish(d.url, "/marker", {"n": -1})
            out: list[int] = []
            while True:
                e = await sub.next()
                if e["n"] == -1:
                    return out
                out.append(e["n"])

    end = asyncio.get_running_loop().time() + 10
    while await replayed():
        assert asyncio.get_running_loop().time() < end, "max_age never evicted"
        await asyncio.sleep(0.2)
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": evs[0]["pubsub_cursor"]}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "false"


async def test_replay_is_bounded_and_joins_live(daemon_factory: DaemonFactory) -> None:
    d = backlog_daemon(daemon_factory, max_replay=10)
    await publish_all(d.url, [("/a", {"n": i}) for i in range(30)])
    async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:
        assert sub.resp.headers[TRUNCATED_HEADER] == "true"
        assert [(await sub.next())["n"] for _ in range(10)] == list(range(20, 30))
        await publish(d.url, "/a", {"n": 30})
        assert (await sub.next())["n"] == 30
    async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:
        assert TRUNCATED_HEADER in sub.resp.headers
        await sub.next()
    ev = (await live_cursors(d, 10))[-3]
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": ev["pubsub_cursor"]}) as sub:
        assert TRUNCATED_HEADER not in sub.resp.headers
        assert [(await sub.next())["n"] for _ in range(2)] == [29, 30]


@pytest.mark.parametrize("storage", [False, True], ids=["memory", "sqlite"])
async def test_gap_free_with_publisher_firing_during_long_replay(daemon_factory: DaemonFactory,
                                                                 tmp_path: Path, storage: bool) -> None:
    """A replay blocked on a slow reader while a publisher fires: every event once, in order."""
    extra: dict[str, Any] = {"storage": str(tmp_path / "gap.db"), "fsync": False} if storage else {}
    d = backlog_daemon(daemon_factory, size=20_000, **extra)
    blob = "x" * 2000  # ~10 MB of replay: more than the socket buffers and half the stream limit
    preload = 5000
    sem = asyncio.Semaphore(16)

    async def put(s: aiohttp.ClientSession, n: int) -> None:
        async with sem, s.put(d.url + "/g/t", data=json.dumps({"n": n, "blob": blob})) as r:
            assert r.status == 202

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*[put(s, n) for n in range(preload)])
    published = preload
    live_n = 300
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as s, \
            s.get(d.url + "/g", headers={"X-Fetch-Since": "0"}) as resp:
        # the stream is registered (holding) once its headers are out; the replay is now
        # blocked on this reader, which reads nothing until the publisher has fired
        async with aiohttp.ClientSession() as ps:
            for n in range(preload, preload + live_n):
                async with ps.put(d.url + "/g/t", data=json.dumps({"n": n, "blob": blob})) as r:
                    assert r.status == 202
                published += 1
        seen: list[tuple[str, int]] = []
        while len(seen) < published:
            line = await resp.content.readline()
            assert line, f"stream ended after {len(seen)} events"
            obj = json.loads(line)
            if "stillalive" in obj:
                continue
            seen.append((obj["pubsub_cursor"], obj["n"]))
    cursors = [c for c, _ in seen]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors), "reordered or duplicated"
    assert sorted(n for _, n in seen) == list(range(published)), "gap"
    # the live events came after every replayed one (they were published after the snapshot)
    assert [n for _, n in seen[preload:]] == list(range(preload, published))
    # and they really arrived while the replay was being written (held, then flushed)
    held = re.findall(r"replayed \d+ of \d+ event\(s\) to .*; (\d+) live event\(s\) held", d.log())
    assert held and int(held[-1]) > 0, held
