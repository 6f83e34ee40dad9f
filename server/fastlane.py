"""The fast lane: the two hot request shapes served without aiohttp's per-request machinery.

Owns a small asyncio Protocol in front of aiohttp. It reads a connection's first bytes and

* serves a plain subscription (``GET``, HTTP/1.1, no credentials, no replay headers) as a
  stream with no task and no request objects: a subscriber costs a few KB, not ~14 KB;
* serves a plain publish (``PUT``/``POST``, HTTP/1.1, ``Content-Length`` within the limit, no
  credentials, allow-listed peer, valid JSON object, a log that accepts synchronously) inline,
  with keep-alive and pipelining;
* hands **every other** connection, byte for byte, to aiohttp's own ``RequestHandler`` — which
  then owns it for the rest of its life. All refusals (400/403/405/413...), auth, replay,
  chunked uploads, ``Expect``, HTTP/1.0 and TLS are aiohttp's: the fast lane only ever answers
  success, using the same pure functions (topics, payload validation, Ingest) as the handlers.

Why: aiohttp alone measured 0.48x the benchmark floor on a bare publish handler, below the 0.5x
target before any routing work; idle subscribers cost ~14 KB each.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, cast

from aiohttp import web

from hub.event import WireFormat
from hub.router import NO_ACL
from hub.topics import TopicError, parse_publish_path, parse_subscription
from server.app import (
    ACCEPTED_TEXT,
    SERVER_HEADER,
    STREAM_CONTENT_TYPE,
    State,
    log_stream_end,
    wire_format,
)
from server.errors import BadRequest
from server.logs import log_access
from server.payload import parse_json_object
from server.stream import Stream

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

__all__ = ["FastLane", "FastLaneSite", "Lane"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pypubsub.access")

#: a request head larger than this goes to aiohttp (which enforces its own limits)
MAX_HEAD = 16 * 1024
#: seconds a connection may take to send a complete request head
HEAD_TIMEOUT = 30.0
#: seconds an idle keep-alive publisher connection is kept (aiohttp's default too)
KEEPALIVE_TIMEOUT = 75.0
#: requests parsed from one read before yielding (bounds work per data_received)
MAX_PIPELINE = 256

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: request headers that need aiohttp's full handling
_SLOW_HEADERS = frozenset({b"authorization", b"x-fetch-since", b"x-fetch-since-cursor",
                           b"transfer-encoding", b"expect", b"upgrade", b"connection"})
_CHUNKED = (WireFormat.CHUNKED, WireFormat.CHUNKED_NUL)


class _Date:
    """The ``Date`` header value, formatted once per second."""

    sec = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        s = int(time.time())
        if s != cls.sec:
            cls.sec = s
            cls.value = formatdate(s, usegmt=True).encode()
        return cls.value


def parse_head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]] | None:
    """``(method, target, headers)`` of a plain HTTP/1.1 request head, or None for anything
    unusual (aiohttp then parses it and answers properly)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            return None
        key = name.lower()
        if key in headers:
            return None
        headers[key] = value.strip(b" \t")
    return parts[0], parts[1], headers


class Lane:
    """What all fast-lane connections of one application share."""

    def __init__(self, state: State, fallback: Callable[[], RequestHandler]) -> None:
        self.state = state
        self.fallback = fallback
        self.conns: dict[FastLane, None] = {}
        self.loop = asyncio.get_running_loop()
        self.served = 0
        self.handed_over = 0
        self.closing = False
        srv = state.config.server
        self.max_payload = srv.max_payload_size
        self.oldschoolers = state.config.clients.oldschoolers
        body = ACCEPTED_TEXT.encode()
        self.accepted_tail = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
        self.accepted_len = len(body)

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"fastlane_served_total": self.served, "fastlane_handed_over_total": self.handed_over}

    def close_idle(self) -> None:
        """Shutdown: close keep-alive publisher connections (streams end through their Stream)."""
        self.closing = True
        for c in list(self.conns):
            if c.stream is None and c.transport is not None:
                c.transport.close()


