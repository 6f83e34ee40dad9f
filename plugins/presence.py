"""Presence over HTTP: join/leave events of stream subscriptions, as a private stream for admins.

Owns turning the topic router's membership changes into private events published at
:data:`PRESENCE_PATH` (topics ``pubsub``, ``presence``). They go straight to the hub, never into
the event log (presence is live state, not history), so only a stream whose ACL grants the
segment ``[pubsub, presence]`` (or an empty segment: every private event) receives them, under
the router's ordinary private-event rule. In-process key subscribers see them under
``Key('private', 'pubsub', 'presence')``.

What an event says: the subscription's topic spec (text and parsed), joined or left, how many
streams now hold that spec, and how many streams there are in all. Never a user name, a
credential, a peer address, a wire format or an ACL: the router's listener is given none of these,
so this module cannot leak them.

Knows nothing of HTTP requests or configuration; :func:`lifecycle` is installed by ``wiring``
(always: a join costs one small event, delivered to nobody unless an admin follows).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from hub.event import Event, make_event
from hub.hub import Hub
from hub.topics import TopicSpec
from server.context import PluginContext

__all__ = ["PRESENCE_PATH", "PresenceReporter", "lifecycle", "presence_event"]

logger = logging.getLogger(__name__)

#: where presence events are published; subscribe with ``GET /pubsub/presence`` and credentials
#: whose ACL has a segment ``[pubsub, presence]``
PRESENCE_PATH = "/private/pubsub/presence"
JOINED = "joined"
LEFT = "left"


def presence_event(spec: TopicSpec, count: int, joined: bool, total: int) -> Event:
    """The private event announcing that a stream with ``spec`` joined or left."""
    body: dict[str, Any] = {"presence": {
        "event": JOINED if joined else LEFT,
        "subscription": str(spec),
        "topics": [sorted(b) for b in spec.batches],
        "count": count,
        "total": total,
    }}
    return make_event(PRESENCE_PATH, body)


class PresenceReporter:
    """The router listener: one presence event per join and per leave, published live."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.published = 0

    def __call__(self, spec: TopicSpec, count: int, joined: bool) -> None:
        event = presence_event(spec, count, joined, self.hub.subscriber_count)
        self.hub.publish_event(event)
        self.published += 1

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"presence_events_total": self.published}

    def start(self) -> None:
        self.hub.topics.add_listener(self)

    def stop(self) -> None:
        self.hub.topics.remove_listener(self)


@contextlib.asynccontextmanager
async def lifecycle(ctx: PluginContext) -> AsyncIterator[None]:
    """Report presence for the daemon's hub while the context is open (startup to cleanup)."""
    reporter = PresenceReporter(ctx.hub)
    reporter.start()
    ctx.metrics.register(reporter)
    ctx.report("presence", lambda: {"path": PRESENCE_PATH, "events": reporter.published})
    logger.debug("presence events at %s", PRESENCE_PATH)
    try:
        yield
    finally:
        reporter.stop()
