"""The one publish path: every event (HTTP PUT/POST, SQS, cluster) enters through here.

Owns the order stamp → append to the log → route to the hub. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from hub.event import Event, make_event
from hub.hub import Hub
from server.eventlog import EventLog

__all__ = ["Ingest"]

logger = logging.getLogger(__name__)


class Ingest:
    """Accepts events: stamped once, kept in the log, then routed."""

    def __init__(self, hub: Hub, log: EventLog) -> None:
        self.hub = hub
        self.log = log
        self.accepted = 0

    async def submit(self, path: str, body: Mapping[str, Any], *, source: str = "http") -> Event:
        """Stamp ``body`` as published at ``path``; returns once the event is accepted.

        The append is shielded: a publisher that disconnects mid-request cannot leave an
        event half-accepted (in the log but never routed).
        """
        event = make_event(path, body)
        await asyncio.shield(self._accept(event))
        logger.debug("accepted %r from %s", event, source)
        return event

    async def _accept(self, event: Event) -> None:
        await self.log.append(event)
        self.accepted += 1
        self.hub.publish_event(event)
