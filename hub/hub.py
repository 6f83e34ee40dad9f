"""The Hub: the one routing engine shared by the daemon's HTTP streams and in-process users.

Owns the subscription registries (topic sets for streams, see :mod:`hub.router`) and the
entry point for publishing an :class:`~hub.event.Event`. No HTTP, no YAML, no storage.
"""

from __future__ import annotations

import logging

from hub.event import Event
from hub.router import TopicRouter

__all__ = ["Hub"]

logger = logging.getLogger(__name__)


class Hub:
    """Routes events to subscribers. ``publish_event`` never awaits a subscriber."""

    def __init__(self) -> None:
        self.topics = TopicRouter()

    def publish_event(self, event: Event) -> int:
        """Deliver a stamped event to every matching topic-set subscription."""
        return self.topics.route(event)

    @property
    def subscriber_count(self) -> int:
        return self.topics.subscriber_count
