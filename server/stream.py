"""A subscriber's stream: the daemon's :class:`~hub.router.Sink` for one connection, and
opening one (:func:`open_stream`), whatever the lane or the format.

Owns the connection's outgoing buffer (the transport's, bounded in bytes), the hold-then-flush
used by gap-free replay, and the end of the stream (clean finish, overflow, client gone).
The hub only calls :meth:`Stream.send`, which never blocks: a subscriber that falls behind by
more than its limit is disconnected (logged, counted) and never delays anyone else.
Every format (NDJSON, svnpubsub, SSE, WebSocket) is a :class:`~server.formats.StreamFormat`;
this module never looks at one beyond the bytes it supplies.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hub.event import Event
from hub.router import NO_ACL, Acl, Group
from hub.topics import TopicSpec
from server.formats import StreamFormat

if TYPE_CHECKING:
    from server.app import State
    from server.auth import Principal

__all__ = ["Stream", "StreamStats", "WritePacing", "close_stream", "open_stream", "stream_head"]

logger = logging.getLogger(__name__)
_ids = itertools.count(1)


#: why a stream ended (``Stream.end``) → the ``reason`` label of ``pypubsub_disconnects_total``
END_REASONS = {"gone": "client", "overflow": "overflow", "shutdown": "shutdown", "limit": "limit"}


@dataclass(slots=True)
class StreamStats:
    opened: int = 0
    #: streams ended, by ``Stream.end`` reason (counted once per stream by ``State.forget``)
    ended: dict[str, int] = field(default_factory=dict)
    #: replays waiting now for their connection to resume writing (:meth:`Stream.drain`)
    paused: int = 0
    #: such waits ended by the connection's ``resume_writing()``
    resumed: int = 0

    def stats(self) -> dict[str, float | dict[str, float]]:
        ended: dict[str, float] = dict.fromkeys(END_REASONS.values(), 0)
        for why, n in self.ended.items():
            label = END_REASONS.get(why, why)
            ended[label] = ended.get(label, 0) + n
        return {"streams_opened_total": self.opened, "disconnects_total": ended,
                "replays_paused": self.paused, "replay_pauses_total": self.resumed}


@runtime_checkable
class WritePacing(Protocol):
    """What a connection's protocol offers a replay to pace itself by (the fast lane's
    :class:`~server.fastlane.FastLane`, the :class:`~server.gate.Gate` in front of aiohttp).

    The transport calls the protocol's ``pause_writing()`` when its buffer passes the high-water
    mark and ``resume_writing()`` once it is below the low-water mark again.
    """

    def write_resumed(self) -> asyncio.Future[None] | None:
        """None while writing is not paused; else a Future resolved by ``resume_writing()`` or
        by ``connection_lost()`` (a connection lost while paused never leaves a waiter hanging).
        Made on demand and dropped when resolved: an idle connection carries none."""


#: Seconds a slow subscriber's connection may take to take its close frame before it is reset.
OVERFLOW_CLOSE_GRACE = 1.0

#: SO_LINGER on, 0 s: close() sends RST and drops unsent data at once
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset_on_close(t: asyncio.Transport) -> None:
    """Make closing ``t`` reset the connection: the kernel then frees the megabytes a stalled
    reader left in its send buffer now, instead of holding them in FIN-WAIT-1 until it reads."""
    sock = t.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except (OSError, ValueError) as e:  # already gone (uvloop: fd -1): nothing left to free
        logger.debug("SO_LINGER on overflow failed: %s", e)


def _reset(t: asyncio.Transport) -> None:
    _reset_on_close(t)
    t.abort()


class Stream:
    """One subscriber connection. When the stream must end, :meth:`end` calls ``on_end`` (soon,
    not from inside the hub's write) and resolves ``done``, a Future made only for a handler
    that awaits it: an idle fast-lane stream carries no Future and no callback entry."""

    __slots__ = (
        "__weakref__",
        "_done",
        "ended",
        "fmt",
        "group",
        "held",
        "held_bytes",
        "id",
        "last_position",
        "limit",
        "on_end",
        "peer",
        "principal",
        "spec",
        "stats",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, fmt: StreamFormat, spec: TopicSpec, peer: str,
                 limit: int, stats: StreamStats, principal: Principal | None = None) -> None:
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = transport
        self.fmt = fmt
        self.spec = spec
        self.peer = peer
        self.limit = limit
        self.stats = stats
        #: who opened the stream (None: anonymous); ACL reload re-authorises from this
        self.principal = principal
        #: the hub group the stream is in (the router moves it on ACL reload)
        self.group: Group | None = None
        #: why the stream ended (None: still open)
        self.ended: str | None = None
        #: called once (through ``loop.call_soon``) with the reason when the stream ends
        self.on_end: Callable[[str], object] | None = None
        self._done: asyncio.Future[str] | None = None
        #: live events held back while a replay is written (None: not holding)
        self.held: list[Event] | None = None
        self.held_bytes = 0
        #: log position the replay covered (held live events up to it are not written again)
        self.last_position: int | None = None
        stats.opened += 1

    @property
    def done(self) -> asyncio.Future[str]:
        """A Future resolved with the reason when the stream ends (made on first use)."""
        fut = self._done
        if fut is None:
            fut = self._done = asyncio.get_running_loop().create_future()
            if self.ended is not None:
                fut.set_result(self.ended)
        return fut

    def __repr__(self) -> str:
        return f"<Stream #{self.id} {self.peer} {self.spec} {self.fmt.name}>"

    # -- the hub's side ------------------------------------------------------------------
    def send(self, data: bytes, events: Sequence[Event] | None) -> None:
        t = self.transport
        if t is None:
            return
        if self.held is not None and events is not None:
            self.held.extend(events)
            self.held_bytes += len(data)
            if self.held_bytes > self.limit:
                self._overflow(self.held_bytes)
            return
        if t.is_closing():
            self.end("gone")
            return
        t.write(data)
        size = t.get_write_buffer_size()
        if size > self.limit:
            self._overflow(size)

    def write_record(self, data: bytes) -> None:
        """Write an already framed record (opening, notice) now, bypassing any hold."""
        t = self.transport
        if t is not None and data and not t.is_closing():
            t.write(data)

    # -- replay support ------------------------------------------------------------------
    def hold(self) -> None:
        """Start holding live events (call before taking the log snapshot)."""
        self.held = []
        self.held_bytes = 0
        t = self.transport
        if t is not None and not t.is_closing():
            # the replay writes a slice (up to a quarter of the limit) whenever writing is not
            # paused, i.e. on top of up to the high-water mark: keep that mark at half the limit
            # so that a slice on top of it stays within the limit (a small stream_buffer)
            high = self.limit // 2
            if t.get_write_buffer_limits()[1] > high:
                t.set_write_buffer_limits(high=high)

    def write_direct(self, events: Sequence[Event]) -> None:
        """Write replayed events now (bypassing the hold), remembering the last position."""
        t = self.transport
        if t is None or not events:
            return
        if t.is_closing():
            self.end("gone")
            return
        t.write(b"".join([e.wire(self.fmt) for e in events]))
        self.covered(events[-1].position)
        size = t.get_write_buffer_size()
        if size > self.limit:
            self._overflow(size)

    def covered(self, position: int) -> None:
        """The replay has dealt with every event up to log ``position``."""
        if self.last_position is None or position > self.last_position:
            self.last_position = position

    async def drain(self) -> bool:
        """Replay pacing: while the connection's protocol has writing paused (the transport's
        buffer went past its high-water mark), wait until it resumes (below the low-water mark),
        the connection is lost, or the stream ends. No timer: the wake-up is the transport's
        ``resume_writing()``. True when it waited for the transport to resume writing."""
        t = self.transport
        if t is None or t.is_closing() or self.ended is not None:
            return False
        proto = t.get_protocol()
        resumed = proto.write_resumed() if isinstance(proto, WritePacing) else None
        if resumed is None:
            return False
        # the stream may also end while paused (shutdown, overflow): that ends the wait too
        done = self.done
        stats = self.stats
        stats.paused += 1
        try:
            await asyncio.wait((resumed, done), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stats.paused -= 1
        if resumed.done() and not done.done() and not t.is_closing():
            stats.resumed += 1
            return True
        return False

    def release(self) -> None:
        """Stop holding: write held live events not already sent by the replay, in order."""
        held, self.held = self.held, None
        if not held:
            return
        last = self.last_position
        if last is not None:  # by log position: cursors need not sort (0.7.4 imports)
            held = [e for e in held if e.position > last]
        self.write_direct(held)

    # -- ending --------------------------------------------------------------------------
    def _overflow(self, size: int) -> None:
        logger.warning("disconnecting slow subscriber %r: %d bytes unsent (limit %d)",
                       self, size, self.limit)
        t = self.transport
        self.transport = None
        if t is not None:
            if self.fmt.overflow and not t.is_closing():
                # a close frame after what is queued, then a reset if it is not taken in time
                t.write(self.fmt.overflow)
                t.close()
                asyncio.get_running_loop().call_later(OVERFLOW_CLOSE_GRACE, _reset, t)
            else:
                _reset(t)
        self.end("overflow")

    def end(self, why: str) -> None:
        """Ask the stream's handler to finish (``shutdown``, ``overflow``, ``gone``...)."""
        if self.ended is not None:
            return
        self.ended = why
        fut = self._done
        if fut is not None and not fut.done():
            fut.set_result(why)
        if self.on_end is not None:
            asyncio.get_running_loop().call_soon(self.on_end, why)


