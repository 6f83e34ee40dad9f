"""A subscriber's stream: the daemon's :class:`~hub.router.Sink` for one HTTP connection.

Owns the connection's outgoing buffer (the transport's, bounded in bytes), the hold-then-flush
used by gap-free replay, and the end of the stream (clean finish, overflow, client gone).
The hub only calls :meth:`Stream.send`, which never blocks: a subscriber that falls behind by
more than its limit is disconnected (logged, counted) and never delays anyone else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hub.event import Event, WireFormat
from hub.router import Group
from hub.topics import TopicSpec

if TYPE_CHECKING:
    from server.auth import Principal

__all__ = ["Stream", "StreamStats"]

logger = logging.getLogger(__name__)
_ids = itertools.count(1)


#: why a stream ended (``Stream.end``) → the ``reason`` label of ``pypubsub_disconnects_total``
END_REASONS = {"gone": "client", "overflow": "overflow", "shutdown": "shutdown", "limit": "limit"}


@dataclass(slots=True)
class StreamStats:
    opened: int = 0
    #: streams ended, by ``Stream.end`` reason (counted once per stream by ``State.forget``)
    ended: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, float | dict[str, float]]:
        ended: dict[str, float] = dict.fromkeys(END_REASONS.values(), 0)
        for why, n in self.ended.items():
            label = END_REASONS.get(why, why)
            ended[label] = ended.get(label, 0) + n
        return {"streams_opened_total": self.opened, "disconnects_total": ended}


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
    except OSError as e:  # already gone: nothing left to free
        logger.debug("SO_LINGER on overflow failed: %s", e)


class Stream:
    """One subscriber connection. ``done`` resolves when the stream must end."""

    __slots__ = (
        "__weakref__",
        "done",
        "fmt",
        "group",
        "held",
        "held_bytes",
        "id",
        "last_position",
        "limit",
        "peer",
        "principal",
        "spec",
        "stats",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, fmt: WireFormat, spec: TopicSpec, peer: str,
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
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        #: live events held back while a replay is written (None: not holding)
        self.held: list[Event] | None = None
        self.held_bytes = 0
        #: log position the replay covered (held live events up to it are not written again)
        self.last_position: int | None = None
        stats.opened += 1

    def __repr__(self) -> str:
        return f"<Stream #{self.id} {self.peer} {self.spec} {self.fmt.value}>"

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

    # -- replay support ------------------------------------------------------------------
    def hold(self) -> None:
        """Start holding live events (call before taking the log snapshot)."""
        self.held = []
        self.held_bytes = 0

    def write_direct(self, events: Sequence[Event]) -> None:
        """Write replayed events now (bypassing the hold), remembering the last position."""
        t = self.transport
        if t is None or not events:
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

    async def drain(self) -> None:
        """Wait until the transport's buffer is below half the limit (replay pacing)."""
        t = self.transport
        for _ in range(1_000_000):
            if t is None or t.is_closing() or self.done.done():
                return
            if t.get_write_buffer_size() <= self.limit // 2:
                return
            await asyncio.sleep(0.005)

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
            _reset_on_close(t)
            t.abort()
        self.end("overflow")

    def end(self, why: str) -> None:
        """Ask the stream's handler to finish (``shutdown``, ``overflow``, ``gone``...)."""
        if not self.done.done():
            self.done.set_result(why)
