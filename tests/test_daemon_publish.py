"""Functional tests through the real daemon: topics, publishing, refusals, HEAD, methods.

Most tests run twice: through the fast lane and through aiohttp's full handler (a
``Connection: keep-alive`` header sends a request down the aiohttp path), so both paths are
held to the same behaviour.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import aiohttp
import pytest

from tests.support import (
    HOST,
    Daemon,
    base_config,
    free_port,
    publish,
    subscribe,
    subscriber_count,
    wait_subscribers,
)

LANES = {"fast": {}, "aiohttp": {"Connection": "keep-alive"}}


@pytest.fixture(params=sorted(LANES))
def lane(request: pytest.FixtureRequest) -> dict[str, str]:
    return dict(LANES[request.param])


async def test_readme_topic_matrix(daemon: Daemon, lane: dict[str, str]) -> None:
    async with subscribe(daemon.url, "/fruits/apples", headers=lane) as sub:
        await wait_subscribers(daemon.url, 1)
        for path in ("/fruits/apples", "/fruits/apples/red", "/fruits/oranges", "/fruits",
                     "/apples/fruits"):
            status, text = await publish(daemon.url, path, {"path": path}, headers=lane)
            assert status == 202, text
            assert text == "Payload received, thank you very much!\n"
        got = [(await sub.next())["path"] for _ in range(3)]
        assert got == ["/fruits/apples", "/fruits/apples/red", "/apples/fruits"]
        await sub.expect_none(0.3)


async def test_order_agnostic_batches_and_everything(daemon: Daemon) -> None:
    async with subscribe(daemon.url, "/b/a") as ab, subscribe(daemon.url, "/x/y,/z") as batches, \
            subscribe(daemon.url, "/") as everything:
        await wait_subscribers(daemon.url, 3)
        for path in ("/a/b/c", "/z", "/y", "/y/x", "/private/z"):
            assert (await publish(daemon.url, path, {"p": path}))[0] == 202
        assert (await ab.next())["p"] == "/a/b/c"
        assert [(await batches.next())["p"] for _ in range(2)] == ["/z", "/y/x"]
        assert [(await everything.next())["p"] for _ in range(4)] == ["/a/b/c", "/z", "/y", "/y/x"]
        await everything.expect_none(0.3)  # the private event went to nobody here
        await batches.expect_none(0.1)


async def test_percent_encoded_segments(daemon: Daemon) -> None:
    async with subscribe(daemon.url, "/caf%C3%A9/a%20b") as sub:
        await wait_subscribers(daemon.url, 1)
        assert (await publish(daemon.url, "/a%20b/caf%C3%A9/x", {"k": 1}))[0] == 202
        ev = await sub.next()
        assert ev["pubsub_topics"] == ["a b", "café", "x"]


async def test_stamps_win_and_input_kept(daemon: Daemon, lane: dict[str, str]) -> None:
    async with subscribe(daemon.url, "/s") as sub:
        await wait_subscribers(daemon.url, 1)
        body = {"pubsub_path": "/forged", "pubsub_topics": ["forged"], "pubsub_cursor": "x",
                "pubsub_timestamp": 1, "n": 2**70}
        assert (await publish(daemon.url, "/s/t", body, method="POST", headers=lane))[0] == 202
        ev = await sub.next()
        assert ev["pubsub_path"] == "/s/t" and ev["pubsub_topics"] == ["s", "t"]
        assert ev["pubsub_cursor"] != "x" and ev["pubsub_timestamp"] > 1e9
        assert ev["n"] == 2**70


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty body"),
    (b"   ", "empty body"),
    (b"{not json", "not valid JSON"),
    (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
    (b"[1, 2]", "not an array"),
    (b'"text"', "not a string"),
    (b"42", "not a number"),
    (b"null", "not null"),
])
async def test_bad_bodies_get_400_and_the_daemon_keeps_serving(
        daemon: Daemon, lane: dict[str, str], data: bytes, reason: str) -> None:
    async with subscribe(daemon.url, "/ok") as sub:
        await wait_subscribers(daemon.url, 1)
        status, text = await publish(daemon.url, "/ok", data=data, headers=lane)
        assert status == 400 and reason in text and text.count("\n") == 1, text
        assert (await publish(daemon.url, "/ok", {"fine": True}, headers=lane))[0] == 202
        assert (await sub.next())["fine"] is True
    assert "400 PUT /ok from 127.0.0.1: " in daemon.log()


async def test_payload_limit_on_bytes_read(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, max_payload_size=1000), port=port)
    big = json.dumps({"x": "y" * 2000}).encode()
    status, text = await publish(d.url, "/t", data=big)
    assert status == 413 and "max_payload_size" in text

    async def chunked() -> object:  # no Content-Length: the limit applies to what is read
        yield b'{"x": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'
    async with aiohttp.ClientSession() as s, s.put(d.url + "/t", data=chunked()) as r:
        assert r.status == 413, await r.text()

    async def small() -> object:
        yield b'{"x": '
        yield b'"ok"}'
    async with subscribe(d.url, "/t") as sub:
        await wait_subscribers(d.url, 1)
        async with aiohttp.ClientSession() as s, s.put(d.url + "/t", data=small()) as r:
            assert r.status == 202
        assert (await sub.next())["x"] == "ok"


async def test_allow_list_ipv4(daemon_factory: Callable[..., Daemon], lane: dict[str, str]) -> None:
    port = free_port()
    cfg = base_config(port)
    cfg["clients"]["payloaders"] = ["10.0.0.0/8", "127.0.0.2/32"]
    d = daemon_factory(config=cfg, port=port)
    status, text = await publish(d.url, "/t", {"a": 1}, headers=lane)
    assert status == 403 and "127.0.0.1" in text
    # 127.0.0.2 is allowed: bind the client socket there
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=conn) as s, s.put(d.url + "/t", json={"a": 1},
                                                                 headers=lane) as r:
        assert r.status == 202


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_allow_list_ipv6(daemon_factory: Callable[..., Daemon], lane: dict[str, str]) -> None:
    assert _has_ipv6_loopback(), "this test needs an IPv6 loopback (::1)"
    port = free_port("::1")
    cfg = base_config(port)
    cfg["server"]["bind"] = ["::1", HOST]
    cfg["clients"]["payloaders"] = ["::1/128"]
    d = daemon_factory(config=cfg, port=port)
    url6 = f"http://[::1]:{port}"
    async with subscribe(url6, "/v6") as sub:
        await wait_subscribers(url6, 1)
        assert (await publish(url6, "/v6", {"via": "ipv6"}, headers=lane))[0] == 202
        assert (await sub.next())["via"] == "ipv6"
    status, _ = await publish(d.url, "/v6", {"via": "ipv4"}, headers=lane)
    assert status == 403
    cfg["clients"]["payloaders"] = ["2001:db8::/32", "127.0.0.1"]
    d.stop()
    d.config = cfg
    d.write_files()
    d.start()
    assert (await publish(url6, "/v6", {"a": 1}, headers=lane))[0] == 403
    assert (await publish(d.url, "/v6", {"a": 1}, headers=lane))[0] == 202


async def test_head_and_methods(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.head(daemon.url + "/") as r:
            assert r.status == 204
            assert r.headers["Server"].startswith("PyPubSub/")
            assert r.headers["X-Subscribers"] == "0"
        for method in ("DELETE", "PATCH", "OPTIONS"):
            async with s.request(method, daemon.url + "/x") as r:
                assert r.status == 405
                assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PUT", "POST"}
    async with subscribe(daemon.url, "/a"), subscribe(daemon.url, "/b"):
        await wait_subscribers(daemon.url, 2)
    await wait_subscribers(daemon.url, 0)


async def test_subscriber_header_can_be_turned_off(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, subscriber_header=False), port=port)
    async with aiohttp.ClientSession() as s, s.head(d.url + "/") as r:
        assert r.status == 204 and "X-Subscribers" not in r.headers


async def test_pings(daemon_factory: Callable[..., Daemon], lane: dict[str, str]) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval="0.2"), port=port)
    async with subscribe(d.url, "/quiet", headers=lane) as sub:
        p1 = await sub.next(timeout=3, pings=True)
        p2 = await sub.next(timeout=3, pings=True)
        assert isinstance(p1["stillalive"], float) and p2["stillalive"] > p1["stillalive"]


async def test_pipelined_publishes_on_one_connection(daemon: Daemon) -> None:
    """Keep-alive and pipelining in the fast lane: three requests in one write."""
    async with subscribe(daemon.url, "/pipe") as sub:
        await wait_subscribers(daemon.url, 1)
        reqs = b"".join(
            b"PUT /pipe HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in (b'{"n": 1}', b'{"n": 2}', b"[3]"))
        reader, writer = await asyncio.open_connection(HOST, daemon.port)
        writer.write(reqs)
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1") < 3:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        writer.close()
        await writer.wait_closed()
        assert data.count(b"202 Accepted") == 2 and b"400 Bad Request" in data
        assert [(await sub.next())["n"] for _ in range(2)] == [1, 2]
    assert await subscriber_count(daemon.url) >= 0
