"""The fast lane's edges, through the real daemon: anything unusual must reach aiohttp intact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
)


async def exchange(port: int, data: bytes, until: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until ``until`` is seen (or the server closes)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        buf = b""
        while until not in buf:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            buf += chunk
        return buf
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_oversized_head_goes_to_aiohttp(daemon: Daemon) -> None:
    big = b"X-Filler: " + b"a" * 20000 + b"\r\n"
    out = await exchange(daemon.port, b"GET /t HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n", b"\r\n\r\n")
    assert out.split(b" ")[1].startswith(b"4"), out[:80]  # aiohttp refuses it; nothing crashed
    assert (await publish(daemon.url, "/t", {"still": "serving"}))[0] == 202
    daemon.wait_log("malformed request refused (400)")  # one line, no traceback


async def test_garbage_request_line(daemon: Daemon) -> None:
    out = await exchange(daemon.port, b"HELLO\r\n\r\n", b"\r\n\r\n")
    assert out.split(b" ")[1] == b"400", out[:80]
    assert (await publish(daemon.url, "/t", {"still": "serving"}))[0] == 202


async def test_put_then_get_on_one_connection(daemon: Daemon) -> None:
    """A keep-alive connection that publishes, then becomes a stream."""
    async with subscribe(daemon.url, "/k") as watcher:
        await wait_subscribers(daemon.url, 1)
        body = b'{"n": 1}'
        reader, writer = await asyncio.open_connection(HOST, daemon.port)
        writer.write(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                     + b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"thank you very much!\n"), 5)
        assert b"202 Accepted" in head
        head2 = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head2.startswith(b"HTTP/1.1 200") and b"chunked" in head2.lower()
        assert (await watcher.next())["n"] == 1
        await wait_subscribers(daemon.url, 2)
        assert (await publish(daemon.url, "/k", {"n": 2}))[0] == 202
        line = b""
        while b'"n":2' not in line:
            line += await asyncio.wait_for(reader.read(65536), 5)
        assert json.loads(line.split(b"\r\n")[1])["n"] == 2
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await wait_subscribers(daemon.url, 0)


async def test_body_split_across_reads(daemon: Daemon) -> None:
    async with subscribe(daemon.url, "/split") as sub:
        await wait_subscribers(daemon.url, 1)
        body = b'{"parts": "arrive slowly"}'
        reader, writer = await asyncio.open_connection(HOST, daemon.port)
        req = b"PUT /split HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        for i in range(0, len(req), 7):  # seven bytes per write: head and body both split
            writer.write(req[i:i + 7])
            await writer.drain()
        out = await asyncio.wait_for(reader.readuntil(b"thank you very much!\n"), 5)
        assert b"202" in out
        assert (await sub.next())["parts"] == "arrive slowly"
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_port_zero_logs_the_bound_port(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(config=base_config(0))
    m = re.search(r"PyPubSub listening on http://127\.0\.0\.1:(\d+)", d.log())
    assert m is not None, d.log()[-2000:]
    port = int(m.group(1))
    assert port != 0
    d.port = port
    assert (await publish(d.url, "/t", {"bound": port}))[0] == 202


async def test_many_publish_targets_each_routed_to_its_own_path(daemon_factory: DaemonFactory) -> None:
    """Publish targets are parsed once per distinct target (a bounded cache): more distinct
    targets than it keeps, repeats, dot-segments and a secure topic each still go where they say."""
    port = free_port()
    cfg = base_config(port)
    cfg["clients"]["secure_topics"] = ["secret"]
    d = daemon_factory(config=cfg, port=port)
    targets = [f"/many/t{i % 1100}" for i in range(2300)] + ["/many/x/../y", "/many/y"]
    body = b"{}"
    req = b"".join(b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n%s" % (t.encode(), body)
                   for t in targets)
    secret = b"PUT /secret/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    async with subscribe(d.url, "/many") as sub:
        await wait_subscribers(d.url, 1)
        out = await exchange(port, req + secret, b"HTTP/1.1 403", timeout=20)
        assert out.count(b"HTTP/1.1 202 Accepted") == len(targets)
        again = await exchange(port, secret, b"HTTP/1.1 403")  # the same secure target: still refused
        assert again.startswith(b"HTTP/1.1 403")
        paths = [(await sub.next(10))["pubsub_path"] for _ in targets]
    assert paths == [*targets[:-2], "/many/y", "/many/y"]


async def test_more_target_bytes_than_kept_each_routed_to_its_own_path(daemon_factory: DaemonFactory) -> None:
    """Long targets, more of them than the publish-target cache keeps by bytes (it starts over),
    and targets too long to be kept, sent one per read as a publisher to many topics sends them
    (the fast lane then reuses what it parsed before for a target it knows): each goes where it
    says, a secure one is refused."""
    port = free_port()
    cfg = base_config(port)
    cfg["clients"]["secure_topics"] = ["secret"]
    d = daemon_factory(config=cfg, port=port)
    pad = "p" * 180
    # 3 000 x ~190 bytes > 512 KiB: kept from about the 2 800th on; then targets it keeps, and
    # targets it no longer keeps
    targets = [f"/long/{pad}{i}" for i in [*range(3000), *range(2900, 3000), *range(100)]]
    targets[1000:1000] = [f"/long/{'q' * 300}", f"/long/{'q' * 300}", "/secret/x", "/long/y"]
    reader, writer = await asyncio.open_connection(HOST, port)
    statuses: list[bytes] = []
    async with subscribe(d.url, "/long") as sub:
        await wait_subscribers(d.url, 1)
        try:
            for t in targets:
                if t == "/secret/x":  # aiohttp's 403 (and the connection): go on on a new one
                    out = await exchange(port, b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                                         % t.encode(), b"\r\n\r\n")
                    statuses.append(out[9:12])
                    continue
                writer.write(b'PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"k": 1}' % t.encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                n = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(n)
                statuses.append(head[9:12])
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert statuses == [b"403" if t == "/secret/x" else b"202" for t in targets]
        paths = [(await sub.next(10))["pubsub_path"] for _ in range(len(targets) - 1)]
    assert paths == [t for t in targets if t != "/secret/x"]


def test_plain_targets_are_request_targets_llhttp_accepts() -> None:
    """Every byte the fast lane's plain-target check lets through (a first publish to a target is
    then not parsed by llhttp) is one llhttp accepts in a request target, and passes on as is."""
    import httptools

    from server.fastlane import _PLAIN_TARGET

    class Seen:
        def __init__(self) -> None:
            self.url = b""
            self.complete = False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            self.complete = True

    plain = [c for c in range(256) if _PLAIN_TARGET.fullmatch(b"/a%cb" % c)]
    assert len(plain) == 81 and b"?"[0] not in plain and b" "[0] not in plain
    for c in plain:
        target = b"/a%cb" % c
        seen = Seen()
        httptools.HttpRequestParser(seen).feed_data(
            b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert seen.complete and seen.url == target, target
