"""Topic routing: which subscribers get an event, and delivering it with coalesced writes.

Owns the index of topic-set subscriptions and the fan-out. Knows nothing of HTTP: a subscriber
is any :class:`Sink` (the daemon's HTTP stream is one).

Cost model (the point of this module):

* subscribers with an identical (topic spec, wire format, ACL) share one :class:`Group`;
* each batch of a group is indexed under one *anchor* topic, the least used one when it joined,
  so a publish looks only at groups anchored on the event's own topics: O(matching groups),
  never O(all subscribers);
* routing only appends the event to each matching group's pending list; one callback per loop
  iteration joins a group's pending records into one ``bytes`` and hands the same object to every
  sink of the group (one socket write per subscriber per iteration, however many events). That
  coalescing is how a Python fan-out keeps up with Redis' rate.

Publishing never awaits anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from hub.event import Event, WireFormat
from hub.topics import TopicSpec

__all__ = ["Acl", "Group", "Sink", "TopicRouter", "acl_allows"]

logger = logging.getLogger(__name__)

#: ACL of a subscriber: the segments (each a set of topics) it may see private events under;
#: an empty frozenset means "no private events".
Acl = frozenset[frozenset[str]]
NO_ACL: Acl = frozenset()


def acl_allows(acl: Acl, event: Event) -> bool:
    """A private event is visible under a segment whose topics are all among the event's."""
    ts = event.topicset
    return any(seg <= ts for seg in acl)


class Sink(Protocol):
    """A subscriber connection as the router sees it."""

    def send(self, data: bytes, events: Sequence[Event] | None) -> None:
        """Write ``data`` (framed records, or a ping when ``events`` is None). Never blocks."""


class Group:
    """Sinks sharing one (spec, format, ACL): the unit of routing and of coalesced writes."""

    __slots__ = ("acl", "anchors", "fmt", "pending", "sinks", "spec")

    def __init__(self, spec: TopicSpec, fmt: WireFormat, acl: Acl) -> None:
        self.spec = spec
        self.fmt = fmt
        self.acl = acl
        self.sinks: dict[Sink, None] = {}  # insertion-ordered set
        self.pending: list[Event] = []
        self.anchors: list[tuple[str, frozenset[str]]] = []

    def __repr__(self) -> str:
        return f"<Group {self.spec} {self.fmt.value} acl={len(self.acl)} sinks={len(self.sinks)}>"


GroupKey = tuple[TopicSpec, WireFormat, Acl]
#: Called after a subscription joins (True) or leaves (False), with the spec's count after it.
ChangeListener = Callable[[TopicSpec, int, bool], None]


