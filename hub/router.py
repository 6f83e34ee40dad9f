"""Topic routing: which subscribers get an event, and delivering it with coalesced writes.

Owns the index of topic-set subscriptions and the fan-out. Knows nothing of HTTP: a subscriber
is any :class:`Sink` (the daemon's HTTP stream is one).

Cost model (the point of this module):

* subscribers with an identical (topic spec, wire format) share one :class:`Family`, split by
  ACL into :class:`Group` s (one per distinct ACL);
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

from hub.event import Event, Framing
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
    """Sinks sharing one (spec, format, ACL). A stream keeps its group to leave or move."""

    __slots__ = ("acl", "family", "fmt", "sinks", "spec")

    def __init__(self, family: Family, acl: Acl) -> None:
        self.family = family
        self.spec = family.spec
        self.fmt = family.fmt
        self.acl = acl
        self.sinks: dict[Sink, None] = {}  # insertion-ordered set

    def __repr__(self) -> str:
        return f"<Group {self.spec} {self.fmt.name} acl={len(self.acl)} sinks={len(self.sinks)}>"


class Family:
    """The groups of one (spec, format): the unit of indexing and of coalesced writes.

    Public events are joined once per family and the same bytes go to every group; only when a
    private event is pending does each group get its own ACL-filtered join.
    """

    __slots__ = ("anchors", "fmt", "groups", "has_private", "pending", "spec")

    def __init__(self, spec: TopicSpec, fmt: Framing) -> None:
        self.spec = spec
        self.fmt = fmt
        self.groups: dict[Acl, Group] = {}
        self.pending: list[Event] = []
        self.has_private = False
        self.anchors: list[tuple[str, frozenset[str]]] = []

    def may_see(self, event: Event) -> bool:
        """Could any group of this family see this private event?"""
        return any(acl and acl_allows(acl, event) for acl in self.groups)

    def __repr__(self) -> str:
        return f"<Family {self.spec} {self.fmt.name} groups={len(self.groups)}>"


FamilyKey = tuple[TopicSpec, Framing]
#: Called after a subscription joins (True) or leaves (False), with the spec's count after it.
ChangeListener = Callable[[TopicSpec, int, bool], None]


class TopicRouter:
    """The index of topic-set subscriptions and the coalescing fan-out."""

    def __init__(self) -> None:
        self._families: dict[FamilyKey, Family] = {}
        self._index: dict[str, dict[tuple[Family, frozenset[str]], None]] = {}
        self._match_all: dict[Family, None] = {}
        self._spec_counts: dict[TopicSpec, int] = {}
        self._dirty: list[Family] = []
        self._flush_handle: asyncio.Handle | None = None
        self._listeners: list[ChangeListener] = []
        self.subscriber_count = 0
        #: family batches written (one joined write each) and events written to subscribers
        self.delivered_batches = 0
        self.deliveries = 0

    # -- membership ----------------------------------------------------------------------
    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    def _group(self, spec: TopicSpec, fmt: Framing, acl: Acl) -> Group:
        fam = self._families.get((spec, fmt))
        if fam is None:
            fam = self._families[(spec, fmt)] = Family(spec, fmt)
            self._index_family(fam)
        g = fam.groups.get(acl)
        if g is None:
            g = fam.groups[acl] = Group(fam, acl)
        return g

    def _drop_if_empty(self, group: Group) -> None:
        if group.sinks:
            return
        fam = group.family
        if fam.groups.get(group.acl) is group:
            del fam.groups[group.acl]
        if not fam.groups:
            self._unindex_family(fam)
            self._families.pop((fam.spec, fam.fmt), None)

    def subscribe(self, sink: Sink, spec: TopicSpec, fmt: Framing, acl: Acl = NO_ACL) -> Group:
        """Add ``sink``; returns its group (needed to move or remove it later).

        Records routed before this call are written first: a new subscriber never receives an
        event that was published before it joined.
        """
        self._flush_now()
        g = self._group(spec, fmt, acl)
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
        self._drop_if_empty(group)
        self._notify(spec, n, False)

    def move(self, sink: Sink, group: Group, acl: Acl) -> Group:
        """Re-authorise ``sink`` under a new ACL without dropping it (ACL reload)."""
        if acl == group.acl or sink not in group.sinks:
            return group
        self._flush_now()  # what was routed under the old ACL is delivered under it
        new = self._group(group.spec, group.fmt, acl)
        new.sinks[sink] = None
        del group.sinks[sink]
        self._drop_if_empty(group)
        return new

    def _notify(self, spec: TopicSpec, n: int, joined: bool) -> None:
        for cb in self._listeners:
            try:
                cb(spec, n, joined)
            except Exception:  # a listener's bug must not break subscribing
                logger.exception("subscription listener %r failed", cb)

    def _index_family(self, fam: Family) -> None:
        for batch in fam.spec.batches:
            if not batch:
                self._match_all[fam] = None
                continue
            # anchor on the topic with the fewest entries now: keeps candidate lists short
            anchor = min(sorted(batch), key=lambda t: len(self._index.get(t, ())))
            self._index.setdefault(anchor, {})[(fam, batch)] = None
            fam.anchors.append((anchor, batch))

    def _unindex_family(self, fam: Family) -> None:
        self._match_all.pop(fam, None)
        for anchor, batch in fam.anchors:
            entries = self._index.get(anchor)
            if entries is not None:
                entries.pop((fam, batch), None)
                if not entries:
                    del self._index[anchor]
        fam.anchors.clear()

    # -- introspection -------------------------------------------------------------------
    def groups(self) -> Iterator[Group]:
        return iter([g for f in list(self._families.values()) for g in f.groups.values()])

    def spec_counts(self) -> dict[TopicSpec, int]:
        return dict(self._spec_counts)

    def matching_families(self, event: Event) -> list[Family]:
        """Families whose spec matches ``event`` (and, if private, one of whose ACLs allows it)."""
        ts = event.topicset
        found: dict[Family, None] = dict(self._match_all)
        index = self._index
        for t in event.topics:
            entries = index.get(t)
            if entries:
                for fam, batch in entries:
                    if batch <= ts:
                        found[fam] = None
        if event.private:
            return [f for f in found if f.may_see(event)]
        return list(found)

    def matching_groups(self, event: Event) -> list[Group]:
        """The groups that would receive ``event``."""
        out = []
        for fam in self.matching_families(event):
            for g in fam.groups.values():
                if not event.private or (g.acl and acl_allows(g.acl, event)):
                    out.append(g)
        return out

    # -- fan-out -------------------------------------------------------------------------
    def route(self, event: Event) -> int:
        """Queue ``event`` for every matching family; returns their number. Never blocks."""
        fams = self.matching_families(event)
        dirty = self._dirty
        private = event.private
        for f in fams:
            if not f.pending:
                dirty.append(f)
            f.pending.append(event)
            if private:
                f.has_private = True
        if dirty and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
        return len(fams)

    def _flush_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self.flush()

    def flush(self) -> None:
        """Write every family's pending records: one joined ``bytes``, shared by its sinks."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        sent = 0
        for f in dirty:
            events, f.pending = f.pending, []
            fmt = f.fmt
            if f.has_private:
                f.has_private = False
                # groups that may see the same subset share one joined bytes object
                joined: dict[tuple[int, ...], tuple[bytes, Sequence[Event]]] = {}
                for g in list(f.groups.values()):
                    acl = g.acl
                    seen = tuple(i for i, e in enumerate(events)
                                 if not e.private or (acl and acl_allows(acl, e)))
                    if not seen:
                        continue
                    hit = joined.get(seen)
                    if hit is None:
                        evs = events if len(seen) == len(events) else [events[i] for i in seen]
                        hit = joined[seen] = (b"".join([e.wire(fmt) for e in evs]), evs)
                    sent += _send(g, *hit) * len(hit[1])
            else:
                data = events[0].wire(fmt) if len(events) == 1 else b"".join([e.wire(fmt) for e in events])
                for g in list(f.groups.values()):
                    sent += _send(g, data, events) * len(events)
            self.delivered_batches += 1
        self.deliveries += sent

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"subscriptions": len(self._families),
                "delivery_batches_total": self.delivered_batches,
                "deliveries_total": self.deliveries}

    def broadcast_ping(self, make: Callable[[Framing], bytes]) -> None:
        """Send a keep-alive record to every sink (bytes built once per format)."""
        cache: dict[Framing, bytes] = {}
        for g in self.groups():
            data = cache.get(g.fmt)
            if data is None:
                data = cache[g.fmt] = make(g.fmt)
            for sink in list(g.sinks):
                sink.send(data, None)


def _send(group: Group, data: bytes, events: Sequence[Event]) -> int:
    """Write to every sink of ``group``; returns how many sinks were written to."""
    # sinks never leave a group synchronously from send(): safe to iterate the dict
    sinks = group.sinks
    for sink in sinks:
        sink.send(data, events)
    return len(sinks)
