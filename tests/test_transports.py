"""Every transport on one subscription URL, through the real daemon: Server-Sent Events,
WebSocket, query-parameter replay, CORS and the live page."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    auth_header,
    base_config,
    free_port,
    publish,
    put,
    subscribe,
    wait_subscribers,
)

NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)
SSE_ACCEPT = {"Accept": "text/event-stream"}


class SseReader:
    """Reads Server-Sent Events messages off a streaming response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []
        self.retry: int | None = None

    async def message(self, timeout: float = 5.0) -> dict[str, str]:
        """The next message: its fields (``event`` defaults to ``message``)."""
        fields: dict[str, str] = {}
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no SSE message in time")
            raw = await asyncio.wait_for(self.resp.content.readline(), left)
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    fields.setdefault("event", "message")
                    return fields
                fields = {}
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "retry":
                self.retry = int(value)
            else:
                fields[name] = fields[name] + "\n" + value if name in fields else value

    async def event(self, timeout: float = 5.0) -> dict[str, Any]:
        m = await self.message(timeout)
        assert m["event"] == "message", m
        obj: dict[str, Any] = json.loads(m["data"])
        assert m["id"] == obj["pubsub_cursor"]
        return obj


@asynccontextmanager
async def sse(url: str, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseReader]:
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as s, \
            s.get(url + path, headers={**SSE_ACCEPT, **(headers or {})}) as r:
        assert r.status == 200, await r.text()
        yield SseReader(r)


async def ws_next(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0,
                  pings: bool = False) -> dict[str, Any]:
    """The next event (or stillalive when ``pings``) from a WebSocket subscriber."""
    end = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(end - time.monotonic(), 0.01))
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        obj: dict[str, Any] = json.loads(msg.data)
        if "stillalive" in obj and not pings:
            continue
        return obj


def backlog_config(port: int, **server: Any) -> dict[str, Any]:
    return base_config(port, backlog={"size": 100, "max_age": 0}, **server)


# -- Server-Sent Events --------------------------------------------------------------------------
async def test_sse_stream(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval=0.3), port=port)
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as s, s.get(
            d.url + "/fruits/apples", headers={**SSE_ACCEPT, "Accept-Encoding": "gzip, br"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in r.headers  # never compressed
        reader = SseReader(r)
        await wait_subscribers(d.url, 1)
        await put(d, "/fruits/apples/green", {"n": 1})
        await put(d, "/fruits/pears", {"n": 2})  # not ours
        await put(d, "/fruits/apples", {"n": 3})
        async with subscribe(d.url, "/fruits/apples") as nd:  # the same object as NDJSON's line
            await wait_subscribers(d.url, 2)
            await put(d, "/fruits/apples", {"n": 4})
            line = await nd.next()
        got = [await reader.event() for _ in range(3)]
        assert [g["n"] for g in got] == [1, 3, 4]
        assert got[2] == line
        assert reader.retry == 2000
        t0 = time.monotonic()
        while not reader.comments and time.monotonic() - t0 < 5:
            with suppress(TimeoutError):
                await reader.message(timeout=0.5)
        assert reader.comments and reader.comments[0].startswith(": stillalive")


async def test_sse_last_event_id_resumes_gap_free(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=backlog_config(port), port=port)
    async with sse(d.url, "/r") as first:
        await wait_subscribers(d.url, 1)
        for i in range(3):
            await put(d, "/r", {"i": i})
        seen = [await first.event() for _ in range(3)]
    await wait_subscribers(d.url, 0)
    for i in range(3, 6):
        await put(d, "/r", {"i": i})
    # what EventSource sends when it reconnects
    async with sse(d.url, "/r", {"Last-Event-ID": seen[0]["pubsub_cursor"]}) as again:
        await put(d, "/r", {"i": 6})
        got = [(await again.event())["i"] for _ in range(6)]
        assert got == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate, in order
        with pytest.raises(TimeoutError):
            await again.event(timeout=0.3)


async def test_sse_unknown_cursor_is_a_gap_message(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=backlog_config(port), port=port)
    await put(d, "/g", {"old": True})
    unknown = "01900000-0000-7000-8000-000000000000"
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as s, s.get(
            d.url + "/g", headers={**SSE_ACCEPT, "Last-Event-ID": unknown}) as r:
        assert r.headers["X-Fetch-Since-Cursor-Found"] == "false"
        reader = SseReader(r)
        gap = await reader.message()
        assert gap["event"] == "gap"
        assert json.loads(gap["data"])["last_event_id"] == unknown
        await put(d, "/g", {"new": True})
        assert (await reader.event())["new"] is True  # continues live


async def test_sse_private_events_need_the_acl(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl={"alice": {"password": "pw", "acl": {"s": ["svn"]}}})
    async with sse(d.url, "/svn", auth_header("alice", "pw")) as alice, sse(d.url, "/svn") as anon:
        await wait_subscribers(d.url, 2)
        await put(d, "/private/svn/x", {"secret": 1})
        await put(d, "/svn", {"public": 1})
        assert (await alice.event())["secret"] == 1
        assert (await alice.event())["public"] == 1
        assert (await anon.event())["public"] == 1  # the private one never reached anon


# -- WebSocket -----------------------------------------------------------------------------------
async def test_websocket_stream(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval=0.3), port=port)
    async with aiohttp.ClientSession() as s, s.ws_connect(d.url + "/fruits", autoping=True) as ws:
        assert ws.compress == 0  # compression off: one framed bytes object serves everyone
        await wait_subscribers(d.url, 1)
        await put(d, "/fruits/apples", {"n": 1})
        await put(d, "/veg", {"n": 2})
        await put(d, "/fruits", {"n": 3})
        assert (await ws_next(ws))["n"] == 1
        ev = await ws_next(ws)
        assert ev["n"] == 3 and ev["pubsub_topics"] == ["fruits"] and "pubsub_cursor" in ev
        ping = await ws_next(ws, pings=True)
        assert set(ping) == {"stillalive"}


async def test_websocket_protocol_pings_find_dead_peers(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval=0.3), port=port)
    # a client that never answers pings
    async with aiohttp.ClientSession() as s, s.ws_connect(d.url + "/p", autoping=False) as ws:
        await wait_subscribers(d.url, 1)
        kinds = set()
        for _ in range(20):
            msg = await ws.receive(timeout=5)
            kinds.add(msg.type)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
        assert aiohttp.WSMsgType.PING in kinds
    await wait_subscribers(d.url, 0)  # dropped for not answering


