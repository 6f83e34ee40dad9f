"""One HTTP truth: each unusual or malformed request head, sent as raw bytes to the same daemon
configuration with the fast lane on and off (aiohttp only), must get the same status from both,
and the status we expect.

The two daemons run for the whole module (module-scoped fixture); each is stopped at the end
and must exit 0 with no traceback in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    HOST,
    Daemon,
    auth_header,
    base_config,
    subscribe,
    wait_subscribers,
    wait_until,
)

SECURE = ["secret", "dé"]
#: the one origin server.cors_origins lists
ALLOWED_ORIGIN = "https://app.example"
#: a user who sees every private event
ACL = {"reader": {"password": "reader-pw", "acl": {"all": []}}}


def _cfg(port: int, fast: bool) -> dict[str, object]:
    cfg = base_config(port, fast_lane=fast, cors_origins=[ALLOWED_ORIGIN])
    cfg["clients"]["secure_topics"] = SECURE
    return cfg


@pytest.fixture(scope="module")
def lanes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """``{"fast": daemon with the fast lane, "aiohttp": the same config without it}``."""
    root: Path = tmp_path_factory.mktemp("lanes")
    made: dict[str, Daemon] = {}
    try:
        for name, fast in (("fast", True), ("aiohttp", False)):
            d = Daemon(root / name, acl=ACL)
            d.config = _cfg(d.port, fast)
            d.write_files()
            made[name] = d.start()
        yield made
    finally:
        problems = []
        for name, d in made.items():
            rc = d.stop()
            if rc != 0:
                problems.append(f"{name} daemon exited {rc}:\n{d.log()[-3000:]}")
            if "Traceback" in d.log():
                problems.append(f"traceback in the {name} daemon's log:\n{d.log()[-3000:]}")
        if problems:
            pytest.fail("\n".join(problems))


async def status_of(port: int, data: bytes, timeout: float = 5.0) -> int | None:
    """The status of the first response to ``data`` on a fresh connection; None: no answer
    (closed, or nothing within ``timeout``)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (TimeoutError, ConnectionError):
            return None
        parts = line.split(b" ", 2)
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def put(target: bytes, body: bytes = b'{"k": 1}', extra: bytes = b"Host: x\r\n",
        method: bytes = b"PUT", version: bytes = b"HTTP/1.1") -> bytes:
    return (method + b" " + target + b" " + version + b"\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


DEEP = b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}"

