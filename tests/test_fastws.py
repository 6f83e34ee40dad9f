"""WebSocket subscribers in the fast lane: the frame reader (pure), the handshake's answer, and
the connection's life against the real daemon (raw sockets and aiohttp's client).

Byte-for-byte parity with the aiohttp lane (handshakes and the answers to client frames) is in
tests/test_lanes_table.py; the behaviour every WebSocket has whatever the lane is in
tests/test_transports.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import aiohttp
import pytest

from server.cors import Cors
from server.fastws import MAX_INCOMING, FrameReader, WsError, handshake_head
from tests.support import (
    HOST,
    DaemonFactory,
    auth_header,
    base_config,
    free_port,
    put,
    subscriber_count,
    wait_subscribers,
)
from tests.test_admin import admin_daemon, sample, wait_sample
from tests.test_lanes_table import close, frame, server_close, ws_get
from tests.test_transports import ws_next


# -- the frame reader ----------------------------------------------------------------------------
def test_masked_frames_are_unmasked_and_control_frames_kept() -> None:
    r = FrameReader()
    data = frame(0x1, "héllo".encode()) + frame(0x9, b"p") + frame(0xA) + frame(0x2, b"\x00" * 300)
    assert r.feed(data) == [(0x1, "héllo".encode()), (0x9, b"p"), (0xA, b""), (0x2, b"\x00" * 300)]
    assert r.idle


def test_frames_split_anywhere_come_out_whole() -> None:
    data = frame(0x9, b"abc") + frame(0x1, b"x" * 200) + close(1000, b"bye")
    for cut in range(len(data) + 1):
        r = FrameReader()
        got = r.feed(data[:cut]) + r.feed(data[cut:])
        assert got == [(0x9, b"abc"), (0x1, b"x" * 200), (0x8, b"\x03\xe8bye")], cut
        assert r.idle
    r = FrameReader()
    got = [f for b in data for f in r.feed(bytes((b,)))]
    assert [op for op, _ in got] == [0x9, 0x1, 0x8]


def test_a_fragmented_message_is_joined_and_controls_may_interleave() -> None:
    r = FrameReader()
    assert r.feed(frame(0x1, b"ab", fin=False)) == []
    assert not r.idle  # a message in progress: the reader is kept
    assert r.feed(frame(0x9, b"!") + frame(0x0, b"cd", fin=False)) == [(0x9, b"!")]
    assert r.feed(frame(0x0, b"ef")) == [(0x1, b"abcdef")]
    assert r.idle


@pytest.mark.parametrize(("data", "code"), [
    (frame(0x1, b"x", masked=False), 1002),
    (frame(0x1, b"x", rsv=4), 1002),
    (frame(0x1, b"x", rsv=2), 1002),
    (frame(0x1, b"x", rsv=1), 1002),
    (frame(0x3), 1002),
    (frame(0xF), 1002),
    (frame(0x9, fin=False), 1002),
    (frame(0x8, b"\x03\xe8" + b"r" * 124), 1002),
    (frame(0x0, b"x"), 1002),
    (frame(0x2, b"a", fin=False) + frame(0x1, b"b"), 1002),
    (frame(0x2, b"a", fin=False) + frame(0x2, b"b", fin=False), 1002),
    (frame(0x8, b"\x03"), 1002),
    (close(1004), 1002),
    (close(2999), 1002),
    (close(1000, b"\xc3"), 1007),
    (frame(0x1, b"\xc3\x28"), 1007),
    (frame(0x1, b"x" * MAX_INCOMING), 1009),
    (frame(0x1, length=1 << 62)[:14], 1009),  # refused from its header, before any payload
    (frame(0x1, b"x" * 2048, fin=False) + frame(0x0, b"x" * 2048), 1009),
])
def test_protocol_errors_carry_the_close_code(data: bytes, code: int) -> None:
    with pytest.raises(WsError) as e:
        FrameReader().feed(data)
    assert e.value.code == code


def test_what_came_before_a_bad_frame_is_kept() -> None:
    with pytest.raises(WsError) as e:
        FrameReader().feed(frame(0x9, b"1") + frame(0x2, b"2") + frame(0x3))
    assert e.value.before == [(0x9, b"1"), (0x2, b"2")]


def test_close_codes_a_peer_may_send() -> None:
    for code in (1000, 1001, 1011, 1014, 3000, 4999, 65535):
        assert FrameReader().feed(close(code)) == [(0x8, code.to_bytes(2, "big"))]
    assert FrameReader().feed(close(None)) == [(0x8, b"")]


# -- the handshake's answer ----------------------------------------------------------------------
H = {b"host": b"x", b"upgrade": b"websocket", b"connection": b"Upgrade",
     b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==", b"sec-websocket-version": b"13"}


def test_the_accept_value_is_rfc_6455s_example() -> None:
    head = handshake_head(H, Cors(()))
    assert head is not None
    assert head[0].startswith(b"HTTP/1.1 101 Switching Protocols\r\nServer: PyPubSub/")
    assert head[0].endswith(b"Upgrade: websocket\r\nConnection: upgrade\r\n"
                            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
    assert head[1] == b""


def test_origins_and_cors_headers() -> None:
    cors = Cors(("https://app.example",))
    assert handshake_head({**H, b"origin": b"https://evil.example"}, cors) is None
    assert handshake_head({**H, b"origin": b"https://x"}, cors) is None  # not our scheme
    own = handshake_head({**H, b"origin": b"http://x"}, cors)
    assert own is not None and own[1] == b"Vary: Origin\r\n"
    listed = handshake_head({**H, b"origin": b"https://app.example"}, cors)
    assert listed is not None and listed[1].startswith(
        b"Access-Control-Allow-Origin: https://app.example\r\nVary: Origin\r\n")
    assert b"Access-Control-Allow-Credentials: true\r\n" in listed[1]
    star = handshake_head({**H, b"origin": b"https://any.example"}, Cors(("*",)))
    assert star is not None and b"Credentials" not in star[1]
    assert handshake_head({**H, b"origin": b"http://\xc3\xa9"}, Cors(("*",))) is None  # aiohttp's


# -- against the daemon --------------------------------------------------------------------------
#: the life of a WebSocket is the same whichever lane answered its handshake: these tests run
#: on both (the fast lane, and aiohttp's WebSocketResponse with the fast lane turned off)
LANES = ["fast", "aiohttp"]

async def test_plain_handshakes_are_served_by_the_fast_lane(daemon_factory: DaemonFactory) -> None:
    """aiohttp's client and a browser-like handshake are the fast lane's, events and all; a
    replay or credentials leave the handshake to aiohttp."""
    d = admin_daemon(daemon_factory, acl={"alice": {"password": "pw", "acl": {}}})
    served = await sample(d, "pypubsub_fastlane_served_total")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(d.url + "/t", headers={"Origin": d.url}) as ws:
            await wait_sample(d, "pypubsub_fastlane_served_total", served + 1)
            await put(d, "/t", {"k": 1})
            ev = await ws_next(ws)
            assert ev["k"] == 1 and ev["pubsub_topics"] == ["t"]
        await wait_subscribers(d.url, 0)
        served = await sample(d, "pypubsub_fastlane_served_total")
        for url, headers in ((d.url + "/t?since=0", {}), (d.url + "/t", auth_header("alice", "pw"))):
            async with s.ws_connect(url, headers=headers):
                await wait_subscribers(d.url, 1)
            await wait_subscribers(d.url, 0)
        assert await sample(d, "pypubsub_fastlane_served_total") == served


class RawWs:
    """A WebSocket client on a raw socket: it answers nothing unless told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, target: bytes = b"/t", rcvbuf: int = 0) -> RawWs:
        sock = socket.socket()
        if rcvbuf:  # a small window: the kernel holds little of what a stalled reader owes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(ws_get(target=target))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame the server sends: (first byte, payload); (0, b"") at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        except asyncio.IncompleteReadError:
            return 0, b""
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0], await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.mark.parametrize("lane", LANES)
async def test_a_peer_that_never_answers_pings_is_dropped(daemon_factory: DaemonFactory, lane: str) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval=0.4, fast_lane=lane == "fast"), port=port)
    silent = await RawWs.connect(port)
    try:
        await wait_subscribers(d.url, 1)
        seen: list[tuple[int, bytes]] = []
        for _ in range(50):
            f = await silent.frame()
            seen.append(f)
            if f == (0, b""):
                break
        assert (0x89, b"") in seen, seen  # protocol pings
        assert seen[-1] == (0, b""), seen  # then the connection ends
        assert all(op in (0x81, 0x89) for op, _ in seen[:-1]), seen  # no close frame: it is dead
        await wait_subscribers(d.url, 0)
    finally:
        await silent.close()