async def test_websocket_close_1001_at_shutdown(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(daemon.url + "/t") as ws:
        await wait_subscribers(daemon.url, 1)
        daemon.signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1001
    assert daemon.proc is not None and daemon.proc.wait(10) == 0


def _ws_handshake(port: int, path: str = "/big") -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((HOST, port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    return s


async def test_websocket_slow_subscriber_is_closed_and_delays_no_one(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, stream_buffer=65536, max_payload_size=200_000),
                       port=port)
    stalled = _ws_handshake(port)
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(d.url + "/big") as ws:
            await wait_subscribers(d.url, 2)
            pad = "x" * 50_000
            for i in range(200):  # the kernel's buffers take a few MB before ours fills
                await put(d, "/big", {"i": i, "pad": pad})
                assert (await ws_next(ws))["i"] == i
            d.wait_log("disconnecting slow subscriber")
            await wait_subscribers(d.url, 1)
    finally:
        stalled.close()


async def test_websocket_origin_check(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, cors_origins=["https://app.example"]), port=port)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(d.url + "/t", headers={"Origin": "https://evil.example"})
        assert e.value.status == 403
        for origin in (f"http://{HOST}:{port}", "https://app.example"):
            async with s.ws_connect(d.url + "/t", headers={"Origin": origin}) as ws:
                await wait_subscribers(d.url, 1)
                await put(d, "/t", {"origin": origin})
                assert (await ws_next(ws))["origin"] == origin
            await wait_subscribers(d.url, 0)


async def test_websocket_private_events_and_replay(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=backlog_config(port), port=port,
                       acl={"alice": {"password": "pw", "acl": {"s": ["svn"]}}})
    await put(d, "/private/svn", {"i": 0})
    await put(d, "/svn", {"i": 1})
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(d.url + "/svn?since=0", headers=auth_header("alice", "pw")) as alice, \
            s.ws_connect(d.url + "/svn?since=0") as anon:
        assert [(await ws_next(alice))["i"] for _ in range(2)] == [0, 1]
        assert (await ws_next(anon))["i"] == 1
        await put(d, "/private/svn", {"i": 2})
        await put(d, "/svn", {"i": 3})
        assert [(await ws_next(alice))["i"] for _ in range(2)] == [2, 3]
        assert (await ws_next(anon))["i"] == 3
        async with s.ws_connect(d.url + "/svn?last_event_id=01900000-0000-7000-8000-000000000000") as g:
            assert "pubsub_gap" in await ws_next(g)


# -- query parameters on every transport ---------------------------------------------------------
async def test_query_parameters_replay_on_every_transport(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=backlog_config(port), port=port)
    cursors = []
    for i in range(3):
        await put(d, "/q/a", {"i": i})
    async with sse(d.url, "/q?since=0") as r:
        for _ in range(3):
            cursors.append((await r.event())["pubsub_cursor"])
    c0 = cursors[0]
    # NDJSON (plain GET: the fast lane hands a query string to the full handler)
    async with subscribe(d.url, f"/q?last_event_id={c0}") as nd:
        assert [(await nd.next())["i"] for _ in range(2)] == [1, 2]
    async with sse(d.url, f"/q?last_event_id={c0}") as r:
        assert [(await r.event())["i"] for _ in range(2)] == [1, 2]
    async with aiohttp.ClientSession() as s, s.ws_connect(d.url + f"/q?last_event_id={c0}") as ws:
        assert [(await ws_next(ws))["i"] for _ in range(2)] == [1, 2]
    # a query string never changes the topics: /q/b?x=/q/a is still /q/b
    async with subscribe(d.url, "/q/b?since=0&topics=/q/a") as nd:
        await nd.expect_none(0.3)
    # the header wins over the query (an EventSource reconnecting keeps its first URL)
    async with sse(d.url, f"/q?last_event_id={c0}", {"Last-Event-ID": cursors[1]}) as r:
        assert (await r.event())["i"] == 2


@pytest.mark.parametrize("query", ["since=yesterday", "since=nan", "since=inf"])
async def test_bad_since_is_400_on_every_transport(daemon: Daemon, query: str) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, SSE_ACCEPT):
            async with s.get(daemon.url + "/q?" + query, headers=headers) as r:
                assert r.status == 400
                assert "X-Fetch-Since" in await r.text()
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(daemon.url + "/q?" + query)
        assert e.value.status == 400