class FastLane(asyncio.Protocol):
    """One connection until it is a stream, a closed keep-alive, or handed to aiohttp."""

    __slots__ = ("buf", "deadline", "lane", "peer", "started", "stream", "target", "timer", "transport",
                 "ua")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.peer = "?"
        self.stream: Stream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.started = 0.0
        self.ua = b"-"
        self.target = b""

    # -- connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server gives a Transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        self.lane.conns[self] = None
        self._arm(HEAD_TIMEOUT)

    def connection_lost(self, _exc: Exception | None) -> None:
        self.lane.conns.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.stream is not None:
            self.stream.end("gone")
        self.transport = None

    def _arm(self, delay: float) -> None:
        """Move the idle deadline; the timer is re-armed lazily when it fires (not per request)."""
        loop = self.lane.loop
        self.deadline = loop.time() + delay
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is None or self.stream is not None:
            return
        if self.lane.loop.time() < self.deadline:
            self.timer = self.lane.loop.call_at(self.deadline, self._timeout)
        else:
            self.transport.close()

    def pause_writing(self) -> None:  # a publisher not reading its responses: stop reading it
        if self.transport is not None and self.stream is None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.stream is None:
            self.transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            return  # a subscriber has nothing more to say
        buf = self.buf + data if self.buf else data
        for _ in range(MAX_PIPELINE):
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_over(buf)
                    return
                break
            parsed = parse_head(buf[:he]) if he <= MAX_HEAD else None
            if parsed is None:
                self._hand_over(buf)
                return
            method, target, headers = parsed
            if _SLOW_HEADERS.intersection(headers):
                self._hand_over(buf)
                return
            if method == b"GET":
                if b"content-length" in headers or self.lane.state.closing or buf[he + 4:]:
                    self._hand_over(buf)
                    return
                self.buf = b""
                if not self._subscribe(target, headers):
                    self._hand_over(buf)
                return
            if method != b"PUT" and method != b"POST":
                self._hand_over(buf)
                return
            cl = headers.get(b"content-length")
            if cl is None or not cl.isdigit() or int(cl) > self.lane.max_payload:
                self._hand_over(buf)
                return
            end = he + 4 + int(cl)
            if len(buf) < end:
                break
            if not self._publish(method, target, buf[he + 4:end], headers):
                self._hand_over(buf)
                return
            buf = buf[end:]
            if not buf:
                break
        self.buf = buf
        if self.transport is not None and self.stream is None:
            self._arm(KEEPALIVE_TIMEOUT if not buf else HEAD_TIMEOUT)

    def _hand_over(self, buf: bytes) -> None:
        """Give this connection, and every byte not yet answered, to aiohttp."""
        t = self.transport
        self.lane.conns.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        self.buf = b""
        if t is None or t.is_closing():
            return
        self.lane.handed_over += 1
        handler = self.lane.fallback()
        t.set_protocol(handler)
        handler.connection_made(t)
        if buf:
            handler.data_received(buf)

    def _publish(self, method: bytes, target: bytes, body: bytes, headers: dict[bytes, bytes]) -> bool:
        """Accept one publish inline; False means "let aiohttp handle this request"."""
        state = self.lane.state
        ingest = state.ingest
        if not ingest.synchronous or state.closing or not state.allow.allows(self.peer):
            return False
        path = target.split(b"?", 1)[0].decode("latin-1")
        try:
            topics, _private = parse_publish_path(path)
            obj = parse_json_object(body)
        except (TopicError, BadRequest):
            return False
        if state.config.clients.secure_topics.intersection(topics):
            return False
        t0 = time.monotonic()
        ingest.submit_now(path, obj, source=self.peer)
        t = self.transport
        if t is not None:
            lane = self.lane
            t.write(b"HTTP/1.1 202 Accepted\r\nServer: %s\r\nDate: %s\r\n%s"
                    % (SERVER_HEADER.encode(), _Date.now(), lane.accepted_tail))
            lane.served += 1
            if access_logger.isEnabledFor(logging.INFO):
                log_access(self.peer, f"{method.decode()} {path} HTTP/1.1", 202, lane.accepted_len,
                           time.monotonic() - t0, headers.get(b"user-agent", b"-").decode("latin-1"))
        return True

    def _subscribe(self, target: bytes, headers: dict[bytes, bytes]) -> bool:
        """Turn this connection into a stream; False means "let aiohttp handle it"."""
        lane = self.lane
        state = lane.state
        try:
            spec = parse_subscription(target.decode("latin-1"))
        except TopicError:
            return False
        ua = headers.get(b"user-agent")
        fmt = wire_format((1, 1), ua.decode("latin-1") if ua is not None else None, lane.oldschoolers)
        t = self.transport
        if t is None:
            return True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        t.write(b"HTTP/1.1 200 OK\r\nServer: %s\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n"
                b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nDate: %s\r\n\r\n"
                % (SERVER_HEADER.encode(), STREAM_CONTENT_TYPE.encode(), _Date.now()))
        stream = Stream(t, fmt, spec, self.peer, state.config.server.stream_buffer, state.stats, None)
        self.stream = stream
        self.started = time.monotonic()
        self.ua = ua or b"-"
        self.target = target
        state.streams[stream] = None
        stream.group = state.hub.topics.subscribe(stream, spec, fmt, NO_ACL)
        stream.done.add_done_callback(self._stream_done)
        lane.served += 1
        return True

    def _stream_done(self, fut: asyncio.Future[str]) -> None:
        stream = self.stream
        if stream is None:
            return
        why = fut.result()
        self.lane.state.forget(stream, why)
        t = stream.transport
        if t is not None and not t.is_closing():
            if why == "shutdown" and stream.fmt in _CHUNKED:
                t.write(b"0\r\n\r\n")  # the terminating chunk: a clean end of the stream
            t.close()
        log_stream_end(self.peer, f"GET {self.target.decode('latin-1')} HTTP/1.1", self.started,
                       self.ua.decode("latin-1"))


class FastLaneSite(web.TCPSite):
    """A TCP site whose connections enter through the fast lane (plain TCP only, not TLS)."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, lane_state: State,
                 **kw: object) -> None:
        super().__init__(runner, host, port, **kw)  # type: ignore[arg-type]
        self._lane_state = lane_state
        self.lane: Lane | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("runner not set up")
        lane = self.lane = Lane(self._lane_state, server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastLane(lane), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address)