class TopicRouter:
    """The index of topic-set subscriptions and the coalescing fan-out."""

    def __init__(self) -> None:
        self._groups: dict[GroupKey, Group] = {}
        self._index: dict[str, dict[tuple[Group, frozenset[str]], None]] = {}
        self._match_all: dict[Group, None] = {}
        self._spec_counts: dict[TopicSpec, int] = {}
        self._dirty: list[Group] = []
        self._flush_handle: asyncio.Handle | None = None
        self._listeners: list[ChangeListener] = []
        self.subscriber_count = 0
        self.delivered_batches = 0

    # -- membership ----------------------------------------------------------------------
    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    def subscribe(self, sink: Sink, spec: TopicSpec, fmt: WireFormat, acl: Acl = NO_ACL) -> Group:
        """Add ``sink``; returns its group (needed to move or remove it later)."""
        key = (spec, fmt, acl)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = Group(spec, fmt, acl)
            self._index_group(g)
        g.sinks[sink] = None
        self.subscriber_count += 1
        n = self._spec_counts[spec] = self._spec_counts.get(spec, 0) + 1
        self._notify(spec, n, True)
        return g

    def unsubscribe(self, sink: Sink, group: Group) -> None:
        """Remove ``sink`` from ``group``; idempotent."""
        if sink not in group.sinks:
            return
        del group.sinks[sink]
        self.subscriber_count -= 1
        spec = group.spec
        n = self._spec_counts[spec] - 1
        if n:
            self._spec_counts[spec] = n
        else:
            del self._spec_counts[spec]
        if not group.sinks:
            self._unindex_group(group)
            del self._groups[(group.spec, group.fmt, group.acl)]
        self._notify(spec, n, False)

    def move(self, sink: Sink, group: Group, acl: Acl) -> Group:
        """Re-authorise ``sink`` under a new ACL without dropping it (ACL reload)."""
        if acl == group.acl:
            return group
        key = (group.spec, group.fmt, acl)
        new = self._groups.get(key)
        if new is None:
            new = self._groups[key] = Group(group.spec, group.fmt, acl)
            self._index_group(new)
        new.sinks[sink] = None
        group.sinks.pop(sink, None)
        if not group.sinks:
            self._unindex_group(group)
            del self._groups[(group.spec, group.fmt, group.acl)]
        return new

    def _notify(self, spec: TopicSpec, n: int, joined: bool) -> None:
        for cb in self._listeners:
            try:
                cb(spec, n, joined)
            except Exception:  # a listener's bug must not break subscribing
                logger.exception("subscription listener %r failed", cb)

    def _index_group(self, g: Group) -> None:
        for batch in g.spec.batches:
            if not batch:
                self._match_all[g] = None
                continue
            # anchor on the topic with the fewest entries now: keeps candidate lists short
            anchor = min(sorted(batch), key=lambda t: len(self._index.get(t, ())))
            self._index.setdefault(anchor, {})[(g, batch)] = None
            g.anchors.append((anchor, batch))

    def _unindex_group(self, g: Group) -> None:
        self._match_all.pop(g, None)
        for anchor, batch in g.anchors:
            entries = self._index.get(anchor)
            if entries is not None:
                entries.pop((g, batch), None)
                if not entries:
                    del self._index[anchor]
        g.anchors.clear()

    # -- introspection -------------------------------------------------------------------
    def groups(self) -> Iterator[Group]:
        return iter(list(self._groups.values()))

    def spec_counts(self) -> dict[TopicSpec, int]:
        return dict(self._spec_counts)

    def matching_groups(self, event: Event) -> list[Group]:
        """Groups whose spec matches ``event`` and whose ACL lets them see it."""
        ts = event.topicset
        found: dict[Group, None] = dict(self._match_all)
        index = self._index
        for t in event.topics:
            entries = index.get(t)
            if entries:
                for g, batch in entries:
                    if batch <= ts:
                        found[g] = None
        if event.private:
            return [g for g in found if g.acl and acl_allows(g.acl, event)]
        return list(found)

    # -- fan-out -------------------------------------------------------------------------
    def route(self, event: Event) -> int:
        """Queue ``event`` for every matching group; returns the number of groups. Never blocks."""
        groups = self.matching_groups(event)
        dirty = self._dirty
        for g in groups:
            if not g.pending:
                dirty.append(g)
            g.pending.append(event)
        if dirty and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
        return len(groups)

    def flush(self) -> None:
        """Write every group's pending records: one joined ``bytes`` per group, shared."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for g in dirty:
            events, g.pending = g.pending, []
            fmt = g.fmt
            data = events[0].wire(fmt) if len(events) == 1 else b"".join([e.wire(fmt) for e in events])
            # sinks never leave the group synchronously from send(): safe to iterate the dict
            for sink in g.sinks:
                sink.send(data, events)
            self.delivered_batches += 1

    def broadcast_ping(self, make: Callable[[WireFormat], bytes]) -> None:
        """Send a keep-alive record to every sink (bytes built once per format)."""
        cache: dict[WireFormat, bytes] = {}
        for g in list(self._groups.values()):
            data = cache.get(g.fmt)
            if data is None:
                data = cache[g.fmt] = make(g.fmt)
            for sink in list(g.sinks):
                sink.send(data, None)