# -- CORS ----------------------------------------------------------------------------------------
async def test_cors(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, cors_origins=["https://app.example"]), port=port)
    ok, evil = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
    async with aiohttp.ClientSession(timeout=NO_TIMEOUT) as s:
        async with s.options(d.url + "/t", headers={**ok, "Access-Control-Request-Method": "PUT",
                                                     "Access-Control-Request-Headers": "content-type"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "PUT" in r.headers["Access-Control-Allow-Methods"]
            assert "Last-Event-ID" in r.headers["Access-Control-Allow-Headers"]
            assert "Origin" in r.headers["Vary"]
        async with s.options(d.url + "/t", headers={**evil, "Access-Control-Request-Method": "PUT"}) as r:
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers
        async with s.put(d.url + "/t", json={"a": 1}, headers=ok) as r:
            assert r.status == 202
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Vary"] == "Origin"
        async with s.put(d.url + "/t", json={"a": 1}, headers=evil) as r:
            assert r.status == 202 and "Access-Control-Allow-Origin" not in r.headers
        for headers in ({}, SSE_ACCEPT):
            async with s.get(d.url + "/t", headers={**ok, **headers}) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert r.headers["Vary"] == "Origin"


async def test_cors_star_never_allows_credentials(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, cors_origins="*"), port=port)
    async with aiohttp.ClientSession() as s, s.put(d.url + "/t", json={},
                                                   headers={"Origin": "https://x.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://x.example"
        assert "Access-Control-Allow-Credentials" not in r.headers


async def test_no_cors_by_default(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.put(daemon.url + "/t", json={}, headers={"Origin": "https://x.example"}) as r:
            assert r.status == 202 and "Access-Control-Allow-Origin" not in r.headers
        async with s.options(daemon.url + "/t", headers={"Origin": "https://x.example",
                                                         "Access-Control-Request-Method": "GET"}) as r:
            assert r.status == 405


def test_bad_cors_origin_is_a_config_error(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, cors_origins=["app.example/path"]), port=port,
                       start=False)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(20) != 0
    assert "server.cors_origins[0]" in d.log()


# -- the live page -------------------------------------------------------------------------------
async def test_browser_navigation_gets_the_page(daemon: Daemon) -> None:
    nav = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    async with aiohttp.ClientSession() as s, s.get(daemon.url + "/fruits/apples", headers=nav) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src 'sha256-" in r.headers["Content-Security-Policy"]
        body = await r.text()
        assert "class PubSubSubscription" in body and "<script type=\"module\">" in body
        assert "http://" not in body.split("<script", 1)[1] and "https://" not in body.split("<script", 1)[1]
    assert await publish(daemon.url, "/fruits/apples", {}) == (202, await _accepted())


async def _accepted() -> str:
    from server.app import ACCEPTED_TEXT
    return ACCEPTED_TEXT


async def test_sse_resumes_across_a_restart_with_a_persistent_backlog(daemon_factory: DaemonFactory,
                                                                      tmp_path: Any) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, backlog={
        "size": 100, "max_age": 0, "storage": str(tmp_path / "log.sqlite")}), port=port)
    async with sse(d.url, "/p") as r:
        await wait_subscribers(d.url, 1)
        await put(d, "/p", {"n": "before"})
        last = (await r.event())["pubsub_cursor"]
        d.restart()
        with pytest.raises(EOFError):
            await r.message()
    await put(d, "/p", {"n": "during"})
    async with sse(d.url, "/p", {"Last-Event-ID": last}) as again:
        assert (await again.event())["n"] == "during"
        await put(d, "/p", {"n": "after"})
        assert (await again.event())["n"] == "after"


async def test_acl_reload_reauthorises_sse_and_websocket_streams(daemon_factory: DaemonFactory) -> None:
    users: dict[str, Any] = {"alice": {"password": "pw", "acl": {"s": ["svn"]}},
                             "carol": {"password": "pw2"}}
    d = daemon_factory(acl=users)
    async with aiohttp.ClientSession() as s, \
            sse(d.url, "/svn", auth_header("alice", "pw")) as alice_sse, \
            s.ws_connect(d.url + "/svn", headers=auth_header("alice", "pw")) as alice_ws, \
            s.ws_connect(d.url + "/svn", headers=auth_header("carol", "pw2")) as carol_ws:
        await wait_subscribers(d.url, 3)
        await put(d, "/private/svn", {"n": 1})
        assert (await alice_sse.event())["n"] == 1
        assert (await ws_next(alice_ws))["n"] == 1
        users["alice"]["acl"] = {}
        users["carol"]["acl"] = {"s": ["svn"]}
        tmp = d.acl_path.with_suffix(".tmp")  # replaced whole: a reload never reads half a file
        tmp.write_text(yaml.safe_dump(users))
        tmp.replace(d.acl_path)
        d.signal(signal.SIGUSR2)
        d.wait_log("ACL reloaded from")
        assert "3 open stream(s) re-authorised, 3 changed" in d.log()
        await put(d, "/private/svn", {"n": 2})
        await put(d, "/svn", {"n": 3})
        assert (await alice_sse.event())["n"] == 3  # still connected, public events only
        assert (await ws_next(alice_ws))["n"] == 3
        assert [(await ws_next(carol_ws))["n"] for _ in range(2)] == [2, 3]


async def test_ndjson_with_last_event_id_is_replayed_not_served_live(daemon_factory: DaemonFactory) -> None:
    """A plain GET carrying Last-Event-ID (an EventSource reconnect through a proxy that strips
    Accept, or any client) gets the replay: the fast lane hands it to the full handler."""
    port = free_port()
    d = daemon_factory(config=backlog_config(port), port=port)
    for i in range(3):
        await put(d, "/n", {"i": i})
    async with subscribe(d.url, "/n", {"X-Fetch-Since": "0"}) as all_:
        first = await all_.next()
    async with subscribe(d.url, "/n", {"Last-Event-ID": first["pubsub_cursor"]}) as nd:
        assert [(await nd.next())["i"] for _ in range(2)] == [1, 2]


async def test_sse_on_http10_is_close_delimited(daemon: Daemon) -> None:
    reader, writer = await asyncio.open_connection(HOST, daemon.port)
    try:
        writer.write(b"GET /old HTTP/1.0\r\nAccept: text/event-stream\r\nUser-Agent: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"text/event-stream" in head and b"chunked" not in head.lower()
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5) == b"retry: 2000\n\n"
        await wait_subscribers(daemon.url, 1)
        await put(daemon, "/old", {"v": 1})
        rec = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert rec.startswith(b"id: ") and b'"v":1' in rec
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bad_websocket_handshakes_and_chatty_clients(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(daemon.url + "/t", headers={"Upgrade": "websocket", "Connection": "Upgrade"}) as r:
            assert r.status == 400  # no Sec-WebSocket-Key: aiohttp refuses the handshake
        async with s.ws_connect(daemon.url + "/t") as ws:
            await wait_subscribers(daemon.url, 1)
            await ws.send_str("hello")  # ignored: a subscriber has nothing to say
            await put(daemon, "/t", {"still": "served"})
            assert (await ws_next(ws))["still"] == "served"
            await ws.send_str("x" * 10_000)  # over the limit: the daemon closes (1009)
            msg = await ws.receive(timeout=5)
            while msg.type is aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await wait_subscribers(daemon.url, 0)
        assert (await publish(daemon.url, "/t", {}))[0] == 202  # and it keeps serving
