"""Replay pacing through the real daemon: a big replay to a subscriber that reads slowly is paced
by its connection's flow control (the transport's pause_writing / resume_writing), not by a
timer, on both lanes and in two formats; gap-free; a subscriber leaving mid-replay is freed.

The fast lane's own side (no replay is served there today: a replay request is handed to
aiohttp, behind the Gate) is checked in process, on a real fast-lane listener: a fast-lane
stream's wait woken by resume_writing and by connection_lost, and a connection handed to aiohttp
while its writing is paused.

The slow reader is a raw socket with a small receive buffer that reads in small steps, so the
daemon's send buffer fills: the replay must wait for the connection to resume writing. With
``server.stream_buffer`` at its minimum the backlog is 100 times the buffer: a replay that did
not wait would overflow it and be cut off; one that waited on something that never wakes
would stall (the test's deadline). ``pypubsub_replay_pauses_total`` counts the waits that the
connection's ``resume_writing()`` ended: a timer-paced replay leaves it at 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.app import STATE, State, build_app
from server.config import parse_config
from server.fastlane import HOLD_WRITE, FastLane, FastLaneSite
from server.gate import Gate
from server.stream import Stream
from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    await_until,
    base_config,
    free_port,
    subscribe,
    wait_subscribers,
)
from tests.test_admin import sample

#: events retained and replayed, and each one's filler: ~8 MB, more than the kernel's send buffer
#: takes (4 MB at most here) and 100 times the stream's buffer
BACKLOG = 3000
BLOB = "x" * 2500
#: the smallest server.stream_buffer the configuration allows
STREAM_BUFFER = 65536
#: the slow reader's receive buffer and step
RCVBUF = 4096
STEP = 4096

#: (fast lane on?, request) per case; the replay itself is aiohttp's on both listeners (the fast
#: lane hands a replay request over through the Gate), the request's head differs
CASES = {
    "fast-ndjson": (True, b"GET /p HTTP/1.1\r\nHost: x\r\nX-Fetch-Since-Cursor: %s\r\n\r\n"),
    "fast-svnpubsub": (True, b"GET /p HTTP/1.0\r\nX-Fetch-Since-Cursor: %s\r\n\r\n"),
    "aiohttp-ndjson": (False, b"GET /p HTTP/1.1\r\nHost: x\r\nX-Fetch-Since-Cursor: %s\r\n\r\n"),
    "aiohttp-svnpubsub": (False, b"GET /p HTTP/1.0\r\nX-Fetch-Since-Cursor: %s\r\n\r\n"),
}


def pacing_daemon(factory: DaemonFactory, fast_lane: bool, tmp_path: Path | None = None) -> Daemon:
    port = free_port()
    backlog: dict[str, Any] = {"size": BACKLOG * 2}
    if tmp_path is not None:
        backlog.update(storage=str(tmp_path / "pacing.db"), fsync=False)
    cfg = base_config(port, stream_buffer=STREAM_BUFFER, fast_lane=fast_lane, backlog=backlog,
                      admin={"port": free_port(), "bind": HOST})
    return factory(config=cfg, port=port)


async def publish_range(d: Daemon, start: int, stop: int) -> None:
    sem = asyncio.Semaphore(16)

    async def put(s: aiohttp.ClientSession, n: int) -> None:
        async with sem, s.put(d.url + "/p/t", data=json.dumps({"n": n, "blob": BLOB})) as r:
            assert r.status == 202, await r.text()

    async with aiohttp.ClientSession() as s:
        for n in range(start, stop):  # one after the other: their cursors are in this order
            await put(s, n)


async def first_cursor(d: Daemon) -> str:
    async with subscribe(d.url, "/p", headers={"X-Fetch-Since": "0"}) as sub:
        return str((await sub.next())["pubsub_cursor"])


class SlowReader:
    """A subscriber on a raw socket with a small receive buffer, read a step at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.setblocking(False)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.head = b""

    async def open(self, port: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, (HOST, port))
        await loop.sock_sendall(self.sock, request)

    async def step(self) -> bool:
        """Read at most STEP bytes (False: the stream ended); parse the complete records."""
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, STEP), 30)
        if not data:
            return False
        buf = self.buf + data
        if not self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return True
            self.head, buf = buf[:end], buf[end + 4:]
        # NDJSON chunks are "size\r\n{...}\n\r\n", svnpubsub records "{...}\n\0": a record is a
        # line that starts with "{" (the filler holds no newline)
        *lines, self.buf = buf.split(b"\n")
        for line in lines:
            line = line.strip(b"\r\0")
            if line.startswith(b"{"):
                obj = json.loads(line)
                if "stillalive" not in obj:
                    self.events.append(obj)
        return True

    async def raw(self) -> bytes:
        """The next bytes received, unparsed (b"" never: the stream must not end here)."""
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 1 << 16), 30)
        assert data, "the connection was closed"
        return data

    async def read_events(self, n: int) -> None:
        """Read until ``n`` events arrived, slowly: the daemon's send buffer fills."""
        while len(self.events) < n:
            assert await self.step(), f"stream ended after {len(self.events)} events"
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_slow_reader_replay_is_paced_by_the_connection_and_gap_free(
        daemon_factory: DaemonFactory, case: str) -> None:
    fast_lane, request = CASES[case]
    d = pacing_daemon(daemon_factory, fast_lane)
    await publish_range(d, 0, BACKLOG)
    cursor = await first_cursor(d)
    pauses_before = await sample(d, "pypubsub_replay_pauses_total")
    reader = SlowReader()
    live = 20
    try:
        await reader.open(d.port, request % cursor.encode())
        while not reader.events:
            assert await reader.step(), "stream ended before the first event"
        # the replay is under way (and waiting on this reader): live events arrive meanwhile
        await publish_range(d, BACKLOG, BACKLOG + live)
        await reader.read_events(BACKLOG - 1 + live)
    finally:
        reader.close()
    assert reader.head.split(b"\r\n")[0].endswith(b" 200 OK"), reader.head[:80]
    assert b"X-Fetch-Since-Cursor-Found: true" in reader.head
    ns = [e["n"] for e in reader.events]
    assert ns == list(range(1, BACKLOG + live)), "gap, duplicate or reordering"
    pauses = await sample(d, "pypubsub_replay_pauses_total") - pauses_before
    assert pauses > 0, "the replay never waited for the connection to resume writing"
    assert await sample(d, "pypubsub_disconnects_total", reason="overflow") == 0
    assert "disconnecting slow subscriber" not in d.log()


