"""Functional tests of wire compatibility, TLS, scale, slow subscribers and the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.support import (
    HOST,
    PYTHON,
    ROOT,
    Daemon,
    await_until,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
    wait_until,
)


async def raw_get(port: int, request: bytes,
                  timeout: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a raw request; returns the reader, writer and the response head."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    return reader, writer, head


async def close(writer: asyncio.StreamWriter) -> None:
    """Close and wait, so no transport is left for the garbage collector to warn about."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_chunk(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """One HTTP chunk's payload (empty for the terminating chunk)."""
    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)).strip(), 16)
    data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
    assert data.endswith(b"\r\n")
    return data[:-2]


@pytest.mark.parametrize("via", ["fast", "aiohttp"])
async def test_exactly_one_event_per_chunk(daemon: Daemon, via: str) -> None:
    extra = b"Connection: keep-alive\r\n" if via == "aiohttp" else b""
    reader, writer, head = await raw_get(
        daemon.port, b"GET /c HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n" + extra + b"\r\n")
    assert b" 200 " in head and b"chunked" in head.lower()
    assert b"application/vnd.pypubsub-stream" in head
    await wait_subscribers(daemon.url, 1)
    # published concurrently so the server coalesces them into few socket writes
    results = await asyncio.gather(*[publish(daemon.url, "/c", {"i": i}) for i in range(30)])
    assert all(s == 202 for s, _ in results)
    seen: list[int] = []
    while len(seen) < 30:
        chunk = await read_chunk(reader)
        assert chunk.count(b"\n") == 1 and chunk.endswith(b"\n"), chunk
        obj = json.loads(chunk)
        if "stillalive" not in obj:
            seen.append(obj["i"])
    assert sorted(seen) == list(range(30))
    await close(writer)


async def test_oldschool_user_agent_gets_nul_framing(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval="0.3"), port=port)
    reader, writer, head = await raw_get(
        port, b"GET /svn HTTP/1.1\r\nHost: x\r\nUser-Agent: svnwcsub/1.14\r\n\r\n")
    assert b"chunked" in head.lower()
    ping = await read_chunk(reader)
    assert ping.endswith(b"\n\0") and "stillalive" in json.loads(ping[:-2])
    assert (await publish(d.url, "/svn/commit", {"r": 1}))[0] == 202
    for _ in range(10):
        chunk = await read_chunk(reader)
        assert chunk.endswith(b"\n\0")
        if b'"r"' in chunk:
            assert json.loads(chunk[:-2])["r"] == 1
            break
    await close(writer)


