"""Replay: sending a new subscriber the retained events it asks for, then going live, gap-free.

Owns the replay request headers (``X-Fetch-Since``, ``X-Fetch-Since-Cursor``), the response
headers that report on them, the replay bound, and writing the replayed events with the same
topic and private-event rules as live delivery. Knows nothing of storage (it asks the
:class:`~server.eventlog.EventLog`) nor of aiohttp (it reads a header mapping).

Gap-free join (see ``server.app.stream_response``): the request is planned before the response
headers are sent (:meth:`Replayer.plan` locates the cursor, so the response can say whether it
was found); then the stream is registered with the hub *holding* live events; then the log is
read (the snapshot: a prefix of the log in cursor order), written, and the held live events not
already replayed are flushed (:meth:`server.stream.Stream.release`). No gap, no duplicate, no
reordering.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from hub.event import Event
from hub.router import NO_ACL, acl_allows
from server.errors import BadRequest
from server.eventlog import EventLog, Located
from server.stream import Stream

__all__ = [
    "CURSOR_FOUND_HEADER",
    "CURSOR_HEADER",
    "SINCE_HEADER",
    "TRUNCATED_HEADER",
    "PreparedReplay",
    "ReplayHook",
    "Replayer",
]

logger = logging.getLogger(__name__)

#: request: replay retained events with a timestamp greater than this epoch (int or float)
SINCE_HEADER = "X-Fetch-Since"
#: request: replay retained events after this cursor (asfpy sends its last ``pubsub_cursor``)
CURSOR_HEADER = "X-Fetch-Since-Cursor"
#: response to a cursor request: ``true`` (replaying after it) or ``false`` (unknown or evicted:
#: no replay, the stream continues live, which is what asfpy expects)
CURSOR_FOUND_HEADER = "X-Fetch-Since-Cursor-Found"
#: response: ``true`` when more events than ``max_replay`` were asked for: only the newest
#: ``max_replay`` are sent (the replay always joins the live stream without a gap)
TRUNCATED_HEADER = "X-Fetch-Since-Truncated"
#: Replayed events are written in slices of this many, pausing while the connection has writing
#: paused (its transport's buffer past the high-water mark, until it resumes below the low-water
#: mark): a big replay never holds more than a slice beyond that mark.
REPLAY_SLICE = 1024
#: ... and of at most this fraction of the stream's buffer limit in bytes.
REPLAY_SLICE_FRACTION = 4
#: A cursor longer than this cannot be ours (ours are 36 characters): not looked up.
MAX_CURSOR_LENGTH = 128
#: When the plan found no truncation, events published between the plan and the snapshot
#: are still replayed, up to this multiple of max_replay (a hard bound on any replay).
SNAPSHOT_SLACK = 2


@dataclass(slots=True)
class ReplayStats:
    requests: int = 0
    cursors_unknown: int = 0
    truncated: int = 0
    events: int = 0

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"replay_requests_total": self.requests, "replay_truncated_total": self.truncated,
                "replay_unknown_cursors_total": self.cursors_unknown,
                "replay_events_total": self.events}


@dataclass(slots=True)
class PreparedReplay:
    """A planned replay: response headers to send, then :meth:`run` once the stream is held."""

    log: EventLog
    stats: ReplayStats
    headers: dict[str, str] = field(default_factory=dict)
    #: where the replay starts; None: nothing to replay (unknown cursor)
    located: Located | None = None
    since: float | None = None
    limit: int = 0

    @property
    def needed(self) -> bool:
        """Must the stream hold live events and run the replay?"""
        return self.located is not None

    async def run(self, stream: Stream) -> int:
        """Write the replay into ``stream`` (registered and holding). Returns events written."""
        if self.located is None:
            return 0
        events = await self.log.read(self.located.position, self.limit)
        spec = stream.spec
        acl = stream.group.acl if stream.group is not None else NO_ACL
        since = self.since
        out: list[Event] = [
            e for e in events
            if (since is None or e.timestamp > since) and spec.matches(e.topicset)
            and (not e.private or (acl and acl_allows(acl, e)))
        ]
        # slices bounded in count and bytes: written on top of at most the transport's
        # high-water mark (far below the stream's limit), a slice never overflows it by itself
        max_bytes = max(stream.limit // REPLAY_SLICE_FRACTION, 1)
        i, n = 0, len(out)
        while i < n:
            if stream.ended is not None or stream.transport is None:
                break
            j, size = i, 0
            while j < n and j - i < REPLAY_SLICE and (j == i or size < max_bytes):
                size += len(out[j].json)
                j += 1
            stream.write_direct(out[i:j])
            i = j
            await stream.drain()
        if events:
            # held live events are de-duplicated by log position against the snapshot's end,
            # whatever the filters above kept of it (a cursor is opaque and need not sort)
            stream.covered(events[-1].position)
        self.stats.events += len(out)
        logger.debug("replayed %d of %d event(s) to %r; %d live event(s) held meanwhile",
                     len(out), len(events), stream, len(stream.held or ()))
        return len(out)


#: The hook ``server.app`` calls with the request headers before answering a subscriber.
ReplayHook = Callable[[Mapping[str, str]], Awaitable[PreparedReplay | None]]


class Replayer:
    """Plans replays from request headers against ``log``; bounded by ``max_replay`` (0: none)."""

    def __init__(self, log: EventLog, max_replay: int) -> None:
        self.log = log
        self.max_replay = max_replay
        self.stats = ReplayStats()

    async def plan(self, headers: Mapping[str, str]) -> PreparedReplay | None:
        """None when no replay is asked; BadRequest on a malformed ``X-Fetch-Since``."""
        cursor = (headers.get(CURSOR_HEADER) or "").strip()
        since_raw = (headers.get(SINCE_HEADER) or "").strip()
        if not cursor and not since_raw:
            return None
        self.stats.requests += 1
        prep = PreparedReplay(self.log, self.stats)
        if cursor:  # the more precise of the two wins when both are sent
            located = None
            if len(cursor) <= MAX_CURSOR_LENGTH:
                located = await self.log.locate(cursor=cursor)
            prep.headers[CURSOR_FOUND_HEADER] = "true" if located is not None else "false"
            if located is None:
                self.stats.cursors_unknown += 1
                logger.debug("replay: cursor %.64r unknown or evicted: continuing live", cursor)
                return prep
        else:
            try:
                since = float(since_raw)
            except ValueError:
                raise BadRequest(f"{SINCE_HEADER} must be an epoch time in seconds, "
                                 f"got {since_raw[:64]!r}") from None
            if not math.isfinite(since):
                raise BadRequest(f"{SINCE_HEADER} must be a finite epoch time")
            located = await self.log.locate(since=since)
            prep.since = since
        if located is None:  # a backend may not place a time; nothing to replay
            return prep
        prep.located = located
        cap = self.max_replay
        if cap and located.pending > cap:
            prep.headers[TRUNCATED_HEADER] = "true"
            prep.limit = cap
            self.stats.truncated += 1
            logger.info("replay truncated: %d event(s) asked, the newest %d sent (max_replay)",
                        located.pending, cap)
        else:
            prep.limit = cap * SNAPSHOT_SLACK
        return prep

    __call__ = plan
