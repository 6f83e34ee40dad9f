"""The fast lane: the two hot request shapes served without aiohttp's per-request machinery.

Owns a small asyncio Protocol in front of aiohttp. Each connection has one ``httptools``
parser (llhttp, strict: the parser family aiohttp itself uses) fed every byte it receives;
for each request head, :func:`server.negotiate.negotiate` decides. The fast lane

* serves a plain subscription (``GET``, HTTP/1.1, allow-listed headers only, NDJSON, or SSE
  asked for with exactly ``Accept: text/event-stream``) as a stream with no task and no
  request objects: a subscriber costs about 2 KB, not ~13 KB; a plain WebSocket handshake is
  handed to :mod:`server.fastws` at :meth:`FastLane.subscribe` (about 2 KB, not ~17 KB);
* serves a plain publish (``PUT``/``POST``, HTTP/1.1, ``Content-Length`` within the limit,
  allow-listed headers and peer, no secure topic, valid JSON object) with keep-alive and
  pipelining: every request of a read is started (a read is at most the transport's read
  size, 256 KiB: that bounds the work of one call). A read is parsed whole before any of it is
  answered, as aiohttp does, so that a read aiohttp would refuse whole is handed to it whole.
  With a log that keeps events at once (memory) the ``202`` is written inline; with a durable
  log (SQLite, Redis) the append's future answers it from a done-callback (no task per
  request), through a per-connection FIFO so that pipelined requests are answered in request
  order, with what aiohttp's handler answers when the append fails (``503``, ``Retry-After``);
  a connection with ``MAX_PENDING`` appends unanswered is not read until some are;
* hands **every other** connection, byte for byte from the first request it did not answer,
  to aiohttp's own ``RequestHandler`` — which then owns it for the rest of its life. Requests
  the parser refuses, auth, replay, other stream formats, chunked uploads, ``Expect``,
  HTTP/1.0 and TLS are aiohttp's: the fast lane only ever answers success, using the same pure
  functions (target, payload validation, Ingest) as the handlers.

Why: aiohttp alone measured 0.48x the benchmark floor on a bare publish handler, below the 0.5x
target before any routing work; idle subscribers cost ~14 KB each.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, TypeVar, cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from hub.topics import TopicError
from server.app import (
    ACCEPTED_TEXT,
    SERVER_HEADER,
    State,
    log_stream_end,
    wire_format,
)
from server.errors import BadRequest, PubSubError, ServiceUnavailable
from server.eventlog import Appended
from server.fastws import WsLane, handshake_head
from server.fastws import serve as serve_websocket
from server.formats import SSE
from server.gate import Gate, ListenerSite
from server.limits import Refusal, fd_of
from server.logs import log_access, log_publish
from server.negotiate import Lane as Via
from server.negotiate import Outcome, negotiate
from server.negotiate import StreamFormat as Requested
from server.payload import parse_json_object
from server.stream import Stream, close_stream, open_stream, stream_head
from server.target import PublishTarget, publish_target, subscription_target

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

__all__ = ["FastLane", "FastLaneSite", "Lane"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pypubsub.access")

#: a request head larger than this goes to aiohttp (which enforces its own limits)
MAX_HEAD = 16 * 1024
#: seconds an idle keep-alive publisher connection is kept (aiohttp's lane is given it too)
KEEPALIVE_TIMEOUT = 75.0
#: distinct values :meth:`Lane.share` keeps
SHARED_SIZE = 4096

_T = TypeVar("_T", bytes, str)

#: appends a connection may have unanswered (pipelined to a durable log) before it is no
#: longer read: at most this many plus one read's worth are ever pending per connection
MAX_PENDING = 64

#: why a connection is not read (bits of ``FastLane.held``): the peer does not read its
#: answers; too many appends pending; a hand-over to aiohttp waits for the answers before it;
#: shutdown waits for the pending answers
HOLD_WRITE = 1
HOLD_PENDING = 2
HOLD_HANDOVER = 4
HOLD_CLOSING = 8

#: a publish whose answer is due: its append (done already, or a future), method, target,
#: user agent, start time
_Pending = tuple["Appended | asyncio.Future[Appended | None]", bytes, bytes, "bytes | None", float]

#: what aiohttp answers when a handler raised something else than a refusal (and it closes)
_ERROR_500 = b"500 Internal Server Error\n\nServer got itself in trouble"

#: origin-form request targets made of these bytes only: llhttp (strict) accepts each of them in a
#: request line (its URL_CHAR set, no query, fragment or quoting characters; tests/test_fastlane.py
#: checks it byte by byte against httptools)
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9\-._~/%!$&'()*+,;=:@]*")

#: distinct publish targets a lane keeps parsed (10 000 topics each published to in turn fit),
#: and the bytes of request targets they may hold in all: the cache is cleared when either is
#: reached; a target longer than TARGET_MAX is parsed each time, never kept. With the path and
#: topics a kept target holds: ~380 B per ``/git/repoNNNN`` (3.8 MB for 10 000 of them), at
#: most ~9.5 MB (2 048 targets of 256 bytes with 64 topics each)
TARGET_CACHE = 16384
TARGET_CACHE_BYTES = 512 * 1024
TARGET_MAX = 256


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
        #: what a paused stream's replay waits on (:meth:`FastLane.write_resumed`), only while
        #: it waits: an idle connection carries no Future
        self.resumed: dict[FastLane, asyncio.Future[None]] = {}
        srv = state.config.server
        self.max_payload = srv.max_payload_size
        self.oldschoolers = state.config.clients.oldschoolers
        self.limits = state.limits
        body = ACCEPTED_TEXT.encode()
        self.accepted_tail = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
        self.accepted_sec = -1
        self.accepted_bytes = b""
        #: the size of the whole 202 (its Date always has the same length): what aiohttp's
        #: access line gives as the response's size
        self.accepted_len = len(self.accepted())
        #: parsed publish targets by request target (see :meth:`publish_target`), and the bytes
        #: of their request targets: every key is a target llhttp accepted in a request line
        self.targets: dict[bytes, PublishTarget] = {}
        self.targets_bytes = 0
        self.targets_secure = state.config.clients.secure_topics
        #: request targets, user agents and peers kept by streams, one object per distinct value
        #: (idle subscribers are many and mostly alike; bounded: cleared when full)
        self.shared: dict[object, object] = {}
        #: the WebSocket subscribers this lane answered (server.fastws)
        self.ws = WsLane(state)

    def accepted(self) -> bytes:
        """The whole 202 response to a publish, built once per second (its ``Date``)."""
        sec = int(time.time())
        if sec != self.accepted_sec:
            self.accepted_sec = sec
            self.accepted_bytes = (b"HTTP/1.1 202 Accepted\r\nServer: %s\r\nDate: %s\r\n%s"
                                   % (SERVER_HEADER.encode(), formatdate(sec, usegmt=True).encode(),
                                      self.accepted_tail))
        return self.accepted_bytes

    def publish_target(self, url: bytes) -> PublishTarget | None:
        """:func:`publish_target` of a request target, None if it is not one; parsed once per
        distinct target (up to :data:`TARGET_CACHE` of them), not per publish. ``url`` is a
        request target llhttp accepted (the fast lane's parser called back with it)."""
        secure = self.state.config.clients.secure_topics
        targets = self.targets
        if secure is not self.targets_secure:  # (the configuration is fixed today: belt and braces)
            targets.clear()
            self.targets_bytes = 0
            self.targets_secure = secure
        pub = targets.get(url)
        if pub is None:
            try:
                pub = publish_target(url.decode("latin-1"), secure)
            except TopicError:
                return None
            n = len(url)
            if n <= TARGET_MAX:
                if len(targets) >= TARGET_CACHE or self.targets_bytes + n > TARGET_CACHE_BYTES:
                    targets.clear()  # many distinct targets: start over rather than grow
                    self.targets_bytes = 0
                targets[url] = pub
                self.targets_bytes += n
        return pub

    def known_target(self, url: bytes) -> PublishTarget | None:
        """The kept publish target of a request target llhttp accepted before and the fast lane
        may serve (no secure topic), else None (unknown, or aiohttp's)."""
        pub = self.targets.get(url)
        if pub is None or pub.secure or self.targets_secure is not self.state.config.clients.secure_topics:
            return None
        return pub

    def share(self, value: _T) -> _T:
        """``value``, or the equal object an earlier stream already keeps."""
        shared = self.shared
        kept = shared.get(value)
        if kept is None:
            if len(shared) >= SHARED_SIZE:
                shared.clear()
            shared[value] = kept = value
        return cast(_T, kept)

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"fastlane_served_total": self.served, "fastlane_handed_over_total": self.handed_over}

    def close_idle(self) -> None:
        """Shutdown: close keep-alive publisher connections (streams end through their Stream);
        one with appends pending is read no more and closed once they are answered."""
        self.closing = True
        self.ws.close_idle()
        for c in list(self.conns):
            if c.stream is None and c.transport is not None:
                if c.waiting:
                    c.hold(HOLD_CLOSING, True)
                else:
                    c.transport.close()