# -- opening and closing a stream (both lanes) ------------------------------------------------
def stream_head(fmt: StreamFormat, server: str,
                extra: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The response headers of a stream in ``fmt`` (Server first, then the format's own)."""
    head = [("Server", server), *fmt.headers]
    if extra:
        head.extend(extra.items())
    return head


def open_stream(state: State, transport: asyncio.Transport, fmt: StreamFormat, spec: TopicSpec,
                peer: str, principal: Principal | None, *, acl: Acl = NO_ACL, preamble: bytes = b"",
                hold: bool = False) -> Stream:
    """Register a subscriber whose response head has been sent: write the format's opening
    record and ``preamble`` (a notice), enter the open-stream set and the hub.

    With ``hold``, live events are held from the moment of joining until the caller's replay
    :meth:`~Stream.release` s them (gap-free: joined before the log snapshot is taken).
    """
    stream = Stream(transport, fmt, spec, peer, state.config.server.stream_buffer, state.stats,
                    principal)
    stream.write_record(fmt.opening + preamble)
    state.streams[stream] = None
    if hold:
        stream.hold()
    stream.group = state.hub.topics.subscribe(stream, spec, fmt, acl)
    return stream


def close_stream(state: State, stream: Stream, why: str, *, end_record: bool = True) -> None:
    """Teardown: out of the hub and the open-stream set; at shutdown, the format's clean end
    record (the terminating chunk) unless the caller's HTTP layer writes it (``end_record``)."""
    state.forget(stream, why)
    t = stream.transport
    if (end_record and why == "shutdown" and t is not None and not t.is_closing()
            and stream.fmt.ending):
        t.write(stream.fmt.ending)