@pytest.mark.parametrize("lane", LANES)
async def test_a_peer_that_answers_pings_stays(daemon_factory: DaemonFactory, lane: str) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, ping_interval=0.3, fast_lane=lane == "fast"), port=port)
    alive = await RawWs.connect(port)
    try:
        await wait_subscribers(d.url, 1)
        pings = 0
        while pings < 5:  # more than two intervals' worth
            op, payload = await alive.frame()
            assert op in (0x81, 0x89), (op, payload)
            if op == 0x89:
                pings += 1
                alive.writer.write(frame(0xA, payload))
        await put(d, "/t", {"still": "here"})
        while (f := await alive.frame())[0] != 0x81 or b"still" not in f[1]:
            if f[0] == 0x89:
                alive.writer.write(frame(0xA, f[1]))
        assert await subscriber_count(d.url) == 1
    finally:
        await alive.close()


@pytest.mark.parametrize("lane", LANES)
async def test_close_1001_at_shutdown_then_the_closing_handshake(daemon_factory: DaemonFactory,
                                                                 lane: str) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, fast_lane=lane == "fast"), port=port)
    ws = await RawWs.connect(d.port)
    try:
        await wait_subscribers(d.url, 1)
        d.signal(signal.SIGTERM)
        op, payload = await ws.frame(10)
        while op == 0x81:  # stillalive
            op, payload = await ws.frame(10)
        assert (op, payload) == (0x88, server_close(1001, b"server shutting down")[2:])
        # the daemon waits for our close frame (up to its close timeout, 2 s) before it closes
        # the connection: a close of its own first makes our frame meet a reset
        with pytest.raises(TimeoutError):
            await ws.frame(0.5)
        ws.writer.write(close(1001))
        assert await ws.frame() == (0, b"")  # our close answered: the daemon closes
    finally:
        await ws.close()
    assert d.proc is not None and d.proc.wait(10) == 0