class FastLane(asyncio.Protocol):
    """One connection until it is a stream, a closed keep-alive, or handed to aiohttp.

    Holds what a connection needs for its whole life; the parsing state lives in its
    :class:`_Reader`, dropped once the connection is a stream (idle streams are many).
    """

    __slots__ = ("deadline", "held", "in_head", "lane", "peer", "reader", "started", "stream",
                 "target", "timer", "transport", "ua", "waiting")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        #: None once the connection is a stream or aiohttp's
        self.reader: _Reader | None = _Reader(self)
        self.peer = "?"
        self.stream: Stream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        #: the deadline is the first request head's (server.header_timeout)
        self.in_head = False
        self.started = 0.0
        self.ua = b"-"
        self.target = b""
        #: publishes started and not yet answered, oldest first (None until the first)
        self.waiting: deque[_Pending] | None = None
        #: HOLD_* bits: reading is paused while any is set
        self.held = 0

    # -- connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server gives a Transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        lane = self.lane
        reason = lane.limits.admit(self.peer, fd_of(transport))
        if reason is not None:
            self.transport = None
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            Refusal.take(transport, lane.limits, reason)
            return
        lane.conns[self] = None
        self.in_head = True
        self._arm(lane.limits.header_timeout)

    def connection_lost(self, _exc: Exception | None) -> None:
        if self.lane.conns.pop(self, 0) is None:  # in conns: admitted, so counted
            self.lane.limits.release(self.peer)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.stream is not None:
            self.stream.end("gone")
        self.transport = None
        self._wake_writer()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.waiting:
            logger.debug("publisher %s left with %d publish(es) unanswered: their appends complete "
                         "all the same", self.peer, len(self.waiting))

    def _arm(self, delay: float) -> None:
        """Move the deadline; a later one re-arms the timer lazily when it fires (not per
        request), an earlier one (a head's after a keep-alive's) at once."""
        loop = self.lane.loop
        self.deadline = d = loop.time() + delay
        timer = self.timer
        if timer is None or d < timer.when():
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(d, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is None or self.stream is not None:
            return
        if self.lane.loop.time() < self.deadline:
            self.timer = self.lane.loop.call_at(self.deadline, self._timeout)
        else:
            if self.in_head:
                self.lane.limits.header_timeouts += 1
            self.transport.close()

    def pause_writing(self) -> None:  # a publisher not reading its responses: stop reading it
        self.hold(HOLD_WRITE, True)

    def resume_writing(self) -> None:
        self.hold(HOLD_WRITE, False)
        self._wake_writer()

    def write_resumed(self) -> asyncio.Future[None] | None:
        """A replay's wait while the transport has writing paused (:class:`server.stream.
        WritePacing`): resolved by :meth:`resume_writing` or :meth:`connection_lost`."""
        if not self.held & HOLD_WRITE or self.transport is None:
            return None
        waiters = self.lane.resumed
        fut = waiters.get(self)
        if fut is None:
            fut = waiters[self] = self.lane.loop.create_future()
        return fut

    def _wake_writer(self) -> None:
        fut = self.lane.resumed.pop(self, None) if self.lane.resumed else None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def hold(self, why: int, on: bool) -> None:
        """Set or clear one reason not to read this connection; reading pauses while any is set."""
        held = self.held
        now = held | why if on else held & ~why
        if now == held:
            return
        self.held = now
        t = self.transport
        if t is None or self.stream is not None or t.is_closing():
            return
        if not held:
            t.pause_reading()
        elif not now:
            t.resume_reading()

    # -- bytes in ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            return  # a subscriber has nothing more to say
        if self.held & HOLD_HANDOVER:  # bytes that were on their way: aiohttp's too
            reader.buf += data
            return
        pending = reader.feed(data)
        if pending is None:
            if self.waiting:  # aiohttp answers after the pending answers are out
                self.hold(HOLD_HANDOVER, True)
            else:
                self._hand_over(reader.unanswered())
        elif self.stream is not None:
            reader.close()  # a stream parses nothing more
            self.reader = None
        elif self.transport is not None:
            if not pending or not reader.in_head or reader.answered:
                # idle, a body on its way, or requests answered: the keep-alive time from now
                self.in_head = False
                self._arm(KEEPALIVE_TIMEOUT)
            # else a head on its way: its deadline is a total, its bytes do not move it (the
            # first head's is server.header_timeout from the connection; a later one's the
            # keep-alive time from the last answer, as aiohttp's)
            reader.answered = False

    def _hand_over(self, buf: bytes) -> None:
        """Give this connection, and every byte not yet answered, to aiohttp."""
        t = self.transport
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        lane = self.lane
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        if lane.conns.pop(self, 0) is not None:
            return  # not in conns (not counted): already closed or handed over
        if t is None or t.is_closing():
            lane.limits.release(self.peer)
            return
        lane.handed_over += 1
        held, self.held = self.held, 0
        if held:
            t.resume_reading()  # aiohttp reads for itself from now on
        # the Gate keeps the count and the head's deadline; aiohttp serves the connection, its
        # writing paused if the transport's is (its resume_writing() then follows a pause)
        deadline = self.deadline if self.in_head else lane.loop.time() + lane.limits.header_timeout
        Gate.adopt(t, lane.limits, lane.fallback, self.peer, buf, deadline,
                   paused=bool(held & HOLD_WRITE))

    # -- requests ----------------------------------------------------------------------------
    def publish(self, method: bytes, url: bytes, pub: PublishTarget, body: bytes,
                ua: bytes | None) -> bool:
        """Accept one publish: answered inline when the log kept it at once, else once its
        append completes (:meth:`_settle`); False means "let aiohttp handle this request"."""
        try:
            obj = parse_json_object(body)
        except BadRequest:
            return False
        t0 = time.monotonic()
        done = self.lane.state.ingest.start(pub.path, obj, parsed=(pub.topics, pub.private), owned=True)
        waiting = self.waiting
        if not waiting and isinstance(done, Appended):
            t = self.transport
            if t is not None:
                t.write(self._accepted(method, url, ua, t0))
            return True
        if waiting is None:
            waiting = self.waiting = deque()
        waiting.append((done, method, url, ua, t0))
        if not isinstance(done, Appended):
            done.add_done_callback(self._settle)
        if len(waiting) >= MAX_PENDING:
            self.hold(HOLD_PENDING, True)
        return True

    def _accepted(self, method: bytes, url: bytes, ua: bytes | None, t0: float) -> bytes:
        lane = self.lane
        lane.served += 1
        log_publish(self.peer, method, url, lane.accepted_len, time.monotonic() - t0, ua or b"-")
        return lane.accepted()

    def _settle(self, _fut: object) -> None:
        """An append completed: write every answer now due, in request order (one write)."""
        waiting = self.waiting
        if not waiting:
            return
        t = self.transport
        gone = t is None or t.is_closing()
        out: list[bytes] = []
        while waiting:
            done, method, url, ua, t0 = waiting[0]
            if not isinstance(done, Appended) and not done.done():
                break
            waiting.popleft()
            if gone:
                continue  # the publisher left: its event is kept (or refused) all the same
            answer, close = self._answer(done, method, url, ua, t0)
            out.append(answer)
            if close:
                gone = True  # aiohttp closes after a 500: nothing after it is answered
                if t is not None:
                    t.write(b"".join(out))
                    t.close()
        if gone or t is None:
            return
        if out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
            self._arm(KEEPALIVE_TIMEOUT)  # the keep-alive time runs from the last answer
        if len(waiting) < MAX_PENDING:
            self.hold(HOLD_PENDING, False)
        if not waiting and (self.held & (HOLD_HANDOVER | HOLD_CLOSING) or self.lane.closing):
            self._hand_over_held()

    def _hand_over_held(self) -> None:
        """Every pending answer is out: close (shutdown) or hand the rest to aiohttp."""
        t = self.transport
        if t is None:
            self.held = 0
            return
        if self.held & HOLD_CLOSING or self.lane.closing:
            self.held = 0
            t.close()
            return
        reader = self.reader
        self._hand_over(reader.unanswered() if reader is not None else b"")

    def _answer(self, done: Appended | asyncio.Future[Appended | None], method: bytes, url: bytes,
                ua: bytes | None, t0: float) -> tuple[bytes, bool]:
        """The answer to one publish whose append completed, as aiohttp's handler would give
        it; True: close the connection after it (as aiohttp does after a 500)."""
        if isinstance(done, Appended):
            return self._accepted(method, url, ua, t0), False
        exc = None if done.cancelled() else done.exception()
        if not done.cancelled() and exc is None:
            return self._accepted(method, url, ua, t0), False
        state = self.lane.state
        target = url.decode("latin-1")
        if isinstance(exc, PubSubError):
            state.rejected[exc.status] = state.rejected.get(exc.status, 0) + 1
            logger.info("%s %s %s from %s: %s", exc.status, method.decode(), target[:200], self.peer,
                        exc.reason)
            body = (exc.reason + "\n").encode()
            retry = (b"Retry-After: %d\r\n" % exc.retry_after
                     if isinstance(exc, ServiceUnavailable) and exc.retry_after is not None else b"")
            head = (b"HTTP/1.1 %d %s\r\nServer: %s\r\n%sContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nDate: %s\r\n\r\n"
                    % (exc.status, http.HTTPStatus(exc.status).phrase.encode(), SERVER_HEADER.encode(),
                       retry, len(body), _Date.now()))
            status, close = exc.status, False
        else:
            logger.error("Error handling request from %s", self.peer,
                         exc_info=exc if exc is not None else asyncio.CancelledError())
            body = _ERROR_500
            head = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nDate: %s\r\nServer: %s\r\nConnection: close\r\n\r\n"
                    % (len(body), _Date.now(), SERVER_SOFTWARE.encode()))
            status, close = 500, True
        if access_logger.isEnabledFor(logging.INFO):
            log_access(self.peer, f"{method.decode()} {target} HTTP/1.1", status, len(head) + len(body),
                       time.monotonic() - t0, (ua or b"-").decode("latin-1"))
        return head + body, close

    def subscribe(self, target: bytes, ua: bytes | None, sse: bool = False,
                  ws: tuple[bytes, bytes] | None = None) -> bool:
        """Turn this connection into a stream; False means "let aiohttp handle it"."""
        if self.waiting:
            return False  # behind pending answers (unusual): aiohttp's, once they are out
        self.waiting = None  # a stream publishes nothing more
        lane = self.lane
        state = lane.state
        if b"?" in target:
            return False  # last_event_id= / since= ask for a replay: aiohttp's
        try:
            spec = subscription_target(target.decode("latin-1"))
        except TopicError:
            return False
        if ws is not None:  # a WebSocket: server.fastws owns the connection from here on
            serve_websocket(self, spec, target, ua, ws, _Date.now())
            return True
        fmt = SSE if sse else wire_format((1, 1), ua.decode("latin-1") if ua is not None else None,
                                          lane.oldschoolers)
        t = self.transport
        if t is None:
            return True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in stream_head(fmt, SERVER_HEADER))
        t.write(b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\nDate: %s\r\n\r\n" % (head, _Date.now()))
        self.peer = lane.share(self.peer)
        stream = self.stream = open_stream(state, t, fmt, spec, self.peer, None)
        self.started = time.monotonic()
        self.deadline = 0.0
        self.ua = lane.share(ua) if ua is not None else b"-"
        self.target = lane.share(target)
        stream.on_end = self._stream_done
        lane.served += 1
        return True

    def _stream_done(self, why: str) -> None:
        stream = self.stream
        if stream is None:
            return
        close_stream(self.lane.state, stream, why)  # the terminating chunk at shutdown
        t = stream.transport
        if t is not None and not t.is_closing():
            t.close()
        log_stream_end(self.peer, f"GET {self.target.decode('latin-1')} HTTP/1.1", self.started,
                       self.ua.decode("latin-1"))


class _Reader:
    """A connection's parser and the request it is parsing (one per connection, reused for each
    request: no per-request objects but a small tuple per complete request).

    A read is parsed whole before anything in it is answered, as aiohttp does: a read that holds
    bytes llhttp refuses is handed over whole (aiohttp answers it with one 400, even the valid
    requests before the bad bytes), and a request the fast lane does not serve is handed over
    with everything after it, once the requests before it are answered.
    """

    __slots__ = ("answered", "body", "buf", "cl", "conn", "dup", "head_end", "headers", "in_head",
                 "last", "last_head", "last_rest", "method", "mstart", "parser", "pos", "pub", "ready",
                 "sse", "stop", "url", "ws")

    def __init__(self, conn: FastLane) -> None:
        self.conn = conn
        #: refers back to this object's callbacks: :meth:`close` breaks the cycle
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        #: bytes received and not yet answered start at ``buf[pos]``
        self.buf = b""
        self.pos = 0
        #: requests were answered since the connection last looked (a new head began)
        self.answered = False
        #: complete requests of this read, to answer once it parsed whole:
        #: (publish target or None for a stream, method, target, body, user agent, end offset)
        self.ready: list[tuple[PublishTarget | None, bytes, bytes, bytes, bytes | None, int]] = []
        #: offset of the first request aiohttp must answer (-1: none so far)
        self.stop = -1
        # the request being parsed
        self.mstart = 0
        self.url = b""
        self.method = b""
        self.headers: dict[bytes, bytes] = {}
        self.dup = False
        self.in_head = True
        self.head_end = 0
        self.cl = 0
        self.body = b""
        self.pub: PublishTarget | None = None
        #: the stream asked for is SSE (a stream is the last request a read may hold)
        self.sse = False
        #: the stream asked for is a WebSocket: the 101's head (server.fastws.handshake_head)
        self.ws: tuple[bytes, bytes] | None = None
        #: the head (its bytes) of the last publish the lane decided to serve, and what it
        #: decided: (publish target, method, request target, user agent, Content-Length)
        self.last_head = b""
        self.last: tuple[PublishTarget, bytes, bytes, bytes | None, int] | None = None
        #: that head without its request line: its header lines and the blank line
        self.last_rest = b""

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``, then serve what the fast lane serves. Returns the bytes kept for the
        request not yet complete, or None: hand the connection (:meth:`unanswered`) to aiohttp.

        A read that is exactly one request whose head is byte for byte the last publish's head
        (a publisher sends the same head each time) is not parsed again: at a message boundary,
        llhttp's callbacks and the lane's decision on those bytes are the same as last time,
        but for what may have changed since (draining, the allow-list), which is checked again.
        Nor is one whose head differs from it in the request target only, when that target was
        accepted by llhttp in an earlier request line and the lane keeps its publish target
        (:meth:`Lane.known_target`: no secure topic): llhttp reads a request line's target on
        its own (the headers after it do not change what it accepts), and the lane's decision
        depends on the target only through that publish target. A target not seen before is
        taken the same way when it is plain origin-form (:data:`_PLAIN_TARGET`: bytes llhttp
        accepts in a target) and a publish target without a secure topic.
        """
        parser = self.parser
        if parser is None:
            return None
        last = self.last
        if last is not None and not self.buf:
            rest = self.last_rest
            head = self.last_head
            line = len(data) - len(rest) - last[4]  # where the head's header lines start, if it is one
            if line == len(head) - len(rest) and data.startswith(head):  # the same head
                pub: PublishTarget | None = last[0]
                url = last[2]
            elif line > 0 and data.startswith(rest, line):  # the same but for the request line
                method = last[1]
                at = len(method) + 1  # the target: between "METHOD " and " HTTP/1.1\r\n"
                pub = None
                if (line - 11 > at and data.startswith(method) and data[at - 1] == 32
                        and data.startswith(b" HTTP/1.1\r\n", line - 11)):
                    url = data[at:line - 11]
                    lane = self.conn.lane
                    pub = lane.known_target(url)
                    if pub is None and len(url) <= TARGET_MAX and _PLAIN_TARGET.fullmatch(url):
                        pub = lane.publish_target(url)  # a first publish to it, llhttp would accept
                        if pub is not None and pub.secure:
                            pub = None
            else:
                pub = None
            if pub is not None:
                conn = self.conn
                state = conn.lane.state
                if not state.closing and state.allow.allows(conn.peer):
                    if conn.publish(last[1], url, pub, data[line + len(rest):], last[3]):
                        self.answered = True
                        return b""
                    self.buf = data  # aiohttp answers it (pos is 0: nothing else is unanswered)
                    return None
        self.buf = self.buf + data if self.buf else data
        ready = self.ready
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops at an Upgrade/CONNECT request: aiohttp's unless it is a WebSocket
            # handshake the fast lane answers (its on_message_complete ran: it is in ready)
            if self.stop < 0 and self.ws is None:
                ready.clear()
                return None
        except httptools.HttpParserCallbackError as e:
            raise (e.__context__ or e) from None  # a bug of ours: asyncio logs it
        except httptools.HttpParserError:
            ready.clear()  # bytes llhttp refuses: aiohttp answers this whole read
            return None
        conn = self.conn
        for pub, method, url, body, ua, end in ready:
            ok = (conn.publish(method, url, pub, body, ua) if pub is not None
                  else conn.subscribe(url, ua, self.sse, self.ws))
            if not ok:
                ready.clear()
                return None  # aiohttp answers it (and what follows) from self.pos
            self.pos = end
        ready.clear()
        if self.stop >= 0 or conn.stream is not None:
            return None if conn.stream is None else b""
        buf = self.buf
        pos = self.pos
        if pos:  # keep only what is not answered yet
            self.answered = True
            buf = self.buf = buf[pos:] if pos < len(buf) else b""
            self.mstart -= pos
            if self.head_end:
                self.head_end -= pos
            self.pos = 0
        if self.in_head and len(buf) > MAX_HEAD:
            return None
        return buf

    def unanswered(self) -> bytes:
        return self.buf[self.pos:]

    def close(self) -> None:
        """Free the parser now (not at the next garbage collection). Never from a callback."""
        self.parser = None
        self.buf = self.url = self.body = self.last_head = self.last_rest = b""
        self.last = None

    # -- parser callbacks: they record, feed() acts -------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url = self.url + url if self.url else url  # a target split across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in self.headers:
            self.dup = True  # a repeated header: aiohttp decides what it means
        self.headers[key] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.stop >= 0:
            return  # aiohttp answers from an earlier request on: only check the syntax
        buf = self.buf
        start = self.mstart
        if self.dup or buf[start:start + 1] in (b"\r", b"\n"):  # repeats, or blank lines first
            self.stop = start
            return
        if self.url[:1] != b"/":  # absolute form (or "*"): aiohttp's, which logs only its path
            self.stop = start
            return
        # llhttp accepted this head strictly (CRLF only): it ends at the first blank line
        self.head_end = buf.find(b"\r\n\r\n", start) + 4
        parser = self.parser
        if parser is None:
            self.stop = start
            return
        self.method = method = parser.get_method()
        decision = negotiate(method, parser.get_http_version(), self.headers)
        if decision.outcome is Outcome.BAD:  # aiohttp's parser refuses it: the whole read, then
            self.ready.clear()
            self.stop = self.pos
        elif decision.lane is not Via.FAST:
            self.stop = start
        elif decision.outcome is Outcome.PUBLISH:
            self.pub = self._publish_target()
            if self.pub is None:
                self.stop = start
        elif self.conn.lane.state.closing:
            self.stop = start  # aiohttp answers 503
        else:
            self.sse = decision.format is Requested.SSE
            if decision.format is Requested.WEBSOCKET:
                self.ws = handshake_head(self.headers, self.conn.lane.state.cors)
                if self.ws is None:
                    self.stop = start  # a foreign Origin: aiohttp's 403

    def on_body(self, body: bytes) -> None:
        if self.stop < 0:
            self.body = self.body + body if self.body else body

    def on_message_complete(self) -> None:
        if self.stop < 0:
            pub = self.pub
            ua = self.headers.get(b"user-agent")
            if pub is not None:
                start = self.mstart
                head_end = self.head_end
                end = head_end + self.cl
                self.ready.append((pub, self.method, self.url, self.body, ua, end))
                buf = self.buf
                head = self.last_head
                if len(head) != head_end - start or not buf.startswith(head, start):
                    self.last_head = head = buf[start:head_end]
                    self.last_rest = head[head.find(b"\r\n") + 2:]
                self.last = (pub, self.method, self.url, ua, self.cl)
            elif self.head_end != len(self.buf):
                self.stop = self.mstart  # bytes after a subscription: unusual, aiohttp's
                end = self.head_end
            else:
                end = self.head_end
                self.ready.append((None, self.method, self.url, b"", ua, end))
            self.mstart = end
        self.url = b""
        self.headers.clear()
        self.dup = False
        self.in_head = True
        self.head_end = 0
        self.body = b""
        self.pub = None

    def _publish_target(self) -> PublishTarget | None:
        """A publish's target before its body arrives; None unless the fast lane serves it."""
        conn = self.conn
        lane = conn.lane
        state = lane.state
        cl = int(self.headers[b"content-length"])  # llhttp checked: digits, no overflow
        if cl > lane.max_payload or state.closing or not state.allow.allows(conn.peer):
            return None  # (draining: aiohttp answers 503)
        pub = lane.publish_target(self.url)
        if pub is None or pub.secure:
            return None  # not a publish target, or credentials needed: aiohttp's
        self.cl = cl
        return pub


class FastLaneSite(ListenerSite):
    """A TCP site whose connections enter through the fast lane (plain TCP only, not TLS).

    Built on aiohttp's public ``BaseSite`` (register with the runner, ``_server`` closed by
    ``stop()``), not on a copy of ``TCPSite.start``.
    """

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, lane_state: State, *,
                 backlog: int = 128, reuse_address: bool = True) -> None:
        super().__init__(runner, host, port, backlog=backlog, reuse_address=reuse_address)
        self._lane_state = lane_state
        self.lane: Lane | None = None

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("runner not set up")
        lane = self.lane = Lane(self._lane_state, server)
        loop = asyncio.get_running_loop()
        self._server = self._listener = await loop.create_server(
            lambda: FastLane(lane), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address)