@pytest.mark.parametrize("storage", [False, True], ids=["memory", "sqlite"])
async def test_big_replay_from_either_log_is_paced(daemon_factory: DaemonFactory, tmp_path: Path,
                                                   storage: bool) -> None:
    d = pacing_daemon(daemon_factory, True, tmp_path if storage else None)
    await publish_range(d, 0, BACKLOG)
    cursor = await first_cursor(d)
    reader = SlowReader()
    try:
        await reader.open(d.port, CASES["fast-ndjson"][1] % cursor.encode())
        await reader.read_events(BACKLOG - 1)
    finally:
        reader.close()
    assert [e["n"] for e in reader.events] == list(range(1, BACKLOG))
    assert await sample(d, "pypubsub_replay_pauses_total") > 0


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast", "aiohttp"])
async def test_subscriber_leaving_mid_replay_is_freed(daemon_factory: DaemonFactory,
                                                      fast_lane: bool) -> None:
    d = pacing_daemon(daemon_factory, fast_lane)
    await publish_range(d, 0, BACKLOG)
    cursor = await first_cursor(d)
    await wait_subscribers(d.url, 0)
    reader = SlowReader()
    try:
        await reader.open(d.port, CASES["fast-ndjson"][1] % cursor.encode())
        await reader.read_events(10)
        await wait_subscribers(d.url, 1)
        # nothing reads it any more: the replay waits for this connection to resume writing
        await wait_metric(d, "pypubsub_replays_paused", 1)
    finally:
        reader.close()  # unread bytes: the kernel resets the connection
    # the waiting replay is woken by the connection's loss, the stream ends and is forgotten
    await wait_subscribers(d.url, 0)
    await wait_metric(d, "pypubsub_replays_paused", 0)
    assert await sample(d, "pypubsub_disconnects_total", reason="client") >= 1
    assert await sample(d, "pypubsub_replay_pauses_total") == 0  # not woken as if resumed
    assert d.stop() == 0
    log = d.log()
    for bad in ("Task was destroyed", "never retrieved", "Traceback", "socket.send() raised"):
        assert bad not in log, log[-3000:]


async def wait_metric(d: Daemon, name: str, value: float) -> None:
    async def reached() -> bool:
        return await sample(d, name) == value
    end = asyncio.get_running_loop().time() + 10
    while not await reached():
        assert asyncio.get_running_loop().time() < end, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


# -- the fast lane's side, in process: a fast-lane stream's connection paces a drain --------------
#: bytes written at once to a fast-lane stream's connection: more than the kernel takes
FLOOD = 8 * 1024 * 1024


@contextlib.asynccontextmanager
async def fast_lane_site() -> AsyncIterator[tuple[FastLaneSite, State]]:
    """The real application behind a real fast-lane listener on a free loopback port."""
    config = parse_config(base_config(0), "test.yaml")
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = FastLaneSite(runner, HOST, 0, app[STATE])
    try:
        await site.start()
        yield site, app[STATE]
    finally:
        await runner.cleanup()


