"""The EventLog interface: where accepted events are kept, read back and replayed; the memory ring.

Owns the small async contract every backend implements and :class:`MemoryLog`, the reference
backend, the test fake and the read side of the other backends (they mirror what they
committed, or read back, into one).

The spine is append → log → tail → hub, the same for every backend: :meth:`EventLog.append`
keeps an event and returns its :class:`Appended` position and cursor; the node routes what
the log hands to its :meth:`EventLog.tail` consumer, in log order. A memory log hands each event
over at once; SQLite after its commit; Redis Streams when the node reads the entry back (so
every node of a cluster routes the same events in the same order, its own included).

Positions are opaque integers, increasing in log order (not necessarily by one); an event
carries its own (:attr:`hub.event.Event.position`). A replay asks :meth:`EventLog.locate`
where to start (before the stream goes live), then :meth:`EventLog.read` for the events after
that position; live events held meanwhile are de-duplicated by position, never by cursor.
"""

from __future__ import annotations

import bisect
import logging
import operator
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from hub.event import Event

__all__ = ["Appended", "EventLog", "Located", "MemoryLog", "TailConsumer", "place"]

logger = logging.getLogger(__name__)

#: The ring drops its evicted prefix in one slice once it is this long and at least half the
#: list: amortised O(1) per event, without a copy on every eviction.
COMPACT_MIN = 1024

#: What a log hands each event to, in log order, once the event is in the log.
TailConsumer = Callable[[Event], object]

_position = operator.attrgetter("position")


class Appended(NamedTuple):
    """An event the log accepted: its position in the log and its cursor."""

    position: int
    cursor: str


def place(event: Event, position: int) -> Event:
    """Give a fresh event its log position (once, before any reader sees the event)."""
    object.__setattr__(event, "position", position)
    return event


def _ignore(_event: Event) -> None:
    return None


class Located:
    """Where a replay starts: after ``position`` (opaque), with ``pending`` events after it."""

    __slots__ = ("pending", "position")

    def __init__(self, position: int, pending: int) -> None:
        self.position = position
        self.pending = pending

    def __repr__(self) -> str:
        return f"<Located after {self.position}, {self.pending} pending>"


class EventLog(Protocol):
    """An ordered, bounded history of events (``size`` events, ``max_age`` seconds)."""

    #: True when :meth:`append` always returns an :class:`Appended` (the event is kept at once)
    synchronous: bool

    async def start(self) -> None:
        """Open storage, recover, evict what is too old; the tail starts delivering."""

    def tail(self, consumer: TailConsumer) -> None:
        """Hand every event that enters the log from now on to ``consumer``, in log order
        (set once, before :meth:`start`: the node's hub)."""

    def append(self, event: Event, *, dedup: str | None = None
               ) -> Appended | Awaitable[Appended | None]:
        """Keep ``event`` (stamped by the caller, from the event loop).

        Returns its :class:`Appended` when it is kept already (the tail has had it), or an
        awaitable that resolves once the event is as durable as the backend promises (or raises
        :class:`~server.errors.PubSubError`); it resolves to None when ``dedup`` names an event
        the log already took (SQS message ids on several nodes), which then is not kept again.
        """

    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        """Where a replay of the events after ``cursor`` (or with timestamp > ``since``) starts.

        None when ``cursor`` is unknown, evicted or foreign (another backend's). With neither
        argument: the newest position. The ``since`` position may precede some older events:
        :meth:`read` callers filter by timestamp (clocks step backwards; cursors do not).
        """

    async def read(self, after: int, limit: int) -> list[Event]:
        """Retained events after position ``after``, oldest first; the newest ``limit`` of them
        when there are more (``limit`` 0: all). Never returns events older than ``max_age``."""

    async def close(self) -> None:
        """Flush and release storage."""


class MemoryLog:
    """A ring of the last ``size`` events younger than ``max_age`` seconds (0 = no age limit).

    ``size == 0`` keeps nothing: appends only route, replays are empty and every cursor is
    unknown. Cursor and position lookups are O(log n) at most (a dict, then bisect on the
    positions); time lookup is O(log n) (bisect on the running maximum of timestamps, which is
    sorted even when the clock steps backwards); trimming is O(1) amortised.
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
        #: position of the newest event ever kept (or appended, with size 0)
        self._last = 0
        self._index: dict[str, int] = {}
        self._consumer: TailConsumer = _ignore
        #: events evicted since the last take_dropped() (persistent backends delete as many rows)
        self._dropped = 0

    # -- the EventLog interface ----------------------------------------------------------
    async def start(self) -> None:
        return None

    def tail(self, consumer: TailConsumer) -> None:
        self._consumer = consumer

    def append(self, event: Event, *, dedup: str | None = None) -> Appended:  # noqa: ARG002
        """Keep ``event`` at the next position and hand it to the tail at once.

        ``dedup`` is ignored: one process has one SQS consumer per queue, which de-duplicates.
        """
        place(event, self._last + 1)
        self.keep(event)
        self._consumer(event)
        return Appended(event.position, event.cursor)

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
        return self._last

    def newest(self) -> Event | None:
        return self._events[-1] if len(self) else None

    def keep(self, event: Event) -> None:
        """Append ``event`` (placed after every kept one), then trim by size and age."""
        pos = event.position
        if pos <= self._last:
            raise ValueError(f"{event!r} at position {pos} is not after position {self._last}")
        self._last = pos
        if not self.size:
            return
        events = self._events
        ts = event.timestamp
        maxts = self._maxts
        self._index[event.cursor] = pos
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
        for i in range(self._head, self._head + k):
            ev = events[i]
            if index.get(ev.cursor) == ev.position:  # a duplicate cursor (old imports) may point later
                del index[ev.cursor]
        self._head += k
        self._dropped += k
        if self._head >= COMPACT_MIN and self._head * 2 >= len(events):
            del events[:self._head]
            del self._maxts[:self._head]
            self._head = 0

    def clear(self) -> None:
        """Forget every retained event (the log behind a mirror was reset): positions go on."""
        self._drop(len(self))

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        out: dict[str, float] = {"backlog_events": len(self), "log_appends_total": self.last_position}
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
            i = bisect.bisect_right(self._events, pos, lo=self._head, key=_position)
            return Located(pos, len(self._events) - i)
        if since is not None:
            i = bisect.bisect_right(self._maxts, since, lo=self._head)
            # after the event before the first one younger than ``since`` (or before them all)
            pos = self._events[i - 1].position if i > self._head else self._before_head()
            return Located(pos, len(self._events) - i)
        return Located(last, 0)

    def _before_head(self) -> int:
        """A position just before the oldest retained event (or the newest, when none is)."""
        if len(self):
            return self._events[self._head].position - 1
        return self._last

    def read_now(self, after: int, limit: int) -> list[Event]:
        self.evict()
        n = len(self._events)
        i = bisect.bisect_right(self._events, after, lo=self._head, key=_position)
        if limit and n - i > limit:
            i = n - limit
        return self._events[i:] if i < n else []

    def __repr__(self) -> str:
        return f"<MemoryLog {len(self)}/{self.size} max_age={self.max_age:g}s>"
