"""Cluster mode: several real daemons sharing one log on a real redis-server (Redis Streams).

Each test starts its own redis-server (AOF, appendfsync always) and at least three daemons as
subprocesses. Events are counted with a sentinel published last: every subscriber reads until
the sentinel, so "exactly once" is checked without waiting for an absence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis

from hub.cursor import new_cursor
from hub.event import Event
from hub.hub import Hub
from hub.keys import Key
from plugins.backlog_redis import RedisLog, cursor_entry, entry_cursor, entry_position
from server.errors import ServiceUnavailable
from server.ingest import Ingest
from server.replay import CURSOR_FOUND_HEADER, CURSOR_HEADER, SINCE_HEADER
from tests.redis_fixture import RedisServer, redis_server, stream_entries
from tests.support import (
    HOST,
    PYTHON,
    ROOT,
    Daemon,
    DaemonFactory,
    Subscription,
    await_until,
    base_config,
    free_port,
    publish,
    put,
    subscribe,
    wait_subscribers,
)
from tests.test_admin import sample
from tests.test_transports import NO_TIMEOUT, SseReader, sse, ws_next

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

NODES = 3
STREAM = "pubsub-test"
SENTINEL = "/done"
EVENT_TIMEOUT = 10.0


def node_config(port: int, url: str, **backlog: Any) -> dict[str, Any]:
    bl: dict[str, Any] = {"size": 1000, "max_age": 0, "storage": url, "stream": STREAM}
    bl.update(backlog)
    return base_config(port, ping_interval="0.2", backlog=bl)


def start_nodes(factory: DaemonFactory, url: str, n: int = NODES, backlog: dict[str, Any] | None = None,
                admin: bool = False, **extra: Any) -> list[Daemon]:
    """``n`` daemons on one Redis (``backlog``: options of their backlog; ``admin``: each with
    an admin listener), started in parallel."""
    nodes = []
    for i in range(n):
        port = free_port()
        cfg = node_config(port, url, **(backlog or {}))
        if admin:
            cfg["server"]["admin"] = {"port": free_port(), "bind": HOST}
        cfg.update(extra)
        nodes.append(factory(config=cfg, port=port, start=False, name=f"node{i}"))
    for d in nodes:
        d.start(wait=False)
    for d in nodes:
        d.wait_ready()
    return nodes


@contextlib.asynccontextmanager
async def subscribers(nodes: list[Daemon], path: str = "/", headers: dict[str, str] | None = None,
                      others: int = 0) -> AsyncIterator[list[Subscription]]:
    """One NDJSON subscriber per node, registered (each node has ``others`` besides)."""
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(subscribe(d.url, path, headers)) for d in nodes]
        for d in nodes:
            await wait_subscribers(d.url, 1 + others)
        yield subs


def stored_event(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The event a stream entry holds, as every node sends it: the stored JSON up to the
    cursor, then the cursor the entry id gives."""
    assert fields[b"g"], "every entry carries the stream's epoch"
    obj: dict[str, Any] = json.loads(fields[b"p"] + entry_position(entry_id)[1].encode() + b'"}')
    return obj


async def until_sentinel(sub: Subscription) -> list[dict[str, Any]]:
    """Events up to (not including) the sentinel."""
    out: list[dict[str, Any]] = []
    while True:
        ev = await sub.next(EVENT_TIMEOUT)
        if ev["pubsub_path"] == SENTINEL:
            return out
        out.append(ev)


async def sse_until_sentinel(reader: SseReader) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (ev := await reader.event(EVENT_TIMEOUT))["pubsub_path"] != SENTINEL:
        out.append(ev)
    return out