# (name, request bytes, the status both lanes must answer)
CASES: list[tuple[str, bytes, int]] = [
    ("plain publish", put(b"/t"), 202),
    ("absolute-form publish", put(b"http://h:2069/t?q=1"), 202),
    ("leading blank line", b"\r\n" + put(b"/t"), 202),
    ("Connection: close", put(b"/t", extra=b"Host: x\r\nConnection: close\r\n"), 202),
    ("POST", put(b"/t", method=b"POST"), 202),
    ("HTTP/2.0 in the request line", put(b"/t", version=b"HTTP/2.0"), 202),
    ("chunked publish", b"PUT /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"8\r\n{\"k\": 1}\r\n0\r\n\r\n", 202),
    # framing: what llhttp (both lanes' parser) refuses
    ("bare LF in a header value hiding Transfer-Encoding",
     put(b"/t", extra=b"Host: x\nTransfer-Encoding: chunked\r\n"), 400),
    ("bare CR in a header value", put(b"/t", extra=b"Host: x\ry\r\n"), 400),
    ("NUL in a header value", put(b"/t", extra=b"Host: x\x00y\r\n"), 400),
    ("TAB in the path", put(b"/a\tb"), 400),
    ("NUL in the path", put(b"/a\x00b"), 400),
    ("LF in the path", put(b"/a\nb"), 400),
    ("DEL in the path", put(b"/a\x7f"), 400),
    ("space in the path", put(b"/a b"), 400),
    ("bare-LF line endings", b"PUT /t HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}", 400),
    ("bare-LF line endings, GET", b"GET /t HTTP/1.1\nHost: x\n\n", 400),
    ("5000-digit Content-Length", b"PUT /t HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000
                                  + b"\r\n\r\n{}", 400),
    ("obs-fold", put(b"/t", extra=b"Host: x\r\n y\r\n"), 400),
    ("Transfer-Encoding and Content-Length", put(b"/t", extra=b"Host: x\r\nTransfer-Encoding: chunked\r\n"),
     400),
    ("two Content-Lengths", put(b"/t", extra=b"Host: x\r\nContent-Length: 8\r\n"), 400),
    ("space before the colon", put(b"/t", extra=b"Host : x\r\n"), 400),
    ("lower-case method", put(b"/t", method=b"put"), 400),
    ("no Host", put(b"/t", extra=b""), 400),
    ("no Host, GET", b"GET /t HTTP/1.1\r\n\r\n", 400),
    ("raw UTF-8 in the target", put(b"/d\xc3\xa9"), 400),
    ("raw latin-1 in the target", put(b"/d\xe9"), 400),
    ("raw UTF-8 in a subscription", b"GET /d\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # aiohttp answers a read holding refused bytes with one 400, valid requests before included
    ("valid publish then garbage, one read", put(b"/t") + b"GARBAGE\r\n\r\n", 400),
    ("valid publish then no Host, one read", put(b"/t") + put(b"/u", extra=b""), 400),
    ("valid publish then bare LF, one read", put(b"/t") + b"PUT /u HTTP/1.1\nHost: x\n\n", 400),
    ("valid publish then chunked, one read", put(b"/t") + b"PUT /t HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n8\r\n{\"k\": 1}\r\n0\r\n\r\n", 202),
    # targets: one canonical topic list, the secure-topic rule read from it
    ("secure topic", put(b"/secret"), 403),
    ("secure topic, percent-encoded UTF-8", put(b"/d%C3%A9"), 403),
    ("secure topic behind a dot-segment", put(b"/x/../secret"), 403),
    ("secure topic behind an encoded dot-segment", put(b"/x/%2e%2E/secret"), 403),
    ("secure topic in absolute-form", put(b"http://h:2069/private/secret"), 403),
    ("secure topic, query does not change topics", put(b"/x?/secret"), 202),
    ("percent-encoded bytes that are not UTF-8", put(b"/%ff"), 400),
    ("asterisk-form", put(b"*"), 400),
    # bodies
    ("lone surrogate", put(b"/t", b'{"a": "\\ud800"}'), 400),
    ("nested 1000 deep", put(b"/t", DEEP), 400),
    ("invalid JSON", put(b"/t", b"{nope"), 400),
    ("array body", put(b"/t", b"[1]"), 400),
    ("too large", put(b"/t", b'{"a": "' + b"x" * 200_000 + b'"}'), 413),
    # methods and other shapes
    ("OPTIONS", b"OPTIONS /t HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("DELETE", b"DELETE /t HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("HEAD", b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", 204),
    ("HTTP/1.0 subscription without Host", b"GET /t HTTP/1.0\r\n\r\n", 200),
    ("subscription", b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ("subscription in absolute-form", b"GET http://h/t?x HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ("subscription with credentials", b"GET /t HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\n\r\n",
     200),
    ("subscription asking for SSE", b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n", 200),
    ("SSE like an EventSource", b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
     b"Cache-Control: no-cache\r\nConnection: keep-alive\r\nUser-Agent: Mozilla/5.0\r\n\r\n", 200),
    ("SSE with Last-Event-ID", b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
     b"Last-Event-ID: nope\r\n\r\n", 200),
    ("SSE asking for a replay in the query", b"GET /t?since=0 HTTP/1.1\r\nHost: x\r\n"
     b"Accept: text/event-stream\r\n\r\n", 200),
    ("SSE with an Origin", b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
     b"Origin: http://elsewhere\r\n\r\n", 200),
    ("SSE on a bad path", b"GET /a/%ff HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n", 400),
    ("SSE with a repeated Accept", b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
     b"Accept: text/event-stream\r\n\r\n", 200),
    ("SSE over HTTP/1.0", b"GET /t HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n", 200),
    ("subscription with a body length", b"GET /t HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 200),
]


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_both_lanes_answer_alike(lanes: dict[str, Daemon], name: str, data: bytes,
                                       expected: int) -> None:
    got = {lane: await status_of(d.port, data) for lane, d in lanes.items()}
    assert got == {"fast": expected, "aiohttp": expected}, name


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
@pytest.mark.parametrize("target", [
    b"http://h:2069/private/foo", b"HTTP://h/private/foo", b"/./private/foo", b"/x/../private/foo",
    b"/%2E/private/foo", b"/private//../foo", b"/private/foo?/public",
])
async def test_private_publish_is_private_in_every_form(lanes: dict[str, Daemon], lane: str,
                                                         target: bytes) -> None:
    """An anonymous subscriber to everything never sees a private event, however spelt; a
    subscriber allowed to see it gets it with its canonical path."""
    d = lanes[lane]
    async with subscribe(d.url, "/") as anon, \
            subscribe(d.url, "/", headers=auth_header("reader", "reader-pw")) as reader:
        await wait_subscribers(d.url, 2)
        assert await status_of(d.port, put(target, b'{"leak": 1}')) == 202
        assert await status_of(d.port, put(b"/public", b'{"marker": 1}')) == 202
        ev = await anon.next()
        assert ev.get("marker") == 1, ev  # the private event was not delivered before it
        got: list[dict[str, Any]] = []
        while not got or "marker" not in got[-1]:
            ev = await reader.next()
            if "leak" in ev or "marker" in ev:  # (the reader also sees private presence events)
                got.append(ev)
        assert [(ev.get("leak"), ev["pubsub_path"], ev["pubsub_topics"]) for ev in got] == [
            (1, "/private/foo", ["foo"]), (None, "/public", ["public"])]
    await wait_subscribers(d.url, 0)


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_many_pipelined_publishes_in_one_read(lanes: dict[str, Daemon], lane: str) -> None:
    """More requests in one write than any per-read bound: every one answered and delivered."""
    d = lanes[lane]
    n = 600
    async with subscribe(d.url, "/pipe") as sub:
        await wait_subscribers(d.url, 1)
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            writer.write(b"".join(put(b"/pipe", json.dumps({"i": i}).encode()) for i in range(n)))
            await writer.drain()
            answered = 0
            buf = b""
            while answered < n:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                assert chunk, f"connection closed after {answered} answers"
                buf += chunk
                answered = buf.count(b"202 Accepted")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        got = [(await sub.next())["i"] for _ in range(n)]
        assert got == list(range(n))
    await wait_subscribers(d.url, 0)


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_bad_body_answer_is_one_line(lanes: dict[str, Daemon], lane: str) -> None:
    d = lanes[lane]
    for body, reason in ((b'{"a": "\\ud800"}', b"lone surrogate"), (DEEP, b"deeper than")):
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            writer.write(put(b"/t", body))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:"))
            text = await asyncio.wait_for(reader.readexactly(length), 5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert reason in text and text.count(b"\n") == 1, text


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_mixed_pipeline_is_handed_over_from_the_first_unusual_request(
        lanes: dict[str, Daemon], lane: str) -> None:
    """Plain, chunked, then plain again on one connection in one write: the fast lane answers
    the first and hands the rest, byte for byte, to aiohttp; nothing is lost or reordered."""
    d = lanes[lane]
    chunked = (b"PUT /mix HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"8\r\n{\"i\": 1}\r\n0\r\n\r\n")
    async with subscribe(d.url, "/mix") as sub:
        await wait_subscribers(d.url, 1)
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            writer.write(put(b"/mix", b'{"i": 0}') + chunked + put(b"/mix", b'{"i": 2}'))
            await writer.drain()
            buf = b""
            while buf.count(b"202 Accepted") < 3:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                assert chunk, buf
                buf += chunk
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert [(await sub.next())["i"] for _ in range(3)] == [0, 1, 2]
    await wait_subscribers(d.url, 0)


async def response_head(port: int, data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Status line and headers (lower-case names, Date left out) of the first response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines)}
    headers.pop(b"date", None)
    return status, headers


SSE_LIKE_EVENTSOURCE = (b"GET /a/b HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                        b"Cache-Control: no-cache\r\nConnection: keep-alive\r\nUser-Agent: Mozilla/5.0\r\n"
                        b"Accept-Language: en\r\n\r\n")


async def opening_bytes(port: int, data: bytes) -> bytes:
    """What a stream's response starts with, up to its opening record, Date left out."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        got = await asyncio.wait_for(reader.readuntil(b"\n\n\r\n"), 5)  # the retry: chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return b"\r\n".join(line for line in got.split(b"\r\n") if not line.lower().startswith(b"date:"))


@pytest.mark.parametrize("data", [b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
                                  SSE_LIKE_EVENTSOURCE], ids=["sse", "sse like EventSource"])
async def test_an_sse_stream_opens_alike_in_both_lanes(lanes: dict[str, Daemon], data: bytes) -> None:
    """Status line, headers in order, and the opening ``retry:`` record, byte for byte."""
    fast = await opening_bytes(lanes["fast"].port, data)
    assert fast == await opening_bytes(lanes["aiohttp"].port, data)
    assert fast.startswith(b"HTTP/1.1 200 OK\r\n") and b"retry: 2000" in fast, fast


@pytest.mark.parametrize("data", [
    put(b"/t"),
    put(b"/t", extra=b"Host: x\r\nConnection: keep-alive\r\nUser-Agent: python-requests/2\r\n"
                     b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"),
    b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /t HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nAccept: */*\r\nUser-Agent: asfpy\r\n\r\n",
    b"GET /t HTTP/1.1\r\nHost: x\r\nUser-Agent: svnwcsub/1.14\r\n\r\n",
    b"GET /t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
    SSE_LIKE_EVENTSOURCE,
], ids=["publish", "publish like requests", "stream", "stream like asfpy", "stream, oldschooler", "sse",
        "sse like EventSource"])
async def test_what_the_fast_lane_serves_aiohttp_would_serve_alike(lanes: dict[str, Daemon],
                                                                   data: bytes) -> None:
    assert await response_head(lanes["fast"].port, data) == await response_head(lanes["aiohttp"].port, data)


# -- WebSocket: the handshake, then the client's frames ----------------------------------------
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def ws_get(extra: bytes = b"", target: bytes = b"/t", key: bytes = WS_KEY, version: bytes = b"13",
           connection: bytes = b"Upgrade", http: bytes = b"HTTP/1.1") -> bytes:
    head = b"GET " + target + b" " + http + b"\r\nHost: x\r\nUpgrade: websocket\r\n"
    if connection:
        head += b"Connection: " + connection + b"\r\n"
    if key:
        head += b"Sec-WebSocket-Key: " + key + b"\r\n"
    if version:
        head += b"Sec-WebSocket-Version: " + version + b"\r\n"
    return head + extra + b"\r\n"


CHROMIUM = (b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
            b"Origin: http://x\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")

# (name, request bytes, the status both lanes must answer): the whole response head (Date
# aside) must be the same bytes in both lanes
WS_CASES: list[tuple[str, bytes, int]] = [
    ("websocket", ws_get(), 101),
    ("websocket like Chromium", ws_get(CHROMIUM), 101),
    ("websocket like Firefox", ws_get(b"Origin: http://x\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
                                      connection=b"keep-alive, Upgrade"), 101),
    ("websocket like aiohttp's client", ws_get(b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
                                               b"User-Agent: Python/3.11 aiohttp/3.14.5\r\n"), 101),
    ("websocket, allowed Origin", ws_get(b"Origin: " + ALLOWED_ORIGIN.encode() + b"\r\n"), 101),
    ("websocket, allowed Origin with a slash and capitals",
     ws_get(b"Origin: HTTPS://App.Example/\r\n"), 101),
    ("websocket, own Origin", ws_get(b"Origin: http://x\r\n"), 101),
    ("websocket, foreign Origin", ws_get(b"Origin: https://evil.example\r\n"), 403),
    ("websocket, own host over https", ws_get(b"Origin: https://x\r\n"), 403),
    ("websocket, non-ASCII Origin", ws_get(b"Origin: http://\xc3\xa9\r\n"), 403),
    ("websocket, Upgrade in capitals", ws_get().replace(b"websocket", b"WebSocket"), 101),
    ("websocket, Connection in lower case", ws_get(connection=b"upgrade"), 101),
    ("websocket, Connection: close, Upgrade", ws_get(connection=b"close, Upgrade"), 101),
    ("websocket, no Connection", ws_get(connection=b""), 400),
    ("websocket, Connection without upgrade", ws_get(connection=b"keep-alive"), 400),
    ("websocket, no key", ws_get(key=b""), 400),
    ("websocket, short key", ws_get(key=b"abc"), 400),
    ("websocket, 15-byte key", ws_get(key=b"dGhlIHNhbXBsZSBub25j"), 400),
    ("websocket, key with stray characters", ws_get(key=b"dGhlIHNhbXBs*ZSBub25jZQ=="), 101),
    ("websocket, key without padding", ws_get(key=b"dGhlIHNhbXBsZSBub25jZQ"), 400),
    ("websocket, key with non-zero trailing bits", ws_get(key=b"dGhlIHNhbXBsZSBub25jZR=="), 101),
    ("websocket, key with a byte over 0x7f", ws_get(key=b"dGhlIHNhbXBsZSBub25j\xffQ=="), 400),
    ("websocket, key with a UTF-8 character", ws_get(key=b"dGhlIHNhbXBsZSBub25j\xc3\xa9=="), 400),
    ("websocket, Connection with a byte over 0x7f", ws_get(connection=b"\x90pgrade"), 400),
    ("websocket, Connection: Upgrade and a byte over 0x7f", ws_get(connection=b"Upgrade, \xe9"), 101),
    ("websocket, version with a byte over 0x7f", ws_get(version=b"1\xb3"), 400),
    ("websocket, Upgrade with a byte over 0x7f",
     ws_get().replace(b"Upgrade: websocket", b"Upgrade: websocket\xff"), 200),
    ("websocket, no version", ws_get(version=b""), 400),
    ("websocket, version 12", ws_get(version=b"12"), 400),
    ("websocket, version 8", ws_get(version=b"8"), 101),
    ("websocket, version with spaces", ws_get(version=b"13 "), 101),
    ("websocket, subprotocol", ws_get(b"Sec-WebSocket-Protocol: chat, superchat\r\n"), 101),
    ("websocket, unknown extension", ws_get(b"Sec-WebSocket-Extensions: x-frobnicate\r\n"), 101),
    ("websocket, credentials", ws_get(b"Authorization: Basic eDp5\r\n"), 101),
    ("websocket, good credentials", ws_get(b"Authorization: Basic cmVhZGVyOnJlYWRlci1wdw==\r\n"), 101),
    ("websocket, cookie", ws_get(b"Cookie: a=b\r\n"), 101),
    ("websocket, unknown header", ws_get(b"X-Unknown: 1\r\n"), 101),
    ("websocket, replay in the query", ws_get(target=b"/t?since=0"), 101),
    ("websocket, cursor in the query", ws_get(target=b"/t?last_event_id=nope"), 101),
    ("websocket, bad since in the query", ws_get(target=b"/t?since=soon"), 400),
    ("websocket, Last-Event-ID", ws_get(b"Last-Event-ID: nope\r\n"), 101),
    ("websocket, bad path", ws_get(target=b"/a/%ff"), 400),
    ("websocket, body length", ws_get(b"Content-Length: 0\r\n"), 101),
    ("websocket, repeated key", ws_get(b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"), 101),
    ("websocket over HTTP/1.0", ws_get(http=b"HTTP/1.0"), 101),
    ("websocket, a frame in the same read", ws_get() + b"\x89\x80\x00\x00\x00\x00", 101),
]


def _without_date(head: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:"))


async def ws_head(port: int, data: bytes) -> bytes:
    """The response head to ``data``, byte for byte but its Date line."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return _without_date(head)


@pytest.mark.parametrize(("name", "data", "expected"), WS_CASES, ids=[c[0] for c in WS_CASES])
async def test_websocket_handshakes_alike_in_both_lanes(lanes: dict[str, Daemon], name: str, data: bytes,
                                                        expected: int) -> None:
    got = {lane: await ws_head(d.port, data) for lane, d in lanes.items()}
    assert got["fast"] == got["aiohttp"], name
    assert got["fast"].split(b" ", 2)[1] == b"%d" % expected, got["fast"]
    if expected == 101:
        assert b"Sec-WebSocket-Extensions" not in got["fast"]  # compression stays off
    await wait_subscribers(lanes["fast"].url, 0)
    await wait_subscribers(lanes["aiohttp"].url, 0)


MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
          length: int | None = None) -> bytes:
    """One client frame (masked unless told otherwise)."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 65536:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(0x8, (code.to_bytes(2, "big") if code is not None else b"") + reason)


def server_close(code: int, reason: bytes = b"") -> bytes:
    return bytes((0x88, 2 + len(reason))) + code.to_bytes(2, "big") + reason


# (name, what the client sends after the handshake, what the server answers up to the end of
# the connection): the same in both lanes
WS_FRAMES: list[tuple[str, bytes, bytes]] = [
    ("close", close(), server_close(1000)),
    ("close without a code", close(None), server_close(1000)),
    ("close with a reason", close(1001, b"bye"), server_close(1000)),
    ("close with an application code", close(4321), server_close(1000)),
    ("ping, then close", frame(0x9, b"hi") + close(), b"\x8a\x02hi" + server_close(1000)),
    ("empty ping", frame(0x9) + close(), b"\x8a\x00" + server_close(1000)),
    ("pong", frame(0xA, b"x") + close(), server_close(1000)),
    ("text is ignored", frame(0x1, b"hello") + close(), server_close(1000)),
    ("binary is ignored", frame(0x2, b"\x00\xff") + close(), server_close(1000)),
    ("fragmented text", frame(0x1, b"hel", fin=False) + frame(0x0, b"lo") + close(), server_close(1000)),
    ("ping between fragments", frame(0x1, b"a", fin=False) + frame(0x9, b"p") + frame(0x0, b"b") + close(),
     b"\x8a\x01p" + server_close(1000)),
    ("text of 4095 bytes", frame(0x1, b"x" * 4095) + close(), server_close(1000)),
    ("16-bit length", frame(0x2, b"y" * 300) + close(), server_close(1000)),
    ("text of 4096 bytes", frame(0x1, b"x" * 4096), server_close(1009)),
    ("64-bit length", frame(0x2, length=1 << 40), server_close(1009)),
    ("fragments over the limit", frame(0x1, b"x" * 3000, fin=False) + frame(0x0, b"x" * 3000),
     server_close(1009)),
    ("invalid UTF-8", frame(0x1, b"\xff\xfe"), server_close(1007)),
    ("invalid UTF-8 across fragments", frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"\x28"),
     server_close(1007)),
    ("UTF-8 split across fragments", frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"\xac") + close(),
     server_close(1000)),
    ("reserved bit 1", frame(0x1, b"x", rsv=4), server_close(1002)),
    ("reserved bit 3", frame(0x9, rsv=1), server_close(1002)),
    ("unknown opcode", frame(0x3, b"x"), server_close(1002)),
    ("unknown control opcode", frame(0xB), server_close(1002)),
    ("fragmented ping", frame(0x9, b"x", fin=False), server_close(1002)),
    ("ping of 126 bytes", frame(0x9, b"p" * 126), server_close(1002)),
    ("continuation first", frame(0x0, b"x"), server_close(1002)),
    ("text inside a fragmented message", frame(0x1, b"a", fin=False) + frame(0x1, b"b"), server_close(1002)),
    ("close of one byte", frame(0x8, b"\x03"), server_close(1002)),
    ("close with a reserved code", close(1005), server_close(1002)),
    ("close with code 999", close(999), server_close(1002)),
    ("close with a reason not UTF-8", close(1000, b"\xff"), server_close(1007)),
    ("ping, then a bad frame in the same read", frame(0x9, b"q") + frame(0x3),
     b"\x8a\x01q" + server_close(1002)),
    ("frames split byte by byte", b"split:" + frame(0x9, b"abc") + close(),
     b"\x8a\x03abc" + server_close(1000)),
]


async def ws_exchange(port: int, frames: bytes) -> bytes:
    """Everything the server sends after the 101 to ``frames``, until it closes the connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(ws_get(target=b"/frames"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        if frames.startswith(b"split:"):
            for i in range(6, len(frames)):
                writer.write(frames[i:i + 1])
                await writer.drain()
        else:
            writer.write(frames)
        got = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(("name", "frames", "expected"), WS_FRAMES, ids=[c[0] for c in WS_FRAMES])
async def test_client_frames_are_answered_alike_in_both_lanes(lanes: dict[str, Daemon], name: str,
                                                              frames: bytes, expected: bytes) -> None:
    got = {lane: await ws_exchange(d.port, frames) for lane, d in lanes.items()}
    assert got == {"fast": expected, "aiohttp": expected}, name


async def test_an_unmasked_client_frame_is_a_protocol_error_in_the_fast_lane(
        lanes: dict[str, Daemon]) -> None:
    """RFC 6455 section 5.1: a server closes on an unmasked client frame (1002). aiohttp's reader
    takes it (and here ignores its text): the one known difference between the lanes."""
    data = frame(0x1, b"hi", masked=False) + close()
    assert await ws_exchange(lanes["fast"].port, data) == server_close(1002)
    assert await ws_exchange(lanes["aiohttp"].port, data) == server_close(1000)


async def answers_in_turn(port: int, requests: list[bytes], timeout: float = 5.0
                          ) -> list[tuple[int, bytes]]:
    """Each request written once the answer to the one before is read, on one connection:
    (status, body) of every answer, until the connection closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    got: list[tuple[int, bytes]] = []
    try:
        for data in requests:
            writer.write(data)
            await writer.drain()
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:"))
            got.append((int(head.split(b" ", 2)[1]), await reader.readexactly(length)))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got


#: bodies of the same length (8 bytes): one request head fits them all
SAME_HEAD_BODIES = [b'{"i": 0}', b'{"i": 1}', b"{nope!!}", b'{"i": 3}', b"[1,2,34]", b'{"i": 5}',
                    b'"abcde"', b'{"i": 7}']


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_one_head_repeated_with_other_bodies(lanes: dict[str, Daemon], lane: str) -> None:
    """A publisher sends the same head each time (same target, headers, Content-Length): each
    body is read and validated on its own, a bad one answered 400 as aiohttp does, and every
    accepted one delivered with its own body."""
    d = lanes[lane]
    extra = b"Host: x\r\nUser-Agent: same-head/1\r\nContent-Type: application/json\r\n"
    requests = [put(b"/same", body, extra=extra) for body in SAME_HEAD_BODIES]
    async with subscribe(d.url, "/same") as sub:
        await wait_subscribers(d.url, 1)
        got = await answers_in_turn(d.port, requests)
        assert [status for status, _ in got] == [202, 202, 400, 202, 400, 202, 400, 202]
        assert [(await sub.next())["i"] for _ in range(5)] == [0, 1, 3, 5, 7]
    await wait_subscribers(d.url, 0)
    line = re.compile(r'pypubsub\.access: 127\.0\.0\.1 "PUT /same HTTP/1\.1" 202 \d+ \d+\.\d{6} '
                      r'"same-head/1"$', re.M)
    wait_until(lambda: len(line.findall(d.log())) >= 5, 10, "the access lines")
    assert len(line.findall(d.log())) == 5


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_one_head_repeated_across_read_boundaries(lanes: dict[str, Daemon], lane: str) -> None:
    """The same head again, but a read holds more than one request, or part of one: every
    publish answered 202, in order, each with its own body."""
    d = lanes[lane]
    reqs = [put(b"/same2", b'{"i": %d}' % i) for i in range(6)]
    async with subscribe(d.url, "/same2") as sub:
        await wait_subscribers(d.url, 1)
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            # (bytes written, publishes answered once they are in)
            writes = [(reqs[0], 1), (reqs[1] + reqs[2][:5], 2), (reqs[2][5:] + reqs[3][:-3], 3),
                      (reqs[3][-3:], 4), (reqs[4] + reqs[5], 6)]
            buf = b""
            for data, answered in writes:
                writer.write(data)
                await writer.drain()
                while buf.count(b"202 Accepted") < answered:
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    assert chunk, buf
                    buf += chunk
            assert buf.count(b"HTTP/1.1 ") == 6, buf
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert [(await sub.next())["i"] for _ in range(6)] == list(range(6))
    await wait_subscribers(d.url, 0)


#: (target, body, the status both lanes answer) on one connection, each written once the answer
#: before it is in: targets a publisher to many topics sends, each twice (the second time the
#: fast lane knows the target), then targets the lane refuses or leaves to aiohttp
OTHER_TARGETS: list[tuple[bytes, int]] = [
    (b"/sel/a", 202), (b"/sel/b?x=1", 202), (b"/sel/%62", 202), (b"/sel/x/../c", 202),
    (b"http://h:2069/sel/d", 202), (b"/private/sel/p", 202),
    (b"/sel/a", 202), (b"/sel/b?x=1", 202), (b"/sel/%62", 202), (b"/sel/x/../c", 202),
    (b"http://h:2069/sel/d", 202), (b"/private/sel/p", 202),
    (b"/sel/a\x7f", 400),  # llhttp refuses it: aiohttp's 400, which closes the connection
]


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_one_head_with_other_targets(lanes: dict[str, Daemon], lane: str) -> None:
    """A publisher sends the same headers to a different target each time: each target is read
    on its own (query dropped, percent-encoding and dot-segments resolved, private kept
    private), a refused one answered as aiohttp does, and each publish logged with its own
    target."""
    d = lanes[lane]
    extra = b"Host: x\r\nUser-Agent: other-targets/1\r\nContent-Type: application/json\r\n"
    requests = [put(t, b'{"i": %d}' % i, extra=extra) for i, (t, _) in enumerate(OTHER_TARGETS)]
    async with subscribe(d.url, "/sel") as anon, \
            subscribe(d.url, "/sel", headers=auth_header("reader", "reader-pw")) as reader:
        await wait_subscribers(d.url, 2)
        got = await answers_in_turn(d.port, requests)
        assert [status for status, _ in got] == [s for _, s in OTHER_TARGETS]
        paths = [("/sel/a", ["sel", "a"]), ("/sel/b", ["sel", "b"]), ("/sel/%62", ["sel", "b"]),
                 ("/sel/c", ["sel", "c"]), ("/sel/d", ["sel", "d"])]
        assert [((ev := await anon.next())["i"], (ev["pubsub_path"], ev["pubsub_topics"]))
                for _ in range(10)] == [*enumerate(paths), *enumerate(paths, 6)]
        seen: list[tuple[int, tuple[str, list[str]]]] = []
        while len(seen) < 12:
            ev = await reader.next()
            if "i" in ev:  # (the reader also sees private presence events)
                seen.append((ev["i"], (ev["pubsub_path"], ev["pubsub_topics"])))
        private = ("/private/sel/p", ["sel", "p"])
        assert seen == [*enumerate([*paths, private]), *enumerate([*paths, private], 6)]
    await wait_subscribers(d.url, 0)
    wait_until(lambda: d.log().count('"other-targets/1"') >= 12, 10, "the access lines")
    for t, status in OTHER_TARGETS[:-1]:
        if t.startswith(b"http://"):
            t = t[len(b"http://h:2069"):]  # the access line has the path of an absolute form
        line = re.compile(rf'pypubsub\.access: 127\.0\.0\.1 "PUT {re.escape(t.decode())} HTTP/1\.1" '
                          rf'{status} \d+ \d+\.\d{{6}} "other-targets/1"$', re.M)
        assert len(line.findall(d.log())) == 2, t


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
@pytest.mark.parametrize("target", [b"/secret", b"/x/../secret", b"/d%C3%A9", b"http://h:2069/private/secret"])
async def test_a_known_secure_target_stays_secure(lanes: dict[str, Daemon], lane: str, target: bytes) -> None:
    """A secure target another connection published to before (the fast lane has parsed it) is
    still answered 403 after a publish with the same headers elsewhere on a connection."""
    d = lanes[lane]
    extra = b"Host: x\r\nUser-Agent: secure-again/1\r\n"
    assert await status_of(d.port, put(target, extra=extra)) == 403
    got = await answers_in_turn(d.port, [put(b"/open", extra=extra), put(target, extra=extra),
                                         put(b"/open", extra=extra)])
    assert [status for status, _ in got] == [202, 403, 202]


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_a_target_known_from_another_connection(lanes: dict[str, Daemon], lane: str) -> None:
    """A target first published to on one connection, then on another with other headers (other
    method, user agent, length): served and logged with the second connection's own."""
    d = lanes[lane]
    first = put(b"/known/1", b'{"i": 0}', extra=b"Host: x\r\nUser-Agent: first/1\r\n")
    async with subscribe(d.url, "/known") as sub:
        await wait_subscribers(d.url, 1)
        assert await status_of(d.port, first) == 202
        extra = b"Host: y\r\nUser-Agent: second/1\r\n"
        got = await answers_in_turn(d.port, [
            put(b"/known/2", b'{"i": 1}', extra=extra), put(b"/known/1", b'{"i": 2}', extra=extra),
            put(b"/known/1", b'{"i": 33}', extra=extra),
            put(b"/known/1", b'{"i": 4}', extra=extra, method=b"POST"),
            put(b"/known/1", b'{"i": 5}', extra=extra)])
        assert [status for status, _ in got] == [202] * 5
        assert [(await sub.next())["i"] for _ in range(6)] == [0, 1, 2, 33, 4, 5]
    await wait_subscribers(d.url, 0)
    wait_until(lambda: d.log().count('/known/1 HTTP/1.1" 202') >= 5, 10, "the access lines")
    for method, ua, n in ((b"PUT", b"first/1", 1), (b"PUT", b"second/1", 3), (b"POST", b"second/1", 1)):
        line = re.compile(rb'pypubsub\.access: 127\.0\.0\.1 "%s /known/1 HTTP/1\.1" 202 \d+ \d+\.\d{6} "%s"$'
                          % (method, re.escape(ua)), re.M)
        assert len(line.findall(d.log().encode())) == n, (method, ua)


#: publishes whose access lines both lanes must write alike: (request target, body)
LOGGED = [(b"/logged/a", b'{"k": 1}'), (b"/logged/b?q=1", b'{"k": 2}'),
          (b"http://h:2069/logged/c", b'{"k": 3}'), (b"/logged/d", b"{nope"), (b"/logged/e", b"[1]")]


def _access_fields(log: str, agent: str) -> list[tuple[str, str, str]]:
    """(request line, status, size) of each access line written for user agent ``agent``."""
    line = re.compile(rf'pypubsub\.access: 127\.0\.0\.1 "([^"]*)" (\d+) (\S+) \d+\.\d{{6}} '
                      rf'"{re.escape(agent)}"$', re.M)
    return [(m[1], m[2], m[3]) for m in line.finditer(log)]


async def _publish_logged(d: Daemon, agent: str) -> tuple[list[int], list[tuple[str, str, str]]]:
    """Send :data:`LOGGED` on one connection: the size of each answer, and the access lines."""
    extra = b"Host: x\r\nUser-Agent: %s\r\n" % agent.encode()
    reader, writer = await asyncio.open_connection(HOST, d.port)
    sizes: list[int] = []
    try:
        for target, body in LOGGED:
            writer.write(put(target, body, extra=extra))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:"))
            sizes.append(len(head) + len(await reader.readexactly(length)))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    wait_until(lambda: len(_access_fields(d.log(), agent)) >= len(LOGGED), 10, "the access lines")
    return sizes, _access_fields(d.log(), agent)


async def test_publishes_are_logged_alike_in_both_lanes(lanes: dict[str, Daemon]) -> None:
    """The access line of a publish, accepted or refused, has the same request line (the path of
    an absolute form), status and size (the whole response's bytes) in both lanes."""
    sizes, fields = await _publish_logged(lanes["fast"], "logged-alike/1")
    assert (sizes, fields) == await _publish_logged(lanes["aiohttp"], "logged-alike/1")
    assert [r for r, _, _ in fields] == ["PUT /logged/a HTTP/1.1", "PUT /logged/b?q=1 HTTP/1.1",
                                         "PUT /logged/c HTTP/1.1", "PUT /logged/d HTTP/1.1",
                                         "PUT /logged/e HTTP/1.1"]
    assert [s for _, s, _ in fields] == ["202", "202", "202", "400", "400"]
    assert [int(n) for _, _, n in fields] == sizes
