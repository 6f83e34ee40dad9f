"""The EventLog interface: where accepted events are kept for replay.

Owns the small async contract every backend implements, and the in-memory ring (the reference
backend and the test fake). Backends never route events; the daemon appends, then routes.
"""

from __future__ import annotations

import collections
import time
from typing import Protocol

from hub.event import Event

__all__ = ["EventLog", "MemoryLog"]


class EventLog(Protocol):
    """An ordered, bounded history of events."""

    async def start(self) -> None:
        """Open storage, recover, evict what is too old."""

    async def append(self, event: Event) -> None:
        """Keep ``event``; when this returns the event is as durable as the backend promises."""

    async def since_time(self, ts: float, limit: int) -> list[Event]:
        """Retained events with ``timestamp > ts``, oldest first, at most ``limit``."""

    async def after_cursor(self, cursor: str, limit: int) -> list[Event] | None:
        """Retained events after ``cursor``, oldest first; None if the cursor is unknown."""

    async def close(self) -> None:
        """Flush and release storage."""


class MemoryLog:
    """A ring of the last ``size`` events younger than ``max_age`` seconds (0 = no age limit).

    ``size == 0`` keeps nothing: appends are free and replays are empty.
    """

    def __init__(self, size: int, max_age: float = 0.0) -> None:
        self.size = size
        self.max_age = max_age
        self._ring: collections.deque[Event] = collections.deque(maxlen=size or 1)

    async def start(self) -> None:
        return None

    async def append(self, event: Event) -> None:
        if self.size:
            self._ring.append(event)  # deque(maxlen) trims the oldest in O(1)

    def _evict(self) -> None:
        if self.max_age and self._ring:
            cutoff = time.time() - self.max_age
            ring = self._ring
            while ring and ring[0].timestamp < cutoff:
                ring.popleft()

    async def since_time(self, ts: float, limit: int) -> list[Event]:
        self._evict()
        out = [e for e in self._ring if e.timestamp > ts] if self.size else []
        return out[:limit] if limit else out

    async def after_cursor(self, cursor: str, limit: int) -> list[Event] | None:
        self._evict()
        if not self.size:
            return None
        for i, e in enumerate(self._ring):
            if e.cursor == cursor:
                out = list(self._ring)[i + 1:]
                return out[:limit] if limit else out
        return None

    async def close(self) -> None:
        return None