async def test_svnpubsub_http10_request(daemon_factory: Callable[..., Daemon]) -> None:
    """svnwcsub: HTTP/1.0, no Host, no User-Agent → close-delimited body of JSON\\n\\0 records."""
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval="0.3"), port=port)
    reader, writer, head = await raw_get(port, b"GET /commits HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower() and b"content-length" not in head.lower()
    assert (await publish(d.url, "/commits/r1", {"revision": 1})).__getitem__(0) == 202
    buf = b""
    while b'"revision"' not in buf:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, buf
        buf += data
    records = [r for r in buf.split(b"\n\0") if r]
    assert all(json.loads(r) for r in records)
    assert any(json.loads(r).get("revision") == 1 for r in records)
    # the stream ends when the server shuts down: the body is close-delimited
    d.signal(signal.SIGTERM)
    rest = await asyncio.wait_for(reader.read(), 10)
    assert b"\r\n0\r\n" not in rest
    await close(writer)
    assert d.proc is not None and d.proc.wait(10) == 0


async def test_tls(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, chain_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "chain.pem"
    cert_path.write_bytes(cert.cert_chain_pems[0].bytes())
    key_path.write_bytes(cert.private_key_pem.bytes())
    chain_path.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems[1:]) or ca.cert_pem.bytes())
    port, tls_port = free_port(), free_port()
    cfg = base_config(port, tls={"port": tls_port, "cert": str(cert_path), "key": str(key_path),
                                  "chain": str(chain_path)})
    d = daemon_factory(config=cfg, port=port)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    # raw TLS streams, each closed with wait_closed(): that waits for the TLS shutdown, so no
    # transport outlives the test (a pooled aiohttp TLS connection could, and warn later)
    reader, writer = await asyncio.open_connection(HOST, tls_port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        writer.write(b"GET /secure/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        await wait_subscribers(d.url, 1)
        assert (await publish(d.url, "/secure/stream", {"tls": True}))[0] == 202
        r2, w2 = await asyncio.open_connection(HOST, tls_port, ssl=ctx, server_hostname="127.0.0.1")
        try:
            body = b'{"tls": "put"}'
            w2.write(b"PUT /secure/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
            assert (await asyncio.wait_for(r2.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 202")
        finally:
            w2.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await w2.wait_closed()
        lines: list[object] = []
        while len(lines) < 2:  # chunked: a size line, then one JSON record per chunk
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.startswith(b"{"):
                obj = json.loads(line)
                if "stillalive" not in obj:
                    lines.append(obj["tls"])
        assert lines == [True, "put"]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def test_missing_tls_files_are_a_config_error(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(tmp_path / "d", config=base_config(port, tls={"port": free_port(), "cert": "/nope.pem",
                                                              "key": "/nope.key"}), port=port)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 2
    assert "server.tls.cert" in d.log() and "/nope.pem" in d.log()
    assert "listening" not in d.log()


def test_bad_config_exits_before_listening(tmp_path: Path) -> None:
    port = free_port()
    cfg = base_config(port)
    cfg["server"]["backlog"]["max_age"] = "forever"
    d = Daemon(tmp_path / "d", config=cfg, port=port)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(20) == 2
    assert f"{d.config_path}: server.backlog.max_age:" in d.log()
    assert "listening" not in d.log()


def test_unknown_keys_are_warnings(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    cfg = base_config(port, colour="blue")
    d = daemon_factory(config=cfg, port=port)
    assert f"{d.config_path}: unknown configuration key server.colour" in d.log()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def test_embedded_defaults_run(tmp_path: Path) -> None:
    """With no pypubsub.yaml around, the daemon runs on its embedded defaults (127.0.0.1:2069).

    When something already listens on 2069 (a daemon started from the README, say), the
    defaults are still proven: the daemon says it tried 127.0.0.1:2069 and exits 1, cleanly.
    """
    version = subprocess.run([PYTHON, str(ROOT / "pypubsub.py"), "--version"], capture_output=True,
                             text=True, timeout=30, check=True)
    assert version.stdout.startswith("PyPubSub ")
    log = tmp_path / "log"
    taken = _port_taken(2069)
    with open(log, "wb") as out:
        p = subprocess.Popen([PYTHON, str(ROOT / "pypubsub.py")], cwd=tmp_path, stderr=out,
                             stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: "listening on" in log.read_text() or p.poll() is not None, 20,
                   "the daemon to start")
        text = log.read_text()
        assert "embedded defaults" in text
        if taken and p.poll() is not None:
            assert p.returncode == 1, text
            assert "cannot listen" in text and "('127.0.0.1', 2069)" in text, text
            assert "Traceback" not in text
            return
        assert "listening on http://127.0.0.1:2069" in text, text
        page = urllib.request.Request("http://127.0.0.1:2069/any/topic",
                                      headers={"Accept": "text/html,*/*;q=0.8"})
        with urllib.request.urlopen(page, timeout=10) as r:  # the live page, on the defaults too
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert b"PubSubSubscription" in r.read()
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0


async def test_sigterm_ends_streams_cleanly(daemon: Daemon) -> None:
    reader, writer, _ = await raw_get(daemon.port, b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    reader2, writer2, _ = await raw_get(
        daemon.port, b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    await wait_subscribers(daemon.url, 2)
    t0 = time.monotonic()
    daemon.signal(signal.SIGTERM)
    for r in (reader, reader2):
        rest = await asyncio.wait_for(r.read(), 10)
        assert rest.endswith(b"0\r\n\r\n"), rest  # the terminating chunk: a clean end
    assert daemon.proc is not None and daemon.proc.wait(10) == 0
    assert time.monotonic() - t0 < 6
    assert "stopped" in daemon.log()
    await close(writer)
    await close(writer2)


async def test_500_concurrent_subscribers(daemon: Daemon) -> None:
    n = 500

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = b"/many" if i % 2 else b"/many/odd"
        r, w, _ = await raw_get(daemon.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path, 30)
        return r, w

    conns = await asyncio.gather(*[one(i) for i in range(n)])
    await wait_subscribers(daemon.url, n, timeout=30)
    for k in range(3):
        assert (await publish(daemon.url, "/many/odd", {"k": k}))[0] == 202

    async def drain(r: asyncio.StreamReader) -> list[int]:
        got: list[int] = []
        while len(got) < 3:
            obj = json.loads(await read_chunk(r, 30))
            if "k" in obj:
                got.append(obj["k"])
        return got

    results = await asyncio.gather(*[drain(r) for r, _ in conns])
    assert all(g == [0, 1, 2] for g in results)
    for _, w in conns:
        await close(w)
    await wait_subscribers(daemon.url, 0, timeout=30)


async def test_stalled_subscriber_is_cut_and_delays_no_one(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, stream_buffer=256 * 1024, max_payload_size=200_000),
                       port=port)
    # the stalled one: a tiny receive buffer, never read
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((HOST, port))
    stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    async with subscribe(d.url, "/big") as sub:
        await wait_subscribers(d.url, 2)
        pad = "x" * 50_000
        got = 0
        for i in range(200):
            assert (await publish(d.url, "/big", {"i": i, "pad": pad}))[0] == 202
            ev = await sub.next(timeout=5)
            assert ev["i"] == i
            got += 1
        assert got == 200
        d.wait_log("disconnecting slow subscriber", timeout=10)
        await wait_subscribers(d.url, 1)
    stalled.close()


def test_cli_flags() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "pypubsub.py"), "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "--config" in out and "--acl" in out and "--log-level" in out


async def test_keepalive_goes_to_idle_streams_not_busy_ones(daemon_factory: Callable[..., Daemon]) -> None:
    """An idle stream is pinged every ping_interval; a stream that gets events is not pinged."""
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval="0.4"), port=port)
    async with subscribe(d.url, "/idle") as idle, subscribe(d.url, "/busy") as busy:
        await wait_subscribers(d.url, 2)
        stop = asyncio.Event()

        async def read_busy() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await busy.next(0.2)

        async def read_idle() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await idle.next(0.2, pings=True)

        readers = [asyncio.create_task(read_busy()), asyncio.create_task(read_idle())]
        try:
            sent = 0
            end = time.monotonic() + 2.4  # six intervals, publishing back to back
            while time.monotonic() < end:
                status, _ = await publish(d.url, "/busy", {"n": sent})
                assert status == 202
                sent += 1
            await await_until(lambda: len(busy.events) == sent, what="every busy event")
            stop.set()
            await asyncio.gather(*readers)
        finally:
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    assert len(idle.pings) >= 3, idle.pings  # ~6 expected: one per interval
    assert len(busy.pings) <= 1, busy.pings  # 0 expected (1 only if the loop stalled 0.35 s)
