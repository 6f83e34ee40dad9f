"""The one publish path: every event (HTTP PUT/POST, SQS, cluster) enters through here.

Owns the order stamp → append to the log → route to the hub, and keeps routing in cursor order
when a durable log commits in groups. Knows nothing of HTTP.

Two paths:

* a log that keeps events synchronously (memory) → the event is routed at once; no task, no
  future: this is the hot path of an in-memory daemon;
* a durable log returns an awaitable per append; events wait in a FIFO and are routed strictly
  in append (= cursor) order once committed, whatever order the commits' callbacks run in.
  The publisher's 2xx is sent only after the commit; a publisher that disconnects meanwhile
  does not cancel the commit or the routing (the event is accepted or failed, never half-done).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from typing import Any

from hub.event import Event, make_event
from hub.hub import Hub
from server.eventlog import EventLog
from server.metrics import Histogram, LatencyHistogram

__all__ = ["Ingest"]

logger = logging.getLogger(__name__)


class Ingest:
    """Accepts events: stamped once, kept in the log, then routed."""

    def __init__(self, hub: Hub, log: EventLog) -> None:
        self.hub = hub
        self.log = log
        self.accepted = 0
        #: events the log refused (storage failure); their publishers got an error
        self.failed = 0
        #: seconds from submit to acceptance (the publisher's 2xx): a few integers, no labels
        self.latency = LatencyHistogram()
        #: appended, not yet routed, in cursor order
        self._inflight: collections.deque[tuple[Event, asyncio.Future[None]]] = collections.deque()

    @property
    def synchronous(self) -> bool:
        """True when the log keeps events at once: :meth:`submit_now` may be used."""
        return self.log.synchronous

    def submit_now(self, path: str, body: Mapping[str, Any], *, source: str = "http",  # noqa: ARG002
                   parsed: tuple[tuple[str, ...], bool] | None = None) -> Event:
        """:meth:`submit` without awaiting, for a synchronous log only (the fast lane's path).

        ``parsed``: the path's ``(topics, private)`` when the caller has them already."""
        t0 = time.perf_counter()
        event = make_event(path, body, parsed=parsed)
        if self.log.append(event) is not None:
            raise RuntimeError(f"{self.log!r} is not synchronous: use Ingest.submit")
        self.accepted += 1
        self.hub.publish_event(event)
        self.latency.observe(time.perf_counter() - t0)
        return event

    async def submit(self, path: str, body: Mapping[str, Any], *, source: str = "http") -> Event:
        """Stamp ``body`` as published at ``path``; returns once the event is accepted.

        Raises what the log raises when it cannot keep the event (the event is then not routed).
        """
        t0 = time.perf_counter()
        event = make_event(path, body)
        # stamping and appending happen with no await in between: appends are in cursor order
        pending = self.log.append(event)
        if pending is None:
            self.accepted += 1
            self.hub.publish_event(event)
            self.latency.observe(time.perf_counter() - t0)
            return event
        fut = asyncio.ensure_future(pending)
        self._inflight.append((event, fut))
        fut.add_done_callback(self._route_committed)
        # shielded: a publisher that leaves cannot cancel the commit (the FIFO needs its result)
        await asyncio.shield(fut)
        self.latency.observe(time.perf_counter() - t0)
        logger.debug("accepted %r from %s", event, source)
        return event

    def _route_committed(self, _: asyncio.Future[None]) -> None:
        """Route every committed event at the head of the FIFO, in order."""
        inflight = self._inflight
        while inflight and inflight[0][1].done():
            event, fut = inflight.popleft()
            if fut.cancelled() or fut.exception() is not None:
                self.failed += 1
                continue
            self.accepted += 1
            self.hub.publish_event(event)

    def stats(self) -> dict[str, float | Histogram]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"events_published_total": self.accepted, "publish_failures_total": self.failed,
                "publish_pending": len(self._inflight), "publish_latency_seconds": self.latency.snapshot()}

    async def settle(self) -> None:
        """Wait until every append in flight now is committed or failed (callers bound it)."""
        futs = [f for _, f in self._inflight]
        if futs:
            await asyncio.wait(futs)

    @property
    def pending(self) -> int:
        """Events appended to a durable log and not yet routed."""
        return len(self._inflight)