@pytest.mark.parametrize("lane", LANES)
async def test_a_slow_websocket_gets_1008(daemon_factory: DaemonFactory, lane: str) -> None:
    """A subscriber over its buffer is sent close 1008 after what is queued for it."""
    port = free_port()
    d = daemon_factory(config=base_config(port, stream_buffer=65536, max_payload_size=200_000,
                                          fast_lane=lane == "fast"), port=port)
    slow = await RawWs.connect(port, b"/big", rcvbuf=4096)
    try:
        await wait_subscribers(d.url, 1)
        pad = "x" * 50_000
        i = 0
        while "disconnecting slow subscriber" not in d.log():
            await put(d, "/big", {"i": i, "pad": pad})
            i += 1
            assert i < 500, "never disconnected"
        frames = []
        while (f := await slow.frame())[0]:
            frames.append(f)
        assert frames[-1] == (0x88, server_close(1008, b"too slow: resume by cursor")[2:])
        await wait_subscribers(d.url, 0)
    finally:
        await slow.close()


@pytest.mark.parametrize("lane", LANES)
async def test_connections_are_counted_until_they_end(daemon_factory: DaemonFactory, lane: str) -> None:
    """A WebSocket holds its slot in max_connections_per_ip until it ends."""
    port = free_port()
    d = daemon_factory(config=base_config(port, max_connections_per_ip=3, fast_lane=lane == "fast"),
                       port=port)
    for rounds in range(1, 4):  # more rounds than slots: every end gave its slot back
        held = [await RawWs.connect(port) for _ in range(3)]
        try:
            over = await RawWs.connect(port)
            op, payload = await over.frame()
            assert (op, payload[:2]) == (0x88, (1013).to_bytes(2, "big"))
            await over.close()
        finally:
            for ws in held:
                ws.writer.write(close())
                assert (await ws.frame())[0] == 0x88
                await ws.close()
        d.wait_log("websocket> ended: gone", count=3 * rounds)


async def test_a_peer_that_does_not_read_its_pongs_is_disconnected(daemon_factory: DaemonFactory) -> None:
    """Pings whose pongs the peer never reads fill its buffer like events do: it is dropped as
    a slow subscriber, and the daemon keeps serving."""
    port = free_port()
    # (no keep-alive within the test: only the pongs fill the buffer)
    d = daemon_factory(config=base_config(port, stream_buffer=65536, ping_interval=600), port=port)
    flood = await RawWs.connect(port, rcvbuf=4096)
    try:
        await wait_subscribers(d.url, 1)
        ping = frame(0x9, b"p" * 125)
        with contextlib.suppress(ConnectionError):
            for _ in range(400):  # 400 writes of 100 pings: megabytes of pongs
                if "disconnecting slow subscriber" in d.log():
                    break
                flood.writer.write(ping * 100)
                await asyncio.wait_for(flood.writer.drain(), 10)
        d.wait_log("disconnecting slow subscriber")
        await wait_subscribers(d.url, 0)
    finally:
        await flood.close()


@pytest.mark.parametrize("lane", LANES)
async def test_shutdown_does_not_wait_for_a_peer_that_never_answers_the_close(
        daemon_factory: DaemonFactory, lane: str) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, fast_lane=lane == "fast", shutdown_grace=1), port=port)
    mute = await RawWs.connect(port)
    try:
        await wait_subscribers(d.url, 1)
        d.signal(signal.SIGTERM)
        op, payload = await mute.frame(10)
        while op == 0x81:
            op, payload = await mute.frame(10)
        assert op == 0x88 and payload[:2] == (1001).to_bytes(2, "big")
        assert await mute.frame(10) == (0, b"")  # closed without our answer
        assert d.proc is not None and d.proc.wait(10) == 0
    finally:
        await mute.close()
