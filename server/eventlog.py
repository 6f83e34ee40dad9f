"""The EventLog interface: where accepted events are kept for replay, and the in-memory ring.

Owns the small async contract every backend implements and :class:`MemoryLog`, the reference
backend, the test fake and the read side of the persistent backends (they mirror what they
committed into one). Backends never route events: the ingest path appends, then routes.

Positions are integers, increasing by one per appended event; position ``p`` names the point
just after the event at ``p``. A replay asks :meth:`EventLog.locate` where to start (before
the stream goes live), then :meth:`EventLog.read` for the events after that point.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from hub.event import Event

__all__ = ["EventLog", "Located", "MemoryLog"]

logger = logging.getLogger(__name__)

#: The ring drops its evicted prefix in one slice once it is this long and at least half the
#: list: amortised O(1) per event, without a copy on every eviction.
COMPACT_MIN = 1024


class Located:
    """Where a replay starts: after ``position``, with ``pending`` retained events after it."""

    __slots__ = ("pending", "position")

    def __init__(self, position: int, pending: int) -> None:
        self.position = position
        self.pending = pending

    def __repr__(self) -> str:
        return f"<Located after {self.position}, {self.pending} pending>"


class EventLog(Protocol):
    """An ordered, bounded history of events (``size`` events, ``max_age`` seconds)."""

    #: True when :meth:`append` always returns None (the event is kept at once)
    synchronous: bool

    async def start(self) -> None:
        """Open storage, recover, evict what is too old."""

    def append(self, event: Event) -> Awaitable[None] | None:
        """Keep ``event``. Events are appended in cursor order, from the event loop.

        Returns None when the event is kept already (nothing to wait for: the ingest path then
        routes it at once, without a task), or an awaitable that resolves once the event is as
        durable as the backend promises (or raises :class:`~server.errors.PubSubError`).
        """

    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        """Where a replay of the events after ``cursor`` (or with timestamp > ``since``) starts.

        None when ``cursor`` is unknown or evicted. With neither argument: the newest position.
        The ``since`` position may precede some older events: :meth:`read` callers filter by
        timestamp (clocks step backwards; cursors do not).
        """

    async def read(self, after: int, limit: int) -> list[Event]:
        """Retained events after position ``after``, oldest first; the newest ``limit`` of them
        when there are more (``limit`` 0: all). Never returns events older than ``max_age``."""

    async def close(self) -> None:
        """Flush and release storage."""


class MemoryLog:
    """A ring of the last ``size`` events younger than ``max_age`` seconds (0 = no age limit).

    ``size == 0`` keeps nothing: appends are free, replays are empty and every cursor is unknown.
    Cursor lookup is O(1) (a dict); time lookup is O(log n) (bisect on the running maximum of
    timestamps, which is sorted even when the clock steps backwards); trimming is O(1) amortised.
    """

    #: append() never returns an awaitable: the fast lane may publish inline
    synchronous = True

    def __init__(self, size: int, max_age: float = 0.0, *,
                 clock: Callable[[], float] = time.time) -> None:
        if size < 0 or max_age < 0:
            raise ValueError("size and max_age cannot be negative")
        self.size = size
        self.max_age = max_age
        self._clock = clock
        self._events: list[Event] = []
        #: running maximum of timestamps, parallel to _events (sorted: bisect-able)
        self._maxts: list[float] = []
        #: index in _events of the oldest retained event
        self._head = 0
        #: position of _events[0]
        self._base = 1
        self._index: dict[str, int] = {}
        #: events evicted since the last take_dropped() (persistent backends delete as many rows)
        self._dropped = 0

    # -- the EventLog interface ----------------------------------------------------------
    async def start(self) -> None:
        return None

    def append(self, event: Event) -> None:
        self.keep(event)

    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        return self.locate_now(cursor=cursor, since=since)

    async def read(self, after: int, limit: int) -> list[Event]:
        return self.read_now(after, limit)

    async def close(self) -> None:
        return None

    # -- synchronous core (also used by the persistent backends' mirrors) -----------------
    def __len__(self) -> int:
        return len(self._events) - self._head

    @property
    def last_position(self) -> int:
        """Position of the newest event ever kept (retained or not)."""
        return self._base + len(self._events) - 1

    def newest(self) -> Event | None:
        return self._events[-1] if len(self) else None

    def keep(self, event: Event) -> None:
        """Append ``event``, then trim by size and age."""
        if not self.size:
            return
        events = self._events
        ts = event.timestamp
        maxts = self._maxts
        self._index[event.cursor] = self._base + len(events)
        events.append(event)
        maxts.append(ts if not maxts or ts > maxts[-1] else maxts[-1])
        if len(events) - self._head > self.size:
            self._drop(1)
        if self.max_age:
            self.evict()

    def evict(self) -> int:
        """Drop events older than ``max_age``; returns how many were dropped."""
        if not self.max_age:
            return 0
        cutoff = self._clock() - self.max_age
        events = self._events
        i = self._head
        n = len(events)
        while i < n and events[i].timestamp < cutoff:
            i += 1
        if i > self._head:
            k = i - self._head
            self._drop(k)
            return k
        return 0

    def _drop(self, k: int) -> None:
        events = self._events
        index = self._index
        base = self._base
        for i in range(self._head, self._head + k):
            cur = events[i].cursor
            if index.get(cur) == base + i:  # a duplicate cursor (old imports) may point later
                del index[cur]
        self._head += k
        self._dropped += k
        if self._head >= COMPACT_MIN and self._head * 2 >= len(events):
            del events[:self._head]
            del self._maxts[:self._head]
            self._base += self._head
            self._head = 0

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        out: dict[str, float] = {"backlog_events": len(self),
                                 "log_appends_total": self.last_position if self.size else 0}
        if len(self):
            out["backlog_oldest_timestamp_seconds"] = self._events[self._head].timestamp
            out["backlog_newest_timestamp_seconds"] = self._events[-1].timestamp
        return out

    def take_dropped(self) -> int:
        """Events evicted since the last call."""
        n, self._dropped = self._dropped, 0
        return n

    def locate_now(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        self.evict()
        last = self.last_position
        if cursor is not None:
            pos = self._index.get(cursor)
            if pos is None:
                return None
            return Located(pos, last - pos)
        if since is not None:
            i = bisect.bisect_right(self._maxts, since, lo=self._head)
            return Located(self._base + i - 1, len(self._events) - i)
        return Located(last, 0)

    def read_now(self, after: int, limit: int) -> list[Event]:
        self.evict()
        n = len(self._events)
        i = max(after + 1 - self._base, self._head)
        if limit and n - i > limit:
            i = n - limit
        return self._events[i:] if i < n else []

    def __repr__(self) -> str:
        return f"<MemoryLog {len(self)}/{self.size} max_age={self.max_age:g}s>"