async def fast_stream(site: FastLaneSite, reader: SlowReader) -> tuple[FastLane, Stream]:
    await reader.open(site.port, b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    lane = site.lane
    assert lane is not None

    def the_stream() -> tuple[FastLane, Stream] | None:
        for conn in lane.conns:
            if conn.stream is not None:
                return conn, conn.stream
        return None
    found = await await_until(the_stream, what="a fast-lane stream")
    return found  # type: ignore[no-any-return]


def flood(stream: Stream) -> None:
    """Write FLOOD bytes of chunks to the stream's connection at once (past its high-water mark)."""
    assert stream.transport is not None
    flood_transport(stream.transport)


def flood_transport(t: asyncio.Transport) -> None:
    chunk = b"x" * 65535
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    t.write(frame * (FLOOD // len(frame)))


async def test_fast_lane_stream_drain_is_woken_by_resume_writing() -> None:
    async with fast_lane_site() as (site, state):
        reader = SlowReader()
        try:
            conn, stream = await fast_stream(site, reader)
            lane = conn.lane
            assert conn.write_resumed() is None  # not paused: nothing to wait for, nothing made
            assert not lane.resumed
            flood(stream)
            resumed = conn.write_resumed()
            assert resumed is not None and not resumed.done()
            assert conn.write_resumed() is resumed  # one waiter per paused connection
            drain = asyncio.get_running_loop().create_task(stream.drain())
            await await_until(lambda: state.stats.paused == 1, what="the drain to wait")
            while not drain.done():  # the reader takes the flood: the connection resumes writing
                assert await reader.step()
                reader.buf = b""
            assert drain.result() is True
            assert state.stats.resumed == 1 and state.stats.paused == 0
            assert not lane.resumed  # dropped once resolved: an idle stream carries none
            assert conn.write_resumed() is None
        finally:
            reader.close()


async def test_fast_lane_stream_drain_is_woken_by_connection_lost() -> None:
    async with fast_lane_site() as (site, state):
        reader = SlowReader()
        try:
            conn, stream = await fast_stream(site, reader)
            flood(stream)
            drain = asyncio.get_running_loop().create_task(stream.drain())
            await await_until(lambda: state.stats.paused == 1, what="the drain to wait")
        finally:
            reader.close()  # unread bytes: the kernel resets the connection
        assert await asyncio.wait_for(drain, 10) is False
        assert state.stats.resumed == 0 and state.stats.paused == 0
        assert not conn.lane.resumed
        await await_until(lambda: stream not in state.streams, what="the stream to be forgotten")


#: a 202 answer to a publish, roughly (Date and Server included)
ANSWER_202 = b"x" * 160
#: how aiohttp's answer to ``HEAD /`` starts
HEAD_ANSWER = b"HTTP/1.1 204 No Content\r\n"


async def test_connection_handed_to_aiohttp_while_paused_keeps_its_flow_control() -> None:
    """A publisher connection whose answers filled its send buffer (writing paused) and whose
    read ends with a request the fast lane hands to aiohttp: aiohttp's handler starts paused as
    the transport is (its resume then matches a pause), and the connection is read again."""
    async with fast_lane_site() as (site, _state):
        lane = site.lane
        assert lane is not None
        reader = SlowReader()
        try:
            pub = b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            await reader.open(site.port, pub)
            while b"202 Accepted" not in reader.buf and b"202 Accepted" not in reader.head:
                assert await reader.step()
            conn = next(iter(lane.conns))
            t = conn.transport
            assert t is not None
            # the kernel's send buffer full and FLOOD bytes queued, still under the high-water
            # mark (still read); the mark is then set just above what is queued
            t.set_write_buffer_limits(high=2 * FLOOD)
            flood_transport(t)
            queued = t.get_write_buffer_size()
            assert queued > 0 and not conn.held & HOLD_WRITE
            t.set_write_buffer_limits(high=queued + 500 * len(ANSWER_202))
            # one read: 600 publishes whose answers pass the mark (writing pauses after 500),
            # then a HEAD, which the fast lane hands to aiohttp with writing paused
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(reader.sock, pub * 600 + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            await await_until(lambda: lane.handed_over == 1, what="the hand-over")
            gate = t.get_protocol()
            assert isinstance(gate, Gate) and gate.handler is not None
            assert gate.handler.writing_paused, "aiohttp's handler does not know writing is paused"
            # everything is taken; the connection is read again: a second HEAD is answered too
            seen = b""
            while seen.count(HEAD_ANSWER) < 1:
                seen = seen[-64:] + await reader.raw()
            await loop.sock_sendall(reader.sock, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            while seen.count(HEAD_ANSWER) < 2:
                seen += await reader.raw()
        finally:
            reader.close()
