"""Publishes to a durable log through both lanes: the fast lane answers once the append
completes, in request order, and exactly as aiohttp's handler answers on the same bytes.

Real daemons as subprocesses: SQLite with fsync on, and Redis Streams on a real redis-server
(tests/redis_fixture.py). Each case runs against the fast lane and against aiohttp alone
(``server.fast_lane: false``), and expects the same answers from both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from server.fastlane import MAX_PENDING
from tests.redis_fixture import RedisServer, redis_server
from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    await_until,
    base_config,
    free_port,
    put,
    subscribe,
    wait_subscribers,
)
from tests.test_admin import sample

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

LANES = [True, False]
LANE_IDS = ["fast", "aiohttp"]

#: (status line, headers without Date (lower-case names), body)
Answer = tuple[bytes, dict[bytes, bytes], bytes]


def req(target: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def pub(target: bytes, i: int) -> bytes:
    return req(target, json.dumps({"i": i}).encode())


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines)}
    headers.pop(b"date", None)
    n = int(headers.get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(n), timeout) if n else b""
    return status, headers, body


async def exchange(port: int, data: bytes, answers: int, timeout: float = 10.0) -> list[Answer]:
    """Send ``data`` in one write; read ``answers`` responses from that connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_answer(reader, timeout) for _ in range(answers)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def unread_by(port: int) -> int:
    """Bytes the kernel holds unread for the listener on loopback ``port`` (its accepted
    connections' receive queues, from /proc/net/tcp): what a stopped Redis has been sent."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # ESTABLISHED
            total += int(queues.split(":")[1], 16)
    return total


def statuses(answers: list[Answer]) -> list[int]:
    return [int(a[0].split(b" ")[1]) for a in answers]


def sqlite_config(port: int, path: Path, fast: bool) -> dict[str, Any]:
    return base_config(port, fast_lane=fast, backlog={"size": 5000, "storage": str(path), "fsync": True})


def redis_config(port: int, url: str, fast: bool, timeout: str = "1s") -> dict[str, Any]:
    return base_config(port, fast_lane=fast, ping_interval="0.2", backlog={
        "size": 1000, "max_age": 0, "storage": url, "stream": "pubsub-async", "timeout": timeout})


def sqlite_daemon(factory: DaemonFactory, tmp_path: Path, fast: bool) -> Daemon:
    port = free_port()
    return factory(config=sqlite_config(port, tmp_path / f"backlog-{fast}.db", fast), port=port)


async def events(d: Daemon, path: str, n: int, send: bytes, answers: int) -> tuple[list[Answer], list[int]]:
    """Subscribe to ``path``, send ``send`` in one write, read ``answers`` answers, then the
    ``"i"`` of the first ``n`` events delivered."""
    async with subscribe(d.url, path) as sub:
        await wait_subscribers(d.url, 1)
        got = await exchange(d.port, send, answers)
        delivered = [(await sub.next(10))["i"] for _ in range(n)]
    await wait_subscribers(d.url, 0)
    return got, delivered


# -- SQLite, fsync on ---------------------------------------------------------------------------
@pytest.mark.parametrize("fast", LANES, ids=LANE_IDS)
async def test_pipelined_publishes_to_sqlite_answered_in_order(
        daemon_factory: DaemonFactory, tmp_path: Path, fast: bool) -> None:
    """More pipelined publishes than a connection may have pending: every one answered 202 in
    order, delivered in order; a request aiohttp must answer (bad JSON) comes after the 202s
    before it, and a publish after that is answered too."""
    d = sqlite_daemon(daemon_factory, tmp_path, fast)
    n = 300
    data = b"".join(pub(b"/pipe", i) for i in range(n)) + req(b"/pipe", b"{nope") + pub(b"/pipe", n)
    got, delivered = await events(d, "/pipe", n + 1, data, n + 2)
    assert statuses(got) == [202] * n + [400] + [202]
    assert b"invalid JSON" in got[n][2] or got[n][2].count(b"\n") == 1, got[n]
    assert delivered == list(range(n + 1))


@pytest.mark.parametrize("fast", LANES, ids=LANE_IDS)
async def test_subscription_pipelined_behind_pending_publishes(
        daemon_factory: DaemonFactory, tmp_path: Path, fast: bool) -> None:
    """PUT, PUT, GET on one connection in one write: two 202s, then the stream's head; the
    stream then carries later events."""
    d = sqlite_daemon(daemon_factory, tmp_path, fast)
    reader, writer = await asyncio.open_connection(HOST, d.port)
    try:
        writer.write(pub(b"/s", 0) + pub(b"/s", 1) + b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        first = [await read_answer(reader) for _ in range(2)]
        assert statuses(first) == [202, 202]
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
        await wait_subscribers(d.url, 1)
        await put(d, "/s", {"i": 2})
        buf = b""
        while b'"i":2' not in buf:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, buf
            buf += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_both_lanes_answer_a_durable_publish_alike(daemon_factory: DaemonFactory,
                                                         tmp_path: Path) -> None:
    a, b = (sqlite_daemon(daemon_factory, tmp_path, fast) for fast in LANES)
    for data in (pub(b"/t", 1), req(b"/t", b'{"k": 1}', b"User-Agent: curl/8\r\nAccept: */*\r\n")):
        assert await exchange(a.port, data, 1) == await exchange(b.port, data, 1)


async def test_publisher_that_leaves_loses_nothing_sqlite(daemon_factory: DaemonFactory,
                                                          tmp_path: Path) -> None:
    """A publisher closes its connection right after pipelining its publishes: every event
    the daemon read is kept and delivered, and the daemon keeps serving."""
    d = sqlite_daemon(daemon_factory, tmp_path, True)
    n = 200
    async with subscribe(d.url, "/gone") as sub:
        await wait_subscribers(d.url, 1)
        _, writer = await asyncio.open_connection(HOST, d.port)
        writer.write(b"".join(pub(b"/gone", i) for i in range(n)))
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await put(d, "/gone", {"i": n})
        assert sorted([(await sub.next(10))["i"] for _ in range(n + 1)]) == list(range(n + 1))


# -- Redis Streams ------------------------------------------------------------------------------
def redis_pair(factory: DaemonFactory, url: str, timeout: str = "1s") -> dict[str, Daemon]:
    out = {}
    for fast, name in zip(LANES, LANE_IDS, strict=True):
        port = free_port()
        out[name] = factory(config=redis_config(port, url, fast, timeout), port=port, name=name)
    return out


async def test_redis_pipelined_publishes_in_order_and_outage_answered_as_aiohttp(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = redis_pair(daemon_factory, redis_server.url)
    n = 100
    for lane, d in nodes.items():
        got, delivered = await events(d, f"/r/{lane}", n, b"".join(pub(f"/r/{lane}".encode(), i)
                                                                  for i in range(n)), n)
        assert statuses(got) == [202] * n, lane
        assert delivered == list(range(n)), lane
    redis_server.pause()  # hung: every append times out (1 s)
    try:
        outage = {lane: await exchange(d.port, pub(b"/r", 0) + pub(b"/r", 1) + pub(b"/r", 2), 3)
                  for lane, d in nodes.items()}
    finally:
        redis_server.resume()
    # the same answers, but for the reason's words: the fast lane hands the log all three
    # appends at once (all sent to the hung Redis: "it may be stored"); aiohttp hands it one at
    # a time, the next after the last was answered (by then the connection to the hung Redis is
    # given up: the next may be refused unsent, "event not stored")
    def without_reason(answers: list[Answer]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return [(st, {k: v for k, v in h.items() if k != b"content-length"}) for st, h, _b in answers]

    assert without_reason(outage["fast"]) == without_reason(outage["aiohttp"])
    for lane, answers in outage.items():
        assert statuses(answers) == [503] * 3
        for i, (_st, headers, body) in enumerate(answers):
            assert headers[b"retry-after"] == b"1"
            assert body.endswith(b"\n") and body.count(b"\n") == 1, body
            sent = i == 0 or lane == "fast"
            assert b"may be stored" in body if sent else b"stored" in body, body
    for d in nodes.values():  # Redis is back: publishing works again on both lanes
        d.wait_log("Redis is reachable again", timeout=15)
        assert statuses(await exchange(d.port, pub(b"/r", 9), 1)) == [202]


async def test_redis_publisher_that_leaves_while_pending_loses_nothing(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """Redis hung while a publisher's appends are pending; the publisher leaves; Redis comes
    back within the timeout: every event is appended and delivered, nothing crashes."""
    port = free_port()
    d = daemon_factory(config=redis_config(port, redis_server.url, True, timeout="30s"), port=port)
    n = 5
    async with subscribe(d.url, "/left") as sub:
        await wait_subscribers(d.url, 1)
        redis_server.pause()
        try:
            _, writer = await asyncio.open_connection(HOST, d.port)
            writer.write(b"".join(pub(b"/left", i) for i in range(n)))
            await writer.drain()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            d.wait_log(f"left with {n} publish(es) unanswered")
        finally:
            redis_server.resume()
        assert [(await sub.next(15))["i"] for _ in range(n)] == list(range(n))
    await put(d, "/left", {"i": n})
    r = redis_server.client()
    try:
        assert r.xlen("pubsub-async") == n + 1
    finally:
        r.close()


async def test_shutdown_answers_pending_publishes_before_closing(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """SIGTERM while appends are pending (Redis hung): the publisher still gets its answers
    (503: not stored) before the connection closes; the daemon exits 0."""
    port = free_port()
    d = daemon_factory(config=redis_config(port, redis_server.url, True, timeout="2s"), port=port)
    redis_server.pause()
    try:
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            writer.write(pub(b"/bye", 0) + pub(b"/bye", 1))
            await writer.drain()
            await await_until(lambda: unread_by(redis_server.port) >= 2 * len(pub(b"/bye", 0)), 10,
                              "the appends to reach the hung Redis")
            d.signal(signal.SIGTERM)
            got = [await read_answer(reader, 15) for _ in range(2)]
            assert await asyncio.wait_for(reader.read(), 15) == b""  # then closed
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        redis_server.resume()
    assert statuses(got) == [503, 503]
    assert d.proc is not None and d.proc.wait(15) == 0


async def test_a_pipelining_publisher_is_not_read_past_the_pending_bound(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """Redis hung: a publisher pipelines far more publishes than a connection may have
    pending. The daemon stops reading it (its bytes wait in the kernel), its pending appends
    stay bounded; once Redis answers, every publish is answered 202, in order, and delivered."""
    port = free_port()
    cfg = redis_config(port, redis_server.url, True, timeout="30s")
    cfg["server"]["admin"] = {"port": free_port(), "bind": HOST}
    d = daemon_factory(config=cfg, port=port)
    first, more = 100, 400
    assert first > MAX_PENDING
    async with subscribe(d.url, "/bound") as sub:
        await wait_subscribers(d.url, 1)
        redis_server.pause()
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            try:
                writer.write(b"".join(pub(b"/bound", i) for i in range(first)))
                await writer.drain()
                end = asyncio.get_running_loop().time() + 10
                while (pending := await sample(d, "pypubsub_publish_pending")) < MAX_PENDING:
                    assert asyncio.get_running_loop().time() < end, pending
                    await asyncio.sleep(0.02)
                rest = b"".join(pub(b"/bound", i) for i in range(first, first + more))
                writer.write(rest)
                await writer.drain()
                # not read: the bytes sent after the bound wait in the daemon's receive queue
                await await_until(lambda: unread_by(d.port) >= len(rest), 10,
                                  "the daemon to stop reading the publisher")
                assert MAX_PENDING <= await sample(d, "pypubsub_publish_pending") <= first
            finally:
                redis_server.resume()
            got = [await read_answer(reader, 30) for _ in range(first + more)]
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert statuses(got) == [202] * (first + more)
        assert [(await sub.next(15))["i"] for _ in range(first + more)] == list(range(first + more))
