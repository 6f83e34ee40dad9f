"""WebSocket subscribers in the fast lane: the handshake's answer, the connection's life, and
reading what the client sends.

Owns

* :func:`handshake_head`: the ``101`` aiohttp's ``WebSocketResponse`` writes for the same
  request (Server, Upgrade, Connection, Sec-WebSocket-Accept, Date, then the CORS headers, no
  extension), or None when the request is not one the fast lane answers (a foreign ``Origin``:
  aiohttp answers the 403, and every refusal, itself);
* :class:`FrameReader`: a pure parser of client frames (masked, fragmented, control frames) that
  raises :class:`WsError` with the close code aiohttp's reader would send (1002 protocol error,
  1007 invalid UTF-8, 1009 too big), and 1002 for an unmasked client frame (RFC 6455 section
  5.1; aiohttp's reader accepts one);
* :class:`WsConn`: the protocol of one subscriber after the handshake: answers pings, the
  closing handshake (close 1000 after the peer's close, 1001 at shutdown), drops a peer that
  stops answering protocol pings; events are written by the hub straight to the transport
  (``server.formats.WEBSOCKET``, one bytes object per group) as for every stream;
* :class:`WsLane`: the connections of one fast lane and the one timer that pings them all.

An idle subscriber costs a :class:`WsConn` (about 150 bytes) besides the transport and its
:class:`~server.stream.Stream`: no task, no request, no reader, writer or timer of its own.
It knows nothing of request parsing (``server.fastlane`` hands a connection over once its head
was negotiated) nor of aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from server.app import SERVER_HEADER, State
from server.cors import Cors
from server.formats import WEBSOCKET, WS_GOING_AWAY, ws_close_frame, ws_control_frame
from server.logs import log_access
from server.stream import Stream, close_stream, open_stream

if TYPE_CHECKING:
    from hub.topics import TopicSpec
    from server.fastlane import FastLane

__all__ = ["CLOSE_TIMEOUT", "MAX_INCOMING", "FrameReader", "WsConn", "WsError", "WsLane",
           "handshake_head", "serve"]

logger = logging.getLogger(__name__)

#: seconds the closing handshake may take (our close frame, the peer's answer): aiohttp's path's
CLOSE_TIMEOUT = 2.0
#: a subscriber has nothing to say: a message this large or larger is refused with 1009 (the
#: aiohttp path's ``max_msg_size``, compared as aiohttp compares it)
MAX_INCOMING = 4096
#: heartbeat ticks per ``server.ping_interval``: a peer silent for a whole interval is pinged,
#: one silent for half an interval more is dropped (aiohttp's heartbeat and pong wait)
TICKS = 2

#: RFC 6455 section 1.3
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
#: close codes below 3000 a peer may send (aiohttp's ``WSCloseCode``): any other is an error
_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                          1014})
WS_OK, WS_PROTOCOL_ERROR, WS_INVALID_TEXT, WS_TOO_BIG = 1000, 1002, 1007, 1009

#: what we send: a ping (empty), our answer to the peer's close (aiohttp's: 1000, no reason),
#: the close at shutdown (aiohttp's path: 1001 and this reason)
PING_FRAME = ws_control_frame(OP_PING)
CLOSE_OK_FRAME = ws_close_frame(WS_OK)
SHUTDOWN_FRAME = ws_close_frame(WS_GOING_AWAY, "server shutting down")


def handshake_head(headers: Mapping[bytes, bytes], cors: Cors) -> tuple[bytes, bytes] | None:
    """The ``101`` answer to a handshake ``negotiate()`` gave the fast lane, as (what goes before
    ``Date``, what goes after it), or None: aiohttp answers (a refused ``Origin``, or header
    values that are not ASCII, whose decoding is aiohttp's to decide)."""
    origin_raw = headers.get(b"origin")
    host_raw = headers.get(b"host", b"")
    if not host_raw.isascii() or (origin_raw is not None and not origin_raw.isascii()):
        return None
    origin = origin_raw.decode("ascii") if origin_raw is not None else None
    seen = {"Host": host_raw.decode("ascii")}
    if origin is not None:
        seen["Origin"] = origin
    if not cors.websocket_allowed(seen, "http"):  # the fast lane serves plain TCP only
        return None
    accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + _GUID).digest())
    before = (b"HTTP/1.1 101 Switching Protocols\r\nServer: %s\r\nUpgrade: websocket\r\n"
              b"Connection: upgrade\r\nSec-WebSocket-Accept: %s\r\n" % (SERVER_HEADER.encode(), accept))
    # aiohttp's on_response_prepare hook (server.app._cors_headers) adds these after Date
    after = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                     for k, v in cors.headers(origin).items()) if origin is not None else b""
    return before, after


