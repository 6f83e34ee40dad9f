"""The one publish path: every event (HTTP PUT/POST, SQS) enters the log through here.

Owns stamping and appending, and connects the log's tail to the hub: a node routes what its
log hands back (:meth:`~server.eventlog.EventLog.tail`), never what it appended itself, so one
node and a cluster of nodes sharing a log take the same path. Knows nothing of HTTP.

* A log that keeps events synchronously (memory) hands each event to the tail inside
  ``append``: no task, no future; this is the hot path of an in-memory daemon.
* A durable log returns an awaitable per append; the publisher's 2xx is sent only once it
  resolves (committed to SQLite, acknowledged by Redis): awaited by the aiohttp handler
  (:meth:`Ingest.submit`), or answered from a done-callback by the fast lane
  (:meth:`Ingest.start`: no task per publish). The log routes in its own order (commit order,
  stream order). A publisher that disconnects meanwhile does not cancel the append (the
  event is accepted or failed, never half-done).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

from hub.event import Event, make_event
from hub.hub import Hub
from server.eventlog import Appended, EventLog
from server.metrics import Histogram, LatencyHistogram

__all__ = ["Ingest"]

logger = logging.getLogger(__name__)


class Ingest:
    """Accepts events: stamped once and appended; the log's tail routes them to the hub."""

    def __init__(self, hub: Hub, log: EventLog) -> None:
        self.hub = hub
        self.log = log
        self.accepted = 0
        #: events the log refused (storage failure); their publishers got an error
        self.failed = 0
        #: events not kept because the log already had them (``dedup``)
        self.duplicates = 0
        #: events the tail handed to the hub
        self.routed = 0
        #: appends not yet resolved
        self.pending = 0
        #: ... and their futures (the drain waits for them: :meth:`settle`)
        self._inflight: set[asyncio.Future[Appended | None]] = set()
        #: seconds from submit to acceptance (the publisher's 2xx): a few integers, no labels
        self.latency = LatencyHistogram()
        #: acceptances within the first bucket (an in-memory publish: nearly all of them), and
        #: their seconds, counted here and added to the histogram's first bucket when read
        self._quick = 0
        self._quick_seconds = 0.0
        self._quick_bound = self.latency.bounds[0]
        log.tail(self._route)

    def _route(self, event: Event) -> None:
        self.routed += 1
        self.hub.publish_event(event)

    @property
    def synchronous(self) -> bool:
        """True when the log keeps events at once: :meth:`submit_now` may be used."""
        return self.log.synchronous

    def submit_now(self, path: str, body: Mapping[str, Any], *, source: str = "http",  # noqa: ARG002
                   parsed: tuple[tuple[str, ...], bool] | None = None, owned: bool = False) -> Appended:
        """:meth:`start` for a synchronous log only: the :class:`Appended` itself.

        ``parsed``: the path's ``(topics, private)`` when the caller has them already; ``owned``:
        ``body`` is the caller's own fresh dict, stamped in place (see ``make_event``)."""
        done = self.start(path, body, parsed=parsed, owned=owned)
        if not isinstance(done, Appended):
            raise RuntimeError(f"{self.log!r} is not synchronous: use Ingest.submit")
        return done

    def start(self, path: str, body: Mapping[str, Any], *, dedup: str | None = None,
              parsed: tuple[tuple[str, ...], bool] | None = None, owned: bool = False
              ) -> Appended | asyncio.Future[Appended | None]:
        """Stamp ``body`` as published at ``path`` and start its append, without awaiting.

        Returns the :class:`Appended` when the log kept the event at once (memory), else a
        future that resolves once it is in the log (None: ``dedup`` named an event the log
        already has) or fails with what the log raises. Nothing cancels the append: a caller
        that stops caring (a publisher that left) just drops the future; the event is kept and
        routed all the same, and the drain waits for it (:meth:`settle`). ``parsed``: the
        path's ``(topics, private)`` when the caller has them already; ``owned``: ``body`` is
        the caller's own fresh dict, stamped in place (see ``make_event``).
        """
        t0 = time.perf_counter()
        event = make_event(path, body, parsed=parsed, owned=owned)
        done = self.log.append(event) if dedup is None else self.log.append(event, dedup=dedup)
        if isinstance(done, Appended):  # kept at once; a quick one counted in plain numbers
            self.accepted += 1
            dt = time.perf_counter() - t0
            if dt <= self._quick_bound:
                self._quick += 1
                self._quick_seconds += dt
            else:
                self.latency.observe(dt)
            return done
        fut = asyncio.ensure_future(done)
        self.pending += 1
        self._inflight.add(fut)
        fut.add_done_callback(functools.partial(self._settled, t0))
        return fut

    async def submit(self, path: str, body: Mapping[str, Any], *, source: str = "http",
                     dedup: str | None = None) -> Appended | None:
        """Stamp ``body`` as published at ``path``; returns once the event is in the log.

        Returns None when ``dedup`` names an event the log already has (not appended again).
        Raises what the log raises when it cannot keep the event (the event is then not routed).
        """
        done = self.start(path, body, dedup=dedup)
        if isinstance(done, Appended):
            return done
        # shielded: a publisher that leaves cannot cancel the append
        result = await asyncio.shield(done)
        logger.debug("accepted %s from %s", result, source)
        return result

    def stats(self) -> dict[str, float | Histogram]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"events_published_total": self.accepted, "publish_failures_total": self.failed,
                "publish_duplicates_total": self.duplicates, "events_routed_total": self.routed,
                "publish_pending": self.pending, "publish_latency_seconds": self._latency()}

    def _latency(self) -> Histogram:
        snap = self.latency.snapshot()
        counts = (snap.counts[0] + self._quick, *snap.counts[1:])
        return Histogram(snap.bounds, counts, snap.total + self._quick_seconds)

    async def settle(self) -> None:
        """Wait until every append in flight now is resolved (callers bound the wait)."""
        if self._inflight:
            await asyncio.wait(list(self._inflight))

    def _settled(self, t0: float, fut: asyncio.Future[Appended | None]) -> None:
        self.pending -= 1
        self._inflight.discard(fut)
        if fut.cancelled():
            self.failed += 1
            return
        if fut.exception() is not None:  # raised to the publisher too
            self.failed += 1
            return
        self.latency.observe(time.perf_counter() - t0)
        if fut.result() is None:
            self.duplicates += 1
        else:
            self.accepted += 1
