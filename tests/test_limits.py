"""Connection limits, the request-head deadline and the file-descriptor limit, on the real
daemon: fast lane, aiohttp only, and TLS (which aiohttp serves) must count and answer alike."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from server.limits import AcceptErrorLog, HeadScan, Limits
from tests.support import HOST, Daemon, base_config, free_port

DaemonFactory = Callable[..., Daemon]
LANES = ["fast", "aiohttp", "tls"]


class Conn:
    """A raw client connection (optionally TLS), closed with wait_closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def head(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


class Target:
    """Where a test connects: a daemon and, for TLS, its TLS port and client context."""

    def __init__(self, daemon: Daemon, port: int, ctx: ssl.SSLContext | None) -> None:
        self.daemon = daemon
        self.port = port
        self.ctx = ctx

    async def connect(self) -> Conn:
        if self.ctx is None:
            r, w = await asyncio.open_connection(HOST, self.port)
        else:
            r, w = await asyncio.open_connection(HOST, self.port, ssl=self.ctx, server_hostname=HOST)
        return Conn(r, w)


def make_target(factory: DaemonFactory, tmp_path: Path, lane: str, **server: Any) -> Target:
    port = free_port()
    cfg = base_config(port, fast_lane=lane == "fast", **server)
    ctx = None
    if lane == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert(HOST)
        tmp_path.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert_path.write_bytes(cert.cert_chain_pems[0].bytes())
        key_path.write_bytes(cert.private_key_pem.bytes())
        tls_port = free_port()
        cfg["server"]["tls"] = {"port": tls_port, "cert": str(cert_path), "key": str(key_path)}
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
    d = factory(config=cfg, port=port)
    return Target(d, tls_port if ctx is not None else port, ctx)


def put_bytes(path: bytes, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


async def publish_on(conn: Conn, path: bytes, obj: dict[str, Any]) -> None:
    """A publish on a keep-alive connection; requires the 202 and reads its whole answer."""
    conn.writer.write(put_bytes(path, obj))
    head = await conn.head()
    assert head.startswith(b"HTTP/1.1 202"), head
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                  if h.lower().startswith(b"content-length:"))
    await asyncio.wait_for(conn.reader.readexactly(length), 5)


async def open_stream(target: Target, path: bytes) -> Conn:
    c = await target.connect()
    c.writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    head = await c.head()
    assert head.startswith(b"HTTP/1.1 200"), head
    return c


async def next_event(conn: Conn, timeout: float = 5.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        line = await asyncio.wait_for(conn.reader.readline(), max(end - time.monotonic(), 0.01))
        assert line, "stream ended"
        if line.startswith(b"{"):
            obj: dict[str, Any] = json.loads(line)
            if "stillalive" not in obj:
                return obj


async def refused(target: Target, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Send ``request`` on a new connection; the answer's status line, headers (Date left out)
    and body, then the connection must be closed by the daemon."""
    c = await target.connect()
    try:
        c.writer.write(request)
        head = await c.head()
        status, *lines = head[:-4].split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines)}
        headers.pop(b"date", None)
        body = await asyncio.wait_for(c.reader.read(), 5)  # to EOF: the daemon closes
        return status, headers, body
    finally:
        await c.close()


@contextlib.asynccontextmanager
async def conns() -> AsyncIterator[list[Conn]]:
    held: list[Conn] = []
    try:
        yield held
    finally:
        for c in held:
            await c.close()


async def wait_admitted(target: Target, timeout: float = 10.0) -> None:
    """Poll (new connections) until a publish is accepted again."""
    end = time.monotonic() + timeout
    while True:
        c = await target.connect()
        try:
            c.writer.write(put_bytes(b"/probe", {"probe": 1}))
            try:
                head = await c.head()
            except (asyncio.IncompleteReadError, ConnectionError):
                head = b""
        finally:
            await c.close()
        if head.startswith(b"HTTP/1.1 202"):
            return
        assert time.monotonic() < end, f"still refused: {head!r}"
        await asyncio.sleep(0.05)


EXPECTED_503 = {b"server", b"content-type", b"content-length", b"retry-after", b"connection"}


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_ip"])
async def test_over_the_limit_is_503_in_every_lane_and_streams_go_on(
        daemon_factory: DaemonFactory, tmp_path: Path, limit: str) -> None:
    answers = {}
    for lane in LANES:
        t = make_target(daemon_factory, tmp_path / lane, lane, **{limit: 3})
        async with conns() as held:
            held.append(await t.connect())  # a keep-alive publisher
            await publish_on(held[0], b"/lim", {"i": 0})
            held.append(await open_stream(t, b"/lim"))
            held.append(await open_stream(t, b"/lim"))
            # the fourth connection: a subscription and a publish are both refused
            for req in (b"GET /lim HTTP/1.1\r\nHost: x\r\n\r\n", put_bytes(b"/lim", {"no": 1})):
                status, headers, body = await refused(t, req)
                assert status == b"HTTP/1.1 503 Service Unavailable", (lane, status)
                assert set(headers) == EXPECTED_503, headers
                assert headers[b"retry-after"] == b"5" and headers[b"connection"] == b"close"
                assert body.endswith(b"try again later\n") and body.count(b"\n") == 1, body
                answers[lane] = (status, headers, body)
            # the connected subscribers are unaffected
            await publish_on(held[0], b"/lim", {"i": 1})
            for s in held[1:]:
                assert (await next_event(s))["i"] == 1
            await held.pop().close()
            await wait_admitted(t)  # a slot freed: new connections are served again
    assert answers["fast"] == answers["aiohttp"] == answers["tls"]


@pytest.mark.parametrize("lane", LANES)
async def test_a_websocket_over_the_limit_is_closed_with_1013(daemon_factory: DaemonFactory,
                                                              tmp_path: Path, lane: str) -> None:
    t = make_target(daemon_factory, tmp_path / lane, lane, max_connections=1, ping_interval=0.5)
    scheme = "wss" if t.ctx is not None else "ws"
    async with conns() as held:
        held.append(await open_stream(t, b"/ws"))
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(f"{scheme}://{HOST}:{t.port}/ws", ssl=t.ctx or False) as ws:
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data, msg.extra) == (
                aiohttp.WSMsgType.CLOSE, 1013, "too many connections: try again later")
        assert (await asyncio.wait_for(held[0].reader.readline(), 5))  # the stream goes on


@pytest.mark.parametrize("lane", LANES)
async def test_a_slow_request_head_is_closed(daemon_factory: DaemonFactory, tmp_path: Path,
                                             lane: str) -> None:
    """A client trickling its head, a byte at a time, is closed at header_timeout (a total:
    the bytes do not extend it); a stream whose head came in time outlives the timeout."""
    t = make_target(daemon_factory, tmp_path / lane, lane, header_timeout=1, ping_interval=0.2)
    stream = await open_stream(t, b"/slow")
    slow = await t.connect()
    try:
        started = time.monotonic()
        closed_after = None
        for b in b"GET /slow HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"x" * 200:
            slow.writer.write(bytes([b]))
            with contextlib.suppress(ConnectionError):
                await slow.writer.drain()
            try:
                got = await asyncio.wait_for(slow.reader.read(1), 0.1)
            except TimeoutError:  # (this wait paces the trickle: 10 bytes a second)
                continue
            except (ConnectionError, ssl.SSLError):
                got = b""
            assert got == b"", got  # no answer: only a close
            closed_after = time.monotonic() - started
            break
        assert closed_after is not None, "a trickling head was never closed"
        assert closed_after < 10, closed_after
        # the stream whose head was complete in time is still served, pings included
        assert (await asyncio.wait_for(stream.reader.readline(), 5))
    finally:
        await slow.close()
        await stream.close()


async def test_a_silent_connection_is_closed(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    t = make_target(daemon_factory, tmp_path, "fast", header_timeout=1)
    c = await t.connect()
    try:
        assert await asyncio.wait_for(c.reader.read(), 10) == b""
    finally:
        await c.close()


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_at_the_descriptor_limit_open_streams_are_served_and_new_ones_refused(
        daemon_factory: DaemonFactory, lane: str) -> None:
    """The daemon runs with 100 descriptors: connections beyond ``100 - FD_RESERVE`` are answered
    503 (never hung nor dropped), open streams get their events, the log says so a bounded number
    of times, and once connections close new ones are served."""
    port = free_port()
    d = daemon_factory(config=base_config(port, fast_lane=lane == "fast"), port=port, nofile=100)
    t = Target(d, port, None)
    async with conns() as held, conns() as extra:
        held.append(await t.connect())
        await publish_on(held[0], b"/fd", {"i": 0})
        held.append(await open_stream(t, b"/fd"))
        answers: list[bytes] = []
        for _ in range(200):
            c = await t.connect()
            extra.append(c)
            c.writer.write(b"GET /fd HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await c.head()
            if head.startswith(b"HTTP/1.1 503"):
                answers.append(head)
                if len(answers) >= 30:
                    break
            else:
                assert head.startswith(b"HTTP/1.1 200"), head
        assert len(answers) >= 30, "never refused"
        await publish_on(held[0], b"/fd", {"i": 1})
        assert (await next_event(held[1]))["i"] == 1
        lines = [ln for ln in d.log().splitlines() if "refusing new connections (503): descriptor" in ln]
        assert 1 <= len(lines) <= 2, lines
        assert "Traceback" not in d.log()
        for c in extra:
            await c.close()
        extra.clear()
        await wait_admitted(t)
        await publish_on(held[0], b"/fd", {"i": 2})
        assert (await next_event(held[1]))["i"] == 2


async def test_limits_are_counted_in_the_metrics(daemon_factory: DaemonFactory) -> None:
    from tests.test_admin import sample, wait_sample

    port = free_port()
    cfg = base_config(port, max_connections=2, header_timeout=1,
                      admin={"port": free_port(), "bind": HOST})
    d = daemon_factory(config=cfg, port=port)
    t = Target(d, port, None)
    async with conns() as held:
        held.append(await open_stream(t, b"/m"))
        silent = await t.connect()
        held.append(silent)
        await wait_sample(d, "pypubsub_connections", 2)
        status, _, _ = await refused(t, b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503")
        assert await asyncio.wait_for(silent.reader.read(), 10) == b""  # header_timeout
        await wait_sample(d, "pypubsub_header_timeouts_total", 1)
        await wait_sample(d, "pypubsub_connections", 1)
        assert await sample(d, "pypubsub_connections_refused_total", reason="max_connections") == 1
        assert await sample(d, "pypubsub_connections_refused_total", reason="file_descriptors") == 0
        assert await sample(d, "pypubsub_accept_errors_total") == 0
        assert await sample(d, "pypubsub_disconnects_total", reason="limit") == 0  # no stream cut


# -- pure parts ----------------------------------------------------------------------------------
def test_per_address_counts_are_forgotten_when_connections_close() -> None:
    lim = Limits(max_total=0, max_per_ip=2)
    for i in range(1000):
        assert lim.admit(f"10.0.{i // 256}.{i % 256}", 10) is None
    assert lim.admit("10.0.0.0", 10) is None
    assert lim.admit("10.0.0.0", 10) is not None
    assert lim.refused["max_connections_per_ip"] == 1
    lim.release("10.0.0.0")
    for i in range(1000):
        lim.release(f"10.0.{i // 256}.{i % 256}")
    assert lim.per_ip == {} and lim.open == 0


def test_total_limit_and_descriptor_ceiling() -> None:
    lim = Limits(max_total=2)
    assert lim.admit("a", 5) is None and lim.admit("b", 6) is None
    assert lim.admit("c", 7) == "too many connections: try again later"
    assert lim.admit("c", lim.fd_ceiling) == "out of file descriptors: try again later"
    assert lim.open == 2 and lim.refused == {"max_connections": 1, "max_connections_per_ip": 0,
                                             "file_descriptors": 1}


@pytest.mark.parametrize(("chunks", "done"), [
    ([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], True),
    ([b"GET / HTTP/1.1\r\nHost: x\r", b"\n", b"\r", b"\n"], True),
    ([b"\r\n\r\n\r\n"], False),  # blank lines before a request line are not a head
    ([b"\r\n", b"GET / HTTP/1.1\r\n", b"\r\n"], True),
    ([b"GET / HTTP/1.1\r\nHost: x\r\n"], False),
])
def test_head_scan(chunks: list[bytes], done: bool) -> None:
    scan = HeadScan()
    assert [scan.feed(c) for c in chunks][-1] is done


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio reports every failed accept at the descriptor limit (hundreds a second)."""
    lim = Limits()
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(AcceptErrorLog(lim))
        with caplog.at_level(logging.ERROR):
            for _ in range(500):
                loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files")})
            loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
    assert lim.accept_errors == 500
    assert [r.getMessage() for r in caplog.records if r.name == "server.limits"] == [
        "cannot accept connections: Too many open files; the open connections are served"]
    assert any("something else" in r.getMessage() for r in caplog.records if r.name == "asyncio")