class WsError(Exception):
    """A client frame breaks the protocol: close with ``code`` (RFC 6455 section 7.4.1)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        #: what the same bytes held before the offending frame (handled first, as aiohttp does)
        self.before: list[tuple[int, bytes]] = []


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameReader:
    """Client frames in, complete messages and control frames out (pure: no I/O).

    :meth:`feed` returns ``(opcode, payload)`` for every control frame and every complete data
    message (fragments joined, text checked to be UTF-8) in the bytes so far; the bytes of a
    frame not yet complete are kept. Checks, and their close codes, are those of aiohttp's
    reader: reserved bits, unknown opcodes, fragmented or long (>125) control frames, a
    continuation without a message, a new message inside a fragmented one, a bad close frame →
    1002; a data message of :data:`MAX_INCOMING` bytes or more → 1009 (before its payload is
    buffered); invalid UTF-8 in a text message or a close reason → 1007. An unmasked frame is
    1002 as RFC 6455 requires of a server.
    """

    __slots__ = ("buf", "msg", "msg_op")

    def __init__(self) -> None:
        self.buf = b""
        #: the opcode of the fragmented data message in progress (0: none) and its bytes so far
        self.msg_op = 0
        self.msg = b""

    @property
    def idle(self) -> bool:
        """Nothing kept: no partial frame, no fragmented message (the reader may be dropped)."""
        return not self.buf and not self.msg_op

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every message and control frame completed by ``data``; :class:`WsError` at the first
        offending frame (with what came before it in ``before``): the reader is then unusable."""
        out: list[tuple[int, bytes]] = []
        try:
            self._feed(data, out)
        except WsError as e:
            e.before = out
            raise
        return out

    def _feed(self, data: bytes, out: list[tuple[int, bytes]]) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise WsError(WS_PROTOCOL_ERROR, "Received frame with non-zero reserved bits")
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op not in _OPCODES:
                raise WsError(WS_PROTOCOL_ERROR, f"Unexpected opcode={op!r}")
            length = b1 & 0x7F
            if op >= OP_CLOSE:
                if not fin:
                    raise WsError(WS_PROTOCOL_ERROR, "Received fragmented control frame")
                if length > 125:
                    raise WsError(WS_PROTOCOL_ERROR, "Control frame payload cannot be larger than 125 bytes")
            if not b1 & 0x80:
                raise WsError(WS_PROTOCOL_ERROR, "Received an unmasked frame from a client")
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if op < OP_CLOSE and length >= MAX_INCOMING - len(self.msg):
                raise WsError(WS_TOO_BIG, f"Message size {length + len(self.msg)} exceeds limit "
                                          f"{MAX_INCOMING}")
            end = pos + head + 4 + length
            if end > n:
                break
            mask = buf[pos + head:pos + head + 4]
            payload = _unmask(buf[pos + head + 4:end], mask)
            pos = end
            self._frame(op, bool(fin), payload, out)
        self.buf = buf[pos:] if pos < n else b""

    def _frame(self, op: int, fin: bool, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if op >= OP_CLOSE:
            if op == OP_CLOSE:
                _check_close(payload)
            out.append((op, payload))
            return
        if op == OP_CONT:
            if not self.msg_op:
                raise WsError(WS_PROTOCOL_ERROR, "Continuation frame for non started message")
            self.msg += payload
            if not fin:
                return
            op, payload = self.msg_op, self.msg
            self.msg_op, self.msg = 0, b""
        elif self.msg_op:
            raise WsError(WS_PROTOCOL_ERROR,
                          f"The opcode in non-fin frame is expected to be zero, got {op!r}")
        elif not fin:
            self.msg_op, self.msg = op, payload
            return
        if op == OP_TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise WsError(WS_INVALID_TEXT, "Invalid UTF-8 text message") from None
        out.append((op, payload))


def _check_close(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) < 2:
        raise WsError(WS_PROTOCOL_ERROR, f"Invalid close frame: {payload!r}")
    code = int.from_bytes(payload[:2], "big")
    if code < 3000 and code not in _CLOSE_CODES:
        raise WsError(WS_PROTOCOL_ERROR, f"Invalid close code: {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsError(WS_INVALID_TEXT, "Invalid UTF-8 text message") from None


class WsLane:
    """The fast lane's WebSocket connections and the heartbeat timer they share (armed only
    while there is one; owned here: :meth:`close_idle` cancels it at shutdown)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.conns: dict[WsConn, None] = {}
        self.step = state.config.server.ping_interval / TICKS
        self.timer: asyncio.TimerHandle | None = None
        #: shutdown: resolved when the last connection has ended (:meth:`wait_closed`)
        self.emptied: asyncio.Future[None] | None = None

    def add(self, conn: WsConn) -> None:
        self.conns[conn] = None
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.step, self._tick)

    def _tick(self) -> None:
        self.timer = None
        for c in list(self.conns):
            c.heartbeat()
        if self.conns:
            self.timer = asyncio.get_running_loop().call_later(self.step, self._tick)

    async def wait_closed(self) -> None:
        """Shutdown, once every stream has ended: until every connection is over (each closing
        handshake is bounded by :data:`CLOSE_TIMEOUT`; the caller bounds the wait too)."""
        if not self.conns:
            return
        if self.emptied is None or self.emptied.done():
            self.emptied = asyncio.get_running_loop().create_future()
        await asyncio.shield(self.emptied)

    def forget(self, conn: WsConn) -> bool:
        """``conn`` ended; whether it was still counted (the lane then gives its slot back)."""
        counted = self.conns.pop(conn, 0) is None
        if not self.conns and self.emptied is not None and not self.emptied.done():
            self.emptied.set_result(None)
        return counted

    def close_idle(self) -> None:
        """Shutdown (the lane accepts no more handshakes): no more heartbeats; connections whose
        closing handshake is still under way are closed now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for c in list(self.conns):
            if c.closing and c.transport is not None:
                c.transport.close()


class WsConn(asyncio.Protocol):
    """One WebSocket subscriber after the handshake (the transport's protocol from then on)."""

    __slots__ = ("beat", "closing", "frames", "lane", "peer", "started", "stream", "target",
                 "timer", "transport", "ua")

    def __init__(self, lane: WsLane, transport: asyncio.Transport, peer: str, target: bytes,
                 ua: bytes) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        self.target = target
        self.ua = ua
        self.started = time.monotonic()
        self.stream: Stream | None = None
        #: heartbeat ticks since the peer last sent anything
        self.beat = 0
        #: our close frame is sent: only the peer's close is awaited
        self.closing = False
        #: the frame reader, only while the peer is in the middle of a frame or message
        self.frames: FrameReader | None = None
        self.timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<WsConn {self.peer} {self.stream!r}>"

    # -- the transport's side ----------------------------------------------------------------
    def connection_lost(self, _exc: Exception | None) -> None:
        lane = self.lane
        if lane.forget(self):
            lane.state.limits.release(self.peer)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        self.frames = None
        if self.stream is not None:
            self.stream.end("gone")

    def pause_writing(self) -> None:  # the stream's buffer bound deals with a slow reader
        return

    def resume_writing(self) -> None:
        return

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return  # (closed after a close frame or an error: what follows is not read)
        self.beat = 0
        reader = self.frames or FrameReader()
        error = None
        try:
            got = reader.feed(data)
        except WsError as e:
            got, error = e.before, e
        self.frames = None if reader.idle or error is not None else reader
        for op, payload in got:
            if op == OP_CLOSE:
                self.frames = None
                if not self.closing:
                    t.write(CLOSE_OK_FRAME)  # aiohttp's answer to the peer's close
                self.closing = True
                t.close()
                return
            if op == OP_PING and not self.closing and not t.is_closing():
                # (aiohttp does not answer while closing either)
                self._write(t, ws_control_frame(OP_PONG, payload))
            # pong: the peer is alive (beat reset above); text, binary: nothing is expected
        if error is not None:
            self._refuse(t, error)

    def _write(self, t: asyncio.Transport, data: bytes) -> None:
        """Write a control frame of ours; a peer that sends pings but does not read its pongs
        is over its buffer like any slow subscriber: the stream's own overflow path ends it."""
        t.write(data)
        stream = self.stream
        if stream is not None and t.get_write_buffer_size() > stream.limit:
            stream.send(b"", None)  # writes nothing, finds the buffer over the limit (1008)

    def _refuse(self, t: asyncio.Transport, e: WsError) -> None:
        logger.debug("websocket %r: %s", self, e)
        if not self.closing:
            t.write(ws_close_frame(e.code))
        self.closing = True
        t.close()

    def heartbeat(self) -> None:
        """One tick of the shared timer: ping a silent peer, drop one that did not answer."""
        t = self.transport
        if t is None:
            return
        beat = self.beat = self.beat + 1
        if self.closing or t.is_closing():
            if beat > TICKS + 2:
                t.abort()  # a closing that takes this long: the peer takes nothing any more
            return
        if beat == TICKS:
            self._write(t, PING_FRAME)
        elif beat == TICKS + 1:
            logger.debug("websocket %r: no PONG received after %.1f seconds", self, self.lane.step)
            t.close()  # as aiohttp does: no close frame for a peer that does not answer

    # -- the stream's side ---------------------------------------------------------------------
    def stream_done(self, why: str) -> None:
        stream = self.stream
        if stream is None:
            return
        close_stream(self.lane.state, stream, why)
        t = self.transport
        if why == "shutdown" and t is not None and not t.is_closing() and not self.closing:
            t.write(SHUTDOWN_FRAME)  # then wait (bounded) for the peer's close
            self.closing = True
            self.timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._close_timeout)
        log_access(self.peer, f"GET {self.target.decode('latin-1')} HTTP/1.1", 101, 0,
                   time.monotonic() - self.started, self.ua.decode("latin-1"))

    def _close_timeout(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()


def serve(conn: FastLane, spec: TopicSpec, target: bytes, ua: bytes | None,
          head: tuple[bytes, bytes], date: bytes) -> None:
    """Answer the handshake on ``conn`` (its head was negotiated and :func:`handshake_head`
    accepted it) and make the connection a WebSocket stream owned by a :class:`WsConn`."""
    lane = conn.lane
    t = conn.transport
    if t is None:
        return
    if conn.timer is not None:
        conn.timer.cancel()
        conn.timer = None
    if conn.held:  # (reading was paused for a publisher's sake: a WebSocket is read)
        conn.held = 0
        t.resume_reading()
    # the WsConn counts the connection from now on (it releases it in Limits when lost)
    lane.conns.pop(conn, None)
    conn.transport = None
    ws = WsConn(lane.ws, t, lane.share(conn.peer), lane.share(target),
                lane.share(ua) if ua is not None else b"-")
    t.set_protocol(ws)
    t.write(b"%sDate: %s\r\n%s\r\n" % (head[0], date, head[1]))
    stream = ws.stream = conn.stream = open_stream(lane.state, t, WEBSOCKET, spec, ws.peer, None)
    stream.on_end = ws.stream_done
    lane.ws.add(ws)
    lane.served += 1