async def ws_until_sentinel(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (ev := await ws_next(ws, EVENT_TIMEOUT))["pubsub_path"] != SENTINEL:
        out.append(ev)
    return out


class SvnSubscriber:
    """An svnwcsub-like subscriber: HTTP/1.0, no Host, no User-Agent, ``JSON\\n\\0`` records."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""

    @classmethod
    async def open(cls, port: int, path: str = "/") -> SvnSubscriber:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return cls(reader, writer)

    async def next(self) -> dict[str, Any]:
        while True:
            rec, sep, rest = self.buf.partition(b"\n\0")
            if sep:
                self.buf = rest
                obj: dict[str, Any] = json.loads(rec)
                if "stillalive" not in obj:
                    return obj
                continue
            data = await asyncio.wait_for(self.reader.read(65536), EVENT_TIMEOUT)
            if not data:
                raise EOFError("svnpubsub stream ended")
            self.buf += data

    async def until_sentinel(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while (ev := await self.next())["pubsub_path"] != SENTINEL:
            out.append(ev)
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def publish_spread(nodes: list[Daemon], n: int, path: str = "/t/n") -> None:
    """``n`` events, concurrently, round-robin over the nodes; every one must get its 202."""
    await asyncio.gather(*[put(nodes[i % len(nodes)], path, {"n": i}) for i in range(n)])


async def replay(url: str, headers: dict[str, str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Open a stream with replay headers; read until the sentinel; return (headers, events)."""
    async with subscribe(url, "/", headers) as sub:
        got = await until_sentinel(sub)
        return dict(sub.resp.headers), got


def cursors(events: list[dict[str, Any]]) -> list[str]:
    return [e["pubsub_cursor"] for e in events]


# -- the cursor (pure) ----------------------------------------------------------------------------
def test_cursor_is_derived_from_the_entry_id_and_sorts_as_the_stream() -> None:
    ids = ["1700000000000-0", "1700000000000-1", "1700000000000-4095", "1700000000000-4096",
           "1700000000000-18446744073709551615", "1700000000001-0"]
    pairs = [entry_position(i) for i in ids]
    assert [p for p, _ in pairs] == sorted(p for p, _ in pairs)
    cs = [c for _, c in pairs]
    assert cs == sorted(cs) and len(set(cs)) == len(cs)
    for i, c in zip(ids, cs, strict=True):
        assert len(c) == 36 and uuid.UUID(c).int >> 80 == int(i.split("-")[0])
        assert cursor_entry(c) == i  # the same on every node: a function of the id alone
    assert entry_cursor(1700000000000, 1) == cs[1]
    # cursors of the memory and SQLite logs, and 0.7.4's, are foreign
    assert cursor_entry(new_cursor()) is None
    assert cursor_entry(str(uuid.uuid4())) is None
    assert cursor_entry("not-a-cursor") is None


def test_redis_url_password_never_logged() -> None:
    log = RedisLog("redis://:s3cret@127.0.0.1:6390/2", "s", 10)
    assert "s3cret" not in log.where and "127.0.0.1:6390/2" in log.where
    assert "s3cret" not in repr(log)


def test_read_lag_is_the_distance_from_the_newest_entry() -> None:
    log = RedisLog("redis://127.0.0.1:6390/0", "s", 10)
    assert log.read_lag() == 0 and log.stats()["cluster_read_lag_seconds"] == 0
    log.newest_id, log.last_id = b"1700000002500-3", b"1700000001000-0"
    assert log.read_lag() == 1.5 and log.stats()["cluster_read_lag_seconds"] == 1.5
    log.last_id = b"1700000002500-3"  # caught up
    assert log.read_lag() == 0
    log.newest_id = b"1700000000000-0"  # a stale look at the stream: never negative
    assert log.read_lag() == 0


def test_redis_storage_config_keys() -> None:
    from server.config import parse_config
    from server.errors import ConfigError

    cfg = parse_config({"server": {"backlog": {"storage": "rediss://h:6380/1", "stream": "ev",
                                               "timeout": 0.5}}}, "x.yaml")
    bl = cfg.server.backlog
    assert (bl.redis_url, bl.storage, bl.stream, bl.timeout) == ("rediss://h:6380/1", None, "ev", 0.5)
    with pytest.raises(ConfigError, match=r"server\.backlog\.timeout"):
        parse_config({"server": {"backlog": {"storage": "redis://h", "timeout": 0}}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"server\.backlog\.stream"):
        parse_config({"server": {"backlog": {"storage": "redis://h", "stream": ""}}}, "x.yaml")


def test_memory_config_does_not_import_redis() -> None:
    code = ("import sys; from server.config import parse_config; from wiring import build_daemon;"
            "build_daemon(parse_config({'server': {'backlog': {'size': 10}}}, 'x.yaml'), None);"
            "print('redis' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


async def test_node_starts_without_redis_unready_and_serves_once_redis_comes(
        tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    server = RedisServer(tmp_path / "late")  # its port chosen, not started yet
    port, admin = free_port(), free_port()
    cfg = node_config(port, server.url)
    cfg["server"]["admin"] = {"port": admin, "bind": HOST}
    d = daemon_factory(config=cfg, port=port)  # listening without Redis
    readyz = f"http://{HOST}:{admin}/readyz"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.put(d.url + "/t/early", json={"n": 0}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            async with s.get(readyz) as resp:
                assert resp.status == 503 and "Redis unreachable" in await resp.text()
            server.start()
            end = time.monotonic() + EVENT_TIMEOUT
            while (await publish(d.url, "/t/first", {"n": 1}))[0] != 202:
                assert time.monotonic() < end, "the node did not serve once Redis answered"
                await asyncio.sleep(0.05)
            async with s.get(readyz) as resp:
                assert resp.status == 200
        async with subscribers([d]) as (sub,):
            await put(d, "/t/live", {"n": 2})
            await put(d, SENTINEL, {})
            got = await until_sentinel(sub)
        assert [e["n"] for e in got] == [2]
        r = server.client()
        try:
            stored = [b"".join(f.values()) for _i, f in stream_entries(r, STREAM)]
        finally:
            r.close()
        assert len(stored) == 3 and not any(b"/t/early" in e for e in stored)
        assert d.log().count("Redis is unreachable") == 1
        assert "starting without Redis" in d.log()
        d.wait_log("Redis is reachable again")
    finally:
        d.stop()
        server.stop()


def test_start_up_warns_about_a_redis_that_may_lose_events(
        tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    server = RedisServer(tmp_path / "plain", aof=False).start()
    try:
        r = server.client()
        try:
            r.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            r.close()
        port = free_port()
        d = daemon_factory(config=node_config(port, server.url), port=port)
        log = d.log()
        assert "Redis maxmemory-policy is 'allkeys-lru'" in log and "set maxmemory-policy noeviction" in log
        assert "Redis runs without AOF (appendonly no)" in log
        d.stop()
    finally:
        server.stop()


async def test_size_0_carries_live_events_without_replay(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url, n=2)
    for d in nodes:
        d.config["server"]["backlog"]["size"] = 0
        d.write_files()
        d.restart()
    async with subscribers(nodes[1:]) as (sub,):
        await put(nodes[0], "/t/live", {"n": 1})
        got = await sub.next(EVENT_TIMEOUT)
        assert got["n"] == 1
        async with subscribe(nodes[1].url, "/", {CURSOR_HEADER: got["pubsub_cursor"]}) as s:
            assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"  # replay is off
    for d in nodes:
        assert "acknowledged events may be lost" not in d.log()


# -- 1, 2: one service -------------------------------------------------------------------------------
async def test_every_node_delivers_every_event_once_in_one_order(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    # an in-process node too: the library's Key subscribers on the same cluster log
    log = RedisLog(redis_server.url, STREAM, 100)
    hub = Hub()
    Ingest(hub, log)
    keyed: list[Event] = []
    hub.add_subscriber(Key("t", "*"), lambda _k, m: keyed.append(m))
    hub.add_subscriber(Key("done"), lambda _k, m: keyed.append(m))
    await log.start()
    svn = [await SvnSubscriber.open(d.port) for d in nodes]
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Server-Sent Events and WebSocket subscribers on every node too
            sses = [await stack.enter_async_context(sse(d.url, "/")) for d in nodes]
            session = await stack.enter_async_context(aiohttp.ClientSession(timeout=NO_TIMEOUT))
            wss = [await stack.enter_async_context(session.ws_connect(d.url + "/")) for d in nodes]
            async with subscribers(nodes, others=3) as subs:
                n = 60
                await publish_spread(nodes, n)
                await put(nodes[1], SENTINEL, {})
                ndjson = [await until_sentinel(s) for s in subs]
                svnpubsub = [await s.until_sentinel() for s in svn]
                server_sent = [await sse_until_sentinel(r) for r in sses]
                websocket = [await ws_until_sentinel(w) for w in wss]
                await await_until(lambda: keyed and keyed[-1].path == SENTINEL, EVENT_TIMEOUT)
    finally:
        for s in svn:
            await s.close()
        await log.close()
    reference = cursors(ndjson[0])
    assert len(reference) == n and len(set(reference)) == n
    assert sorted(e["n"] for e in ndjson[0]) == list(range(n))
    assert reference == sorted(reference)  # ordered as the stream is
    for got in ndjson + svnpubsub + server_sent + websocket:
        assert cursors(got) == reference  # the same events, once, in the same order
    assert [e.cursor for e in keyed[:-1]] == reference
    assert [e.payload for e in keyed[:-1]] == ndjson[0]


async def test_2xx_only_after_redis_has_it_and_cursors_are_cluster_cursors(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    r = redis_server.client()
    try:
        async with subscribers(nodes[:1]) as (sub,):
            for i in range(5):
                await put(nodes[i % NODES], "/t/ack", {"i": i})
                entries = stream_entries(r, STREAM)  # the 202 came: the entry is in Redis already
                assert len(entries) == i + 1
                assert stored_event(*entries[-1])["i"] == i
            got = [await sub.next(EVENT_TIMEOUT) for _ in range(5)]
            ids = [e[0].decode() for e in stream_entries(r, STREAM)]
    finally:
        r.close()
    assert [cursor_entry(e["pubsub_cursor"]) for e in got] == ids
    # a cursor of the SQLite era (or 0.7.4's) is foreign: not found, continue live
    for foreign in (new_cursor(), str(uuid.uuid4())):
        async with subscribe(nodes[2].url, "/", {CURSOR_HEADER: foreign}) as s:
            assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"


# -- 3: replay on every node ------------------------------------------------------------------------
async def test_replay_on_any_node_with_a_cursor_from_another_while_others_publish(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes[:1]) as (ref,):
        await publish_spread(nodes[:1], 10)
        first = [await ref.next(EVENT_TIMEOUT) for _ in range(10)]
        resume_after = first[4]

        async def others() -> None:
            for i in range(40):
                await put(nodes[1 + i % 2], "/t/more", {"n": 100 + i})
            await put(nodes[1], SENTINEL, {})

        async def resumed_by_event_source(url: str, cursor: str) -> list[dict[str, Any]]:
            """What EventSource does when it reconnects to another node: Last-Event-ID."""
            async with sse(url, "/", {"Last-Event-ID": cursor}) as reader:
                return await sse_until_sentinel(reader)

        publishing = asyncio.create_task(others())
        # resumed on node 2 (by cursor, and as an EventSource would) and by time on node 1,
        # while nodes 1 and 2 keep publishing
        (h_cur, by_cursor), (_, by_time), by_last_event_id = await asyncio.gather(
            replay(nodes[2].url, {CURSOR_HEADER: resume_after["pubsub_cursor"]}),
            replay(nodes[1].url, {SINCE_HEADER: str(first[6]["pubsub_timestamp"])}),
            resumed_by_event_source(nodes[2].url, resume_after["pubsub_cursor"]))
        await publishing
        everything = first + await until_sentinel(ref)
    assert h_cur[CURSOR_FOUND_HEADER] == "true"
    assert cursors(by_cursor) == cursors(everything[5:])  # gap-free, no duplicate
    assert cursors(by_last_event_id) == cursors(everything[5:])
    since = first[6]["pubsub_timestamp"]  # by time: the events stamped later, in stream order
    assert cursors(by_time) == cursors([e for e in everything if e["pubsub_timestamp"] > since])
    assert len(everything) == 50


async def test_max_age_trims_the_stream_and_filters_replays(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=node_config(port, redis_server.url, max_age=1), port=port)
    await publish_spread([d], 3)
    r = redis_server.client()
    try:  # XTRIM MINID ~ by Redis time removes what is older than max_age
        await await_until(lambda: r.xlen(STREAM) == 0, EVENT_TIMEOUT, "the stream to be trimmed")
    finally:
        r.close()
    await put(d, SENTINEL, {})
    _, got = await replay(d.url, {SINCE_HEADER: "0"})
    assert got == []  # nothing older than max_age is replayed


# -- 4: Redis unreachable ---------------------------------------------------------------------------
async def test_outage_gives_503_keeps_streams_and_resumes_without_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes) as subs:
        await publish_spread(nodes, 6)
        before = [[await s.next(EVENT_TIMEOUT) for _ in range(6)] for s in subs]
        redis_server.pause()  # hung: connections open, nothing answered
        try:
            async def refused(d: Daemon) -> None:
                t0 = time.monotonic()
                async with aiohttp.ClientSession() as s, s.put(d.url + "/t/n", json={"x": 1}) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"] == "1"
                assert time.monotonic() - t0 < 3.0  # the configured 1 s, never a hang

            await asyncio.gather(*[refused(d) for d in nodes * 3])
            for s in subs:  # open streams stay open and keep their pings
                assert "stillalive" in await s.next(EVENT_TIMEOUT, pings=True)
        finally:
            redis_server.resume()

        async def accepted() -> bool:
            return (await publish(nodes[0].url, "/t/after", {"n": 6}))[0] == 202

        end = time.monotonic() + EVENT_TIMEOUT
        while not await accepted():
            assert time.monotonic() < end, "Redis did not come back"
            await asyncio.sleep(0.05)
        await publish_spread(nodes, 4, "/t/later")
        await put(nodes[2], SENTINEL, {})
        got = [b + await until_sentinel(s) for b, s in zip(before, subs, strict=True)]
    for g in got:
        assert cursors(g) == cursors(got[0])
        # a hung Redis stores none of the publishes answered 503 ("it may be stored"): the
        # batch it had read runs after its deadline when Redis wakes, and stores nothing
        assert sorted((e["pubsub_path"], e["n"]) for e in g) == sorted(
            [("/t/n", i) for i in range(6)] + [("/t/after", 6)] + [("/t/later", i) for i in range(4)])
    for d in nodes:  # one line when the outage starts, one when it ends
        d.wait_log("Redis is reachable again")
        assert d.log().count("Redis is unreachable") == 1
        assert d.log().count("Redis is reachable again") == 1


# -- 5: Redis restarted; the stream reset --------------------------------------------------------------
async def publish_until_accepted(d: Daemon, path: str, body: dict[str, Any]) -> None:
    """Publish once ``d`` accepts publishes again (Redis restarted): 503s until then."""
    end = time.monotonic() + EVENT_TIMEOUT
    while (await publish(d.url, path, body))[0] != 202:
        assert time.monotonic() < end, "Redis did not come back"
        await asyncio.sleep(0.05)  # back-off between attempts, not synchronisation


async def test_redis_restart_with_aof_loses_nothing_acknowledged(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes[:1]) as (live,):
        await publish_spread(nodes, 20)
        before = [await live.next(EVENT_TIMEOUT) for _ in range(20)]
        redis_server.kill()
        redis_server.start()  # same port and files: AOF replayed
        await publish_until_accepted(nodes[1], "/t/after", {"n": 20})
        await put(nodes[2], SENTINEL, {})
        after = await until_sentinel(live)
        headers, resumed = await replay(nodes[2].url, {CURSOR_HEADER: before[0]["pubsub_cursor"]})
    r = redis_server.client()
    try:
        assert r.xlen(STREAM) == 22  # 20 + 1 + the sentinel: nothing acknowledged was lost
    finally:
        r.close()
    assert len(after) == 1 and after[0]["n"] == 20  # no gap, no duplicate after the restart
    assert headers[CURSOR_FOUND_HEADER] == "true"
    assert cursors(resumed) == cursors(before[1:] + after)
    for d in nodes:
        assert "acknowledged events may be lost" not in d.log()


async def test_redis_restored_from_an_older_copy_is_reported_as_a_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """Redis restarted from an older copy of its files (a backup restored, a disk that lost its
    last writes) while the nodes had read events the copy lacks, and publishing resumes at once:
    every node reports the gap, and a resume from a lost event is told its cursor is not found.
    The cluster goes on with the restored stream."""
    import shutil

    aof, older = redis_server.workdir / "appendonlydir", redis_server.workdir.parent / "older"
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes) as subs:
        await publish_spread(nodes, 5)
        for s in subs:
            assert len([await s.next(EVENT_TIMEOUT) for _ in range(5)]) == 5
        redis_server.stop()
        shutil.copytree(aof, older)  # the copy: 5 events
        redis_server.start()
        for i in range(3):
            await publish_until_accepted(nodes[i], "/t/lost", {"n": 5 + i})
        lost = [[await s.next(EVENT_TIMEOUT) for _ in range(3)] for s in subs]
        redis_server.stop()
        shutil.rmtree(aof)
        shutil.copytree(older, aof)
        redis_server.start()  # the older copy, and a publish at once
        await publish_until_accepted(nodes[1], "/t/after", {"n": 8})
        await put(nodes[2], SENTINEL, {})
        for s in subs:
            assert [e["n"] for e in await until_sentinel(s)] == [8]
    r = redis_server.client()
    try:
        assert r.xlen(STREAM) == 7  # the copy's 5, the one after, the sentinel
    finally:
        r.close()
    for d, seen in zip(nodes, lost, strict=True):
        d.wait_log("acknowledged events may be lost", EVENT_TIMEOUT)
        async with subscribe(d.url, "/", {CURSOR_HEADER: seen[0]["pubsub_cursor"]}) as s:
            assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"


async def test_reset_stream_is_reported_as_a_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes[:1]) as (live,):
        await publish_spread(nodes, 5)
        got = [await live.next(EVENT_TIMEOUT) for _ in range(5)]
        r = redis_server.client()
        try:
            r.flushall()
        finally:
            r.close()
        for d in nodes:
            d.wait_log("the stream was reset", EVENT_TIMEOUT)
        for d in nodes:  # every node says: your cursor is not found (a gap), never a silent loss
            async with subscribe(d.url, "/", {CURSOR_HEADER: got[1]["pubsub_cursor"]}) as s:
                assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"
        await put(nodes[1], "/t/new", {"n": 5})  # the cluster goes on with a new stream
        assert (await live.next(EVENT_TIMEOUT))["n"] == 5


async def test_entries_trimmed_before_a_node_read_them_are_reported_as_a_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """A node held (SIGSTOP) while the others publish more than the stream keeps finds, at the
    next entry it reads, that the entries' numbers skip what was trimmed unread: it says so,
    counts them, and a client resuming there from before the gap is told its cursor is not
    found. The nodes that read everything report nothing."""
    import signal

    nodes = start_nodes(daemon_factory, redis_server.url, backlog={"size": 100}, admin=True)
    async with subscribers(nodes) as subs:
        await publish_spread(nodes, 3)
        before = [[await s.next(EVENT_TIMEOUT) for _ in range(3)] for s in subs]
        nodes[0].signal(signal.SIGSTOP)
        try:
            for _ in range(10):  # 1 000 events: the stream (MAXLEN ~ 100) is trimmed past node 0
                await publish_spread(nodes[1:], 100)
        finally:
            nodes[0].signal(signal.SIGCONT)
        await put(nodes[1], SENTINEL, {})
        for s in subs[1:]:
            assert len(await until_sentinel(s)) == 1000
        held = await until_sentinel(subs[0])
        assert 0 < len(held) < 1000, "node 0 delivers what the stream still held"
        nodes[0].wait_log("missed events (", EVENT_TIMEOUT)
        assert "entries were removed before this node read them" in nodes[0].log()
        for d in nodes[1:]:
            assert "acknowledged events may be lost" not in d.log()
        # what node 0 delivered after the stop, and what it counts as missed, make up the rest
        assert await sample(nodes[0], "pypubsub_cluster_missed_entries_total") == 1000 - len(held)
        assert await sample(nodes[1], "pypubsub_cluster_missed_entries_total") == 0
        resume = before[0][2]["pubsub_cursor"]
        async with subscribe(nodes[0].url, "/", {CURSOR_HEADER: resume}) as s:
            assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"  # a gap, never a silent one


# -- 6: a node killed ----------------------------------------------------------------------------------
async def test_killed_node_clients_resume_on_another_without_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    async with subscribers(nodes[1:2]) as (ref,):
        async with subscribe(nodes[0].url, "/") as victim:
            await wait_subscribers(nodes[0].url, 1)
            await publish_spread(nodes, 9)
            seen = [await victim.next(EVENT_TIMEOUT) for _ in range(9)]
            nodes[0].kill()
        await publish_spread(nodes[1:], 8, "/t/meanwhile")  # the others keep serving
        await put(nodes[2], SENTINEL, {})
        reference = await until_sentinel(ref)
        headers, resumed = await replay(nodes[2].url, {CURSOR_HEADER: seen[-1]["pubsub_cursor"]})
    assert headers[CURSOR_FOUND_HEADER] == "true"
    assert cursors(seen + resumed) == cursors(reference)


# -- 7: SQS on several nodes ---------------------------------------------------------------------------
@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Any]:
    from tests.sqs_fixture import MotoServer

    server = MotoServer(tmp_path / "moto.log").start()
    yield server
    server.stop()


async def test_sqs_message_enters_the_stream_once(
        redis_server: RedisServer, moto: Any, daemon_factory: DaemonFactory) -> None:
    from tests.sqs_fixture import queue_entry, queue_name, send

    sqs = moto.client()
    name = queue_name()
    # visible again at once and never deleted: every node receives every message, repeatedly
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "0"})["QueueUrl"]
    entry = queue_entry(moto, name, delete=False)
    nodes = start_nodes(daemon_factory, redis_server.url, sqs={"main": entry})
    ids = [send(sqs, url, {"pubsub_path": "/sqs/m", "k": k}) for k in range(5)]
    for d in nodes:
        for mid in ids:
            d.wait_log(f"message {mid} for '/sqs/m' accepted", EVENT_TIMEOUT)
    r = redis_server.client()
    try:
        stored = [stored_event(i, f)["k"] for i, f in stream_entries(r, STREAM)]
    finally:
        r.close()
    assert sorted(stored) == list(range(5))


@contextlib.asynccontextmanager
async def reading_log(server: RedisServer, size: int, url: str | None = None
                      ) -> AsyncIterator[tuple[RedisLog, list[Event], redis.Redis]]:
    """A started cluster log on ``server`` (or on ``url``, a way to it) whose tail collects what
    it reads back, and a client of that Redis; both closed after."""
    log = RedisLog(url or server.url, STREAM, size)
    got: list[Event] = []
    log.tail(got.append)
    r = server.client()
    try:
        await log.start()
        yield log, got, r
    finally:
        r.close()
        await log.close()


# -- the entries' formats ---------------------------------------------------------------------------
async def test_entries_hold_the_bytes_nodes_send_and_older_entries_are_read(
        redis_server: RedisServer) -> None:
    """An entry keeps the stamped JSON up to the cursor, which its id gives: a node sends the
    stored bytes plus the cursor. An event whose ``pubsub_cursor`` is not its last member, and
    entries written by an earlier version (the whole JSON in ``e``), are stamped again on read.
    De-duplication ids within one batch: each id enters once."""
    from hub.event import make_event
    from plugins.backlog_redis import fast_cursor

    async with reading_log(redis_server, 100) as (log, got, r):
        plain = make_event("/t/a", {"k": 1, "s": "é \\" "\n"})
        early = make_event("/private/t/b", {"pubsub_cursor": "theirs", "k": 2})  # cursor not last
        acks = await asyncio.gather(log.append(plain), log.append(early),
                                    log.append(make_event("/t/c", {"k": 3}), dedup="m1"),
                                    log.append(make_event("/t/c", {"k": 4}), dedup="m1"))
        assert acks[3] is None and all(a is not None for a in acks[:3])  # the same batch, one entry
        # an entry as an earlier version wrote it: the whole JSON in "e", with its epoch
        epoch = r.get(f"{STREAM}:epoch")
        assert isinstance(epoch, bytes)
        old = make_event("/t/old", {"k": 5})
        r.xadd(STREAM, {"e": old.json, "g": epoch})
        await await_until(lambda: len(got) == 4, EVENT_TIMEOUT)
        entries = stream_entries(r, STREAM)
        assert [sorted(f) for _i, f in entries] == [[b"g", b"p"], [b"e", b"g"], [b"g", b"n", b"p"],
                                                    [b"e", b"g"]]
        # the batch's last entry carries the epoch's count and the batch's size; the earlier
        # version's entry carries none (and breaks no count)
        assert [f.get(b"n") for _i, f in entries] == [None, None, b"3 3", None]
        assert r.get(f"{STREAM}:count") == b"3" and log.resets == 0
        for (entry_id, _f), ev in zip(entries, got, strict=True):
            position, cursor = entry_position(entry_id)
            assert (ev.position, ev.cursor, ev.payload["pubsub_cursor"]) == (position, cursor, cursor)
            assert json.loads(ev.json) == ev.payload
            assert fast_cursor(*map(int, entry_id.split(b"-"))) == cursor
        assert ev.json == old.json.replace(old.cursor.encode(), ev.cursor.encode())
        assert got[0].json == plain.json.replace(plain.cursor.encode(), got[0].cursor.encode())
        assert (got[0].topics, got[0].private, got[0].payload["s"]) == (("t", "a"), False, "é \\\n")
        assert (got[1].topics, got[1].private, got[1].path) == (("t", "b"), True, "/private/t/b")
        assert list(got[1].payload) == list(early.payload)  # the members' order is kept
        assert [e.payload["k"] for e in got] == [1, 2, 3, 5] and log.unreadable == 0


async def test_one_timer_per_loop_bounds_every_call_and_never_fires_early(
        redis_server: RedisServer) -> None:
    """The writer, the answers to its batches and the reader's XREAD are each bounded by one
    re-armed timer instead of a timer per call. Calls that succeed for longer than the timeout in
    all never time out; a hung Redis still gets a 503 within the timeout, the reading resumes
    after the last entry when it wakes (no gap, no duplicate), and close() (the owner's
    cancellation) is not taken for a timeout while an append waits on the hung Redis."""
    from hub.event import make_event

    timeout = 0.3
    log = RedisLog(redis_server.url, STREAM, 100_000, timeout=timeout)
    got: list[Event] = []
    log.tail(got.append)
    await log.start()
    acked: list[str] = []
    closed = False
    try:
        t0, waves = time.monotonic(), 0
        while time.monotonic() - t0 < 4 * timeout or waves < 20:  # appends over many deadlines
            acks = await asyncio.gather(*(log.append(make_event("/t/w", {"w": waves, "i": i}))
                                          for i in range(4)))
            acked += [a.cursor for a in acks if a is not None]
            waves += 1
        assert len(acked) == 4 * waves and log.outage.count == 0
        await await_until(lambda: len(got) == len(acked), EVENT_TIMEOUT, "every append read back")

        redis_server.pause()  # hung: connections open, nothing answered
        try:
            t1 = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await log.append(make_event("/t/hung", {}))
            assert time.monotonic() - t1 < timeout + 1.0  # bounded by the timeout, not a hang
            assert log.outage.down
        finally:
            redis_server.resume()
        end = time.monotonic() + EVENT_TIMEOUT
        for _ in iter(int, 1):  # until Redis answers again (each try bounded by the timeout)
            try:
                after = await log.append(make_event("/t/after", {}))
            except ServiceUnavailable:
                assert time.monotonic() < end, "Redis did not come back"
                continue
            assert after is not None
            acked.append(after.cursor)
            break
        await await_until(lambda: bool(got) and got[-1].cursor == acked[-1], EVENT_TIMEOUT,
                          "the reader to resume")
        # the 503's batch is not stored (it reached the hung Redis after its deadline)
        assert [e.cursor for e in got] == acked and len(set(acked)) == len(acked)

        redis_server.pause()
        try:
            pending = log.append(make_event("/t/closing", {}))
            t2 = time.monotonic()
            await log.close()
            closed = True
            assert time.monotonic() - t2 < 4 * timeout + 2.0
            with pytest.raises(ServiceUnavailable):
                await pending
        finally:
            redis_server.resume()
    finally:
        if not closed:
            await log.close()


async def test_connections_redis_closes_are_opened_again_without_gap_or_duplicate(
        redis_server: RedisServer) -> None:
    """Redis (an operator's CLIENT KILL, a proxy, an idle timeout) may close a node's
    connections. The append connection closed while nothing is in flight is opened again for
    the next append: no refusal, no outage. The read connection closed under its blocking XREAD
    is opened again and the reading continues after the last entry read."""
    from hub.event import make_event

    def client_id(r: redis.Redis, cmd: str) -> int:
        ids = [c["id"] for c in r.client_list() if c["cmd"] == cmd]
        assert len(ids) == 1, f"one connection whose last command is {cmd}: {r.client_list()}"
        return int(ids[0])

    async with reading_log(redis_server, 1000) as (log, got, r):
        acked = [await log.append(make_event("/t/a", {"i": 0}))]
        await await_until(lambda: len(got) == 1, EVENT_TIMEOUT, "the first event read back")
        r.client_kill_filter(_id=str(client_id(r, "eval")))
        await await_until(lambda: log._replies is None, EVENT_TIMEOUT, "the node to see the close")
        acked.append(await log.append(make_event("/t/a", {"i": 1})))
        assert acked[-1] is not None and log.outage.count == 0
        await await_until(lambda: len(got) == 2, EVENT_TIMEOUT, "the second event read back")
        r.client_kill_filter(_id=str(client_id(r, "xread")))
        for i in range(2, 6):
            acked.append(await log.append(make_event("/t/a", {"i": i})))
        await await_until(lambda: len(got) == 6, EVENT_TIMEOUT, "the reading to resume")
        assert [e.cursor for e in got] == [a.cursor for a in acked if a is not None]
        assert [e.payload["i"] for e in got] == list(range(6)) and log.unreadable == 0


async def test_entries_read_while_the_reset_check_is_on_its_way_are_no_reset(
        redis_server: RedisServer) -> None:
    """The check for a reset stream compares the stream's newest id with what the node had read
    when it asked: entries read back while the question was on its way (Redis answers the
    reader first after a stall) are newer than the answer, and are no reset."""
    from hub.event import make_event

    async with reading_log(redis_server, 100) as (log, got, _r):
        await log.append(make_event("/t/a", {}))
        await await_until(lambda: len(got) == 1, EVENT_TIMEOUT, "the first event read back")
        real = log._redis
        assert real is not None

        class AnsweredLate:
            """The real XINFO, its answer taken after the reader read a newer entry."""

            async def xinfo_stream(self, name: str) -> Any:
                assert real is not None
                info = await real.xinfo_stream(name)
                await log.append(make_event("/t/b", {}))
                await await_until(lambda: len(got) == 2, EVENT_TIMEOUT, "the newer entry read back")
                return info

        await log._check_reset(cast(Any, AnsweredLate()))
        assert log.resets == 0 and len(log.mirror) == 2


class CuttingProxy:
    """A TCP proxy to Redis that can lose one script call: ``cut("answer")`` passes the next
    ``EVAL`` to Redis and closes the connection when its answer comes (stored, not answered);
    ``cut("request", n)`` swallows the next ``n`` script calls, then closes the connection
    (never stored).
    ``loading(n)`` answers the next ``n`` script calls itself, as a Redis still loading its
    data set answers (``-LOADING``, nothing run). ``switch(port)`` is a failover: every
    connection is closed, and the next ones go to the Redis on ``port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.armed: str | None = None
        self.swallow = 0
        self.cuts = 0
        self.to_load = 0
        self.loading_answers = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self, what: str, calls: int = 1) -> None:
        self.armed = what
        self.swallow = calls

    def loading(self, n: int) -> None:
        self.to_load = n

    def switch(self, port: int) -> None:
        self.upstream_port = port
        for w in self._open:
            w.transport.abort()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection(HOST, self.upstream_port)
        doomed = asyncio.Event()

        def end() -> None:
            self.cuts += 1
            cwriter.transport.abort()
            swriter.transport.abort()

        async def up() -> None:
            while data := await creader.read(65536):
                calls = data.count(b"$4\r\nEVAL\r\n")
                if self.to_load and calls and not self.armed:
                    n = min(calls, self.to_load)
                    self.to_load -= n
                    self.loading_answers += n
                    cwriter.write(b"-LOADING Redis is loading the dataset in memory\r\n" * n)
                    if n == calls:
                        continue
                    raise AssertionError("a read with more script calls than to answer")
                if self.armed == "request" and calls:
                    self.swallow -= calls
                    if self.swallow <= 0:
                        self.armed = None
                        end()
                        return
                    continue
                if self.armed and calls:
                    self.armed = None
                    doomed.set()
                swriter.write(data)
            swriter.close()

        async def down() -> None:
            while data := await sreader.read(65536):
                if doomed.is_set():
                    end()
                    return
                cwriter.write(data)
            cwriter.close()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        self._tasks.update(tasks)
        self._open.update((cwriter, swriter))
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            self._open.difference_update((cwriter, swriter))
            for w in (cwriter, swriter):
                w.transport.abort()


@pytest.mark.parametrize("lost", ["answer", "request"])
async def test_a_batch_on_a_lost_connection_is_sent_again_and_stored_once(
        redis_server: RedisServer, lost: str) -> None:
    """The append connection is lost with a batch on it: after Redis stored it (its answer
    lost), or before Redis got it. Either way the node sends the batch again on a new
    connection, and the publisher gets its 202 with the cursor of the one entry Redis holds:
    Redis answers a batch it had stored with the ids it gave, and stores the other once."""
    from hub.event import make_event

    async with CuttingProxy(redis_server.port) as proxy, \
            reading_log(redis_server, 100, f"redis://{HOST}:{proxy.port}/0") as (log, got, r):
        first = await log.append(make_event("/t/first", {}))  # connected, nothing in flight
        proxy.cut(lost)
        acks = await asyncio.gather(*(log.append(make_event("/t/lost", {"i": i})) for i in range(3)))
        assert proxy.cuts == 1 and log.resent_batches == 1
        entries = stream_entries(r, STREAM)
        assert len(entries) == 4, "each event stored once"
        assert [a.cursor for a in [first, *acks] if a is not None] == [
            entry_position(i)[1] for i, _f in entries]
        await await_until(lambda: len(got) == 4, EVENT_TIMEOUT, "the events read back")
        assert [e.payload.get("i") for e in got] == [None, 0, 1, 2]
        assert log.outage.count == 1  # the lost connection; no publish refused


async def test_a_batch_sent_again_to_a_loading_redis_waits_and_keeps_its_order(
        redis_server: RedisServer) -> None:
    """Two batches lost on their way, sent again and answered ``-LOADING`` (Redis restarted,
    still loading: nothing run), are sent once more after a back-off, within their time, in the
    order they were made: a publisher's events keep their order in the stream."""
    from hub.event import make_event

    async with CuttingProxy(redis_server.port) as proxy, \
            reading_log(redis_server, 100, f"redis://{HOST}:{proxy.port}/0") as (log, got, r):
        await log.append(make_event("/t/first", {}))  # connected, nothing in flight
        proxy.cut("request", 2)  # both batches on their way, neither stored
        proxy.loading(2)
        first = [log.append(make_event("/t/a", {"i": i})) for i in range(3)]
        await asyncio.sleep(0)  # a turn of the loop: the second batch is another script call
        second = [log.append(make_event("/t/b", {"i": i})) for i in range(3, 6)]
        acks = await asyncio.gather(*first, *second)
        assert proxy.cuts == 1 and proxy.loading_answers == 2 and log.resent_batches == 4
        entries = stream_entries(r, STREAM)[1:]
        assert [json.loads(f[b"p"] + b'"}')["i"] for _i, f in entries] == list(range(6))
        assert [a.cursor for a in acks if a is not None] == [entry_position(i)[1] for i, _f in entries]
        await await_until(lambda: len(got) == 7, EVENT_TIMEOUT, "the events read back")


async def append_when_up(log: RedisLog, event: Event) -> str:
    """Append ``event`` once the log accepts appends again (after a failover); its cursor."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        try:
            ack = await log.append(event)
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # back-off between attempts, not synchronisation
            continue
        assert ack is not None
        return ack.cursor


async def test_failover_to_a_lagging_replica_is_reported_as_a_gap(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis fails over to a replica that lacks the newest entries (replication is
    asynchronous), and the nodes append on. Every node that had read past what the replica
    holds finds the next entry numbered again (the stream went back): it reports a gap, and its
    replay history is dropped, instead of continuing as if the lost entries had never been."""
    from hub.event import make_event

    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port).start()
    try:
        async with CuttingProxy(redis_server.port) as proxy:
            url = f"redis://{HOST}:{proxy.port}/0"
            async with reading_log(redis_server, 100, url) as (a, got_a, _r), \
                    reading_log(redis_server, 100, url) as (b, got_b, _r2):
                for i in range(5):
                    await a.append(make_event("/t/x", {"i": i}))
                rr = replica.client()
                try:
                    await await_until(lambda: rr.xlen(STREAM) == 5, EVENT_TIMEOUT, "the replica's copy")
                    rr.replicaof("NO", "ONE")  # it follows no more
                    lost = [await a.append(make_event("/t/x", {"i": i})) for i in range(5, 8)]
                    await await_until(lambda: len(got_a) == len(got_b) == 8, EVENT_TIMEOUT)
                    assert rr.xlen(STREAM) == 5 and a.resets == b.resets == 0
                    proxy.switch(replica.port)  # the failover: the nodes now reach the replica
                    after = await append_when_up(b, make_event("/t/x", {"i": 8}))
                    await await_until(lambda: len(got_a) == len(got_b) == 9, EVENT_TIMEOUT)
                finally:
                    rr.close()
                for log, got in ((a, got_a), (b, got_b)):
                    assert log.resets == 1, "the lost entries are reported, once"
                    assert got[-1].cursor == after and log.missed == 0
                    for ack in lost:  # replaying from a lost event: a gap, never a silent one
                        assert ack is not None and await log.locate(cursor=ack.cursor) is None
                    assert await log.locate(cursor=got[2].cursor) is None
    finally:
        replica.stop()


def test_batch_counts_tell_a_gap_and_a_stream_gone_back() -> None:
    """The reader checks each batch's count (on its last entry: the epoch's count N so far and
    the batch's k entries): a batch that begins where the last ended, all of it read, goes on; a
    batch that begins later, or whose first entries were not read, is entries trimmed or deleted
    unread (counted); a batch that begins before the last one's end is a stream gone back. Entries
    of earlier versions carry no count and are not counted; a new epoch is checked from its first
    batch read. An event this node appended that the reader passed without reading is lost to it
    too. Each is one reset: the retained events are dropped."""
    from hub.event import make_event

    log = RedisLog("redis://127.0.0.1:1/0", STREAM, 100)  # not started: entries are handed in
    got: list[Event] = []
    log.tail(got.append)
    ms = 1_700_000_000_000

    def batch(total: int, k: int, epoch: bytes = b"e1", read: int | None = None
              ) -> list[tuple[bytes, list[bytes]]]:
        """The last ``read`` (default: all ``k``) entries of a batch ending the epoch's ``total``."""
        nonlocal ms
        out = []
        for i in range(k):
            ms += 1
            fields = [b"e", make_event("/t/x", {"i": total - k + i + 1}).json, b"g", epoch]
            if i == k - 1:
                fields += [b"n", b"%d %d" % (total, k)]
            out.append((f"{ms}-0".encode(), fields))
        return out[k - (k if read is None else read):]

    def older() -> tuple[bytes, list[bytes]]:  # an entry of an earlier version: no count
        nonlocal ms
        ms += 1
        return f"{ms}-0".encode(), [b"e", make_event("/t/old", {}).json, b"g", b"e1"]

    log._take([*batch(2, 2), older(), *batch(5, 3), *batch(6, 1)], route=True)
    assert (log.resets, log.missed, len(got), len(log.mirror)) == (0, 0, 7, 7)
    foreign = older()  # a count that is not one (not this version's writer): the event all the same
    log._take([(foreign[0], [*foreign[1], b"n", b"x 1"])], route=True)
    assert (log.resets, len(got)) == (0, 8)
    log._take(batch(10, 2), route=True)  # 7 and 8 were removed before they were read
    # (found at the batch's end: what the node kept of the batch before it is dropped too)
    assert (log.resets, log.missed, len(log.mirror)) == (1, 2, 1)
    log._take(batch(13, 3, read=1), route=True)  # 11 and 12 too: the batch's first entries
    assert (log.resets, log.missed, len(log.mirror)) == (2, 4, 1)
    log._take(batch(12, 2), route=True)  # begins after 10, where 13 was read: gone back
    assert (log.resets, log.missed, len(log.mirror)) == (3, 4, 1)
    log._take([*batch(14, 2), *batch(3, 3, b"e2")], route=True)  # a new epoch
    assert (log.resets, len(log.mirror)) == (4, 3)
    log._take(batch(6, 2, b"e2"), route=True)  # checked from its first batch read on
    assert (log.resets, log.missed) == (5, 5)
    mine = make_event("/t/mine", {})
    own_id = f"{ms + 1}-0".encode()
    position, cursor = entry_position(own_id)
    log._own[own_id] = (mine.json[:-38], mine, position, cursor)  # acknowledged, not read yet
    ms += 1
    log._take(batch(7, 1, b"e2"), route=True)  # read past it: its entry is not in the stream
    assert log.resets == 6 and not log._own and len(got) == 21


async def test_appends_of_one_turn_of_the_loop_go_in_one_script_call(redis_server: RedisServer) -> None:
    """The appends queued while the event loop runs one turn (a read of many publishes) are
    sent as one batch: one script call, one round trip and one fsync in Redis."""
    from hub.event import make_event

    async with reading_log(redis_server, 1000) as (log, got, r):
        await log.append(make_event("/t/first", {}))  # connected, nothing in flight
        r.config_resetstat()
        acks = await asyncio.gather(*(log.append(make_event("/t/burst", {"i": i})) for i in range(100)))
        assert all(a is not None for a in acks)
        assert int(r.info("commandstats")["cmdstat_eval"]["calls"]) == 1
        await await_until(lambda: len(got) == 101, EVENT_TIMEOUT, "the burst read back")
        assert [e.payload.get("i") for e in got[1:]] == list(range(100))


async def test_tls_and_a_password_in_the_url(tmp_path: Path) -> None:
    """``rediss://`` with a password: appends and the read back run over TLS (the connections
    redis-py opened, AUTH included, then read by the log), also after Redis closed them."""
    from hub.event import make_event

    server = RedisServer(tmp_path / "tls", tls=True, password="s3cret-pw").start()
    try:
        async with reading_log(server, 1000) as (log, got, r):
            acked = [await log.append(make_event("/t/tls", {"i": i})) for i in range(3)]
            await await_until(lambda: len(got) == 3, EVENT_TIMEOUT, "the events read back over TLS")
            # every connection of the node (appends, reading, the pool's)
            assert int(r.client_kill_filter(skipme=True)) >= 2
            end = time.monotonic() + EVENT_TIMEOUT
            for i in range(3, 6):
                for _ in iter(int, 1):  # the first append may meet the closing connection: a 503
                    try:
                        acked.append(await log.append(make_event("/t/tls", {"i": i})))
                        break
                    except ServiceUnavailable:
                        assert time.monotonic() < end, "appends refused after Redis closed the connections"
                        await asyncio.sleep(0.05)  # a publisher's back-off, not synchronisation
            await await_until(lambda: len(got) == 6, EVENT_TIMEOUT, "the reading to resume over TLS")
            assert [e.cursor for e in got] == [a.cursor for a in acked if a is not None]
            assert [e.payload["i"] for e in got] == list(range(6)) and log.unreadable == 0
            assert "s3cret" not in repr(log) and "s3cret" not in log.where
    finally:
        server.stop()


async def test_a_large_read_back_lets_the_next_read_gather_and_loses_nothing(
        redis_server: RedisServer) -> None:
    """After a read of at least ``COALESCE_AT`` entries (a flood) the next XREAD waits a moment
    so that it takes more at once; it still continues after the last entry read: every event of
    a burst and the lone events after it are read back once, in the stream's order. A lone
    event never waits."""
    from hub.event import make_event
    from plugins.backlog_redis import COALESCE_AT

    log = RedisLog(redis_server.url, STREAM, 100_000)
    got: list[Event] = []
    log.tail(got.append)
    await log.start()
    try:
        # one batch (one script call): the reader sees all of it in one read, or none of it
        burst = await asyncio.gather(*(log.append(make_event("/t/burst", {"i": i}))
                                       for i in range(4 * COALESCE_AT)))
        acked = [a.cursor for a in burst if a is not None]
        await await_until(lambda: len(got) == len(acked), EVENT_TIMEOUT, "the burst read back")
        assert log.coalesced_reads >= 1
        coalesced = log.coalesced_reads
        for i in range(3):  # lone events: small reads, no pause after them
            one = await log.append(make_event("/t/lone", {"i": i}))
            assert one is not None
            acked.append(one.cursor)
            await await_until(lambda: got[-1].cursor == acked[-1], EVENT_TIMEOUT, "a lone event")
        assert log.coalesced_reads == coalesced
        assert [e.cursor for e in got] == acked and len(set(acked)) == len(acked)
        assert [e.payload["i"] for e in got] == [*range(4 * COALESCE_AT), 0, 1, 2]
    finally:
        await log.close()


# -- a node's own entries ---------------------------------------------------------------------------
async def test_own_events_are_reused_at_their_place_in_the_stream_with_its_cursor(
        redis_server: RedisServer) -> None:
    """A node reading back an entry it appended takes the event it built (not a decoded copy),
    given the entry's cursor and position, when its reading reaches that entry: every node
    takes every event once, in the stream's order, its own interleaved with the others'; the
    reused event is the same, byte for byte, as the one the other nodes decode.

    Two nodes' readers are held while the appends are acknowledged (so they read back after
    every reply: each of their own entries must be reused); the third reads all along (its
    replies and its read back race: reused or decoded, the same event either way)."""
    from hub.event import make_event
    from server.tasks import cancel_and_wait

    logs = [RedisLog(redis_server.url, STREAM, 1000) for _ in range(NODES)]
    got: list[list[Event]] = [[] for _ in logs]
    for log, out in zip(logs, got, strict=True):
        log.tail(out.append)
        await log.start()
    held = logs[:2]
    for log in held:  # stop reading (as close() does: the connection of the blocked XREAD too)
        await cancel_and_wait(log._tasks[0])
        assert log._rconn is not None
        await log._rconn.disconnect(nowait=True)
    r = redis_server.client()
    try:
        appended: list[list[Event]] = [[] for _ in logs]
        waves, per_node = 20, 3
        for w in range(waves):  # every node appends in every wave: their entries interleave
            evs = [(i, make_event(f"/t/n{i}", {"w": w, "k": k, "s": "é\"\\"}))
                   for k in range(per_node) for i in range(NODES)]
            for i, ev in evs:
                appended[i].append(ev)
            acks = await asyncio.gather(*(logs[i].append(ev) for i, ev in evs))
            assert all(a is not None for a in acks)
        total = waves * per_node * NODES
        await await_until(lambda: len(got[2]) == total, EVENT_TIMEOUT, "the third node's read back")
        assert not got[0] and not got[1]
        for log in held:  # reading again, after the last entry read (none)
            log._tasks[0] = asyncio.get_running_loop().create_task(log._read_loop())
        await await_until(lambda: all(len(g) == total for g in got), EVENT_TIMEOUT, "every entry read back")
        entries = stream_entries(r, STREAM)
        assert len(entries) == total
        for i, (log, events) in enumerate(zip(logs, got, strict=True)):
            assert log.unreadable == 0 and log.entries_read == total
            mine = {id(ev) for ev in appended[i]}  # alive: ``appended`` holds them
            reused = 0
            for (entry_id, fields), ev in zip(entries, events, strict=True):
                position, cursor = entry_position(entry_id)
                assert (ev.position, ev.cursor, ev.payload["pubsub_cursor"]) == (position, cursor, cursor)
                assert ev.json == fields[b"p"] + cursor.encode() + b'"}'
                assert json.loads(ev.json) == ev.payload
                reused += id(ev) in mine
            assert reused == log.own_reused
            if log in held:
                assert reused == waves * per_node  # every one of its own
            assert not log._own
        # the same events, in the same order, on every node
        for a, b in zip(got[0], got[1], strict=True):
            assert (a.cursor, a.position, a.json, a.topics, a.private, a.path, a.timestamp) == \
                (b.cursor, b.position, b.json, b.topics, b.private, b.path, b.timestamp)
            assert a.payload == b.payload
        assert [e.cursor for e in got[0]] == [e.cursor for e in got[2]]
        assert len({e.cursor for e in got[0]}) == total
    finally:
        r.close()
        for log in logs:
            await log.close()


def test_an_own_event_is_reused_only_for_its_own_bytes_and_once() -> None:
    """The reader reuses an event this node appended only when the entry under that id holds
    the bytes the node sent (after a reset, Redis may give the id to another node's entry) and
    only once (the same event object appended twice is decoded the second time)."""
    from hub.event import make_event

    log = RedisLog("redis://127.0.0.1:1/0", STREAM, 100)  # not started: entries are handed in
    got: list[Event] = []
    log.tail(got.append)
    mine, theirs = make_event("/t/mine", {"k": 1}), make_event("/t/theirs", {"k": 2})
    ids = [b"1700000000000-0", b"1700000000000-1", b"1700000000001-0"]
    for entry_id in ids:  # as the reply to the append does: the event under the id Redis gave
        position, cursor = entry_position(entry_id)
        log._own[entry_id] = (mine.json[:-38], mine, position, cursor)
    log._take([(ids[0], [b"p", theirs.json[:-38], b"g", b"e1"]),  # another's bytes under the id
               (ids[1], [b"p", mine.json[:-38], b"g", b"e1"]),  # this node's: reused
               (ids[2], [b"p", mine.json[:-38], b"g", b"e1"])], route=True)  # the same object again
    assert [e.payload["k"] for e in got] == [2, 1, 1] and log.own_reused == 1
    assert got[0] is not theirs and got[1] is mine and got[2] is not mine
    for entry_id, ev in zip(ids, got, strict=True):
        position, cursor = entry_position(entry_id)
        assert (ev.position, ev.cursor, ev.payload["pubsub_cursor"]) == (position, cursor, cursor)
        assert json.loads(ev.json) == ev.payload
    assert not log._own


async def test_own_events_kept_for_a_reader_far_behind_are_bounded(redis_server: RedisServer) -> None:
    """Events kept for the node's own reader are bounded in bytes (``OWN_BYTES``): past it the
    oldest are forgotten, and their entries decoded as others' are. The reader, held while 20
    MiB are appended, still takes every event once, in the stream's order."""
    from hub.event import make_event
    from plugins.backlog_redis import OWN_BYTES
    from server.tasks import cancel_and_wait

    log = RedisLog(redis_server.url, STREAM, 1000)
    got: list[Event] = []
    log.tail(got.append)
    await log.start()
    try:
        await cancel_and_wait(log._tasks[0])  # the reader held, as in the test above
        assert log._rconn is not None
        await log._rconn.disconnect(nowait=True)
        big = "x" * (1 << 20)
        n = 20
        acked = []
        for w in range(0, n, 4):
            acks = await asyncio.gather(*(log.append(make_event("/t/big", {"i": i, "b": big}))
                                          for i in range(w, w + 4)))
            acked += [a.cursor for a in acks if a is not None]
            assert log._own_bytes <= OWN_BYTES and len(log._own) < n
        assert len(acked) == n and len(log._own) < n
        log._tasks[0] = asyncio.get_running_loop().create_task(log._read_loop())
        await await_until(lambda: len(got) == n, EVENT_TIMEOUT, "every entry read back")
        assert [e.cursor for e in got] == acked and [e.payload["i"] for e in got] == list(range(n))
        assert all(e.payload["pubsub_cursor"] == e.cursor and json.loads(e.json) == e.payload for e in got)
        assert 0 < log.own_reused < n and not log._own
    finally:
        await log.close()
