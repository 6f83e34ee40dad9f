"""Topic routing: which subscribers get an event, and delivering it with coalesced writes.

Owns the index of topic-set subscriptions and the fan-out. Knows nothing of HTTP: a subscriber
is any :class:`Sink` (the daemon's HTTP stream is one).

Cost model (the point of this module):

* subscribers with an identical (topic spec, wire format) share one :class:`Family`, split by
  ACL into :class:`Group` s (one per distinct ACL);
* each batch of a group is indexed under one *anchor* topic, the least used one when it joined,
  so a publish looks only at groups anchored on the event's own topics: O(matching groups),
  never O(all subscribers);
* a private event finds the groups allowed to see it through a per-family index of ACL
  segments (each filed under one of its topics), so its cost is O(matching segments), not
  O(groups);
* routing only appends the event to each matching group's pending list; one callback per loop
  iteration joins a group's pending records into one ``bytes`` and hands the same object to every
  sink of the group (one socket write per subscriber per iteration, however many events). That
  coalescing is how a Python fan-out keeps up with Redis' rate;
* under load (some family's batch about to be written, or in the previous one, holds more than
  one event) the write waits one more loop iteration (two at most, and only while the batch
  grows), so that the publishes read meanwhile join the batch: fewer, larger socket writes,
  which is where a small fan-out spends its time. An event arriving alone, or events each for
  a different family, are written in the iteration they were routed in.

Publishing never awaits anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from hub.event import Event, Framing
from hub.topics import TopicSpec

__all__ = ["Acl", "Group", "Sink", "TopicRouter", "acl_allows"]

logger = logging.getLogger(__name__)

#: Loop iterations a batch may wait for more events under load. Each wait adds the next round of
#: publishes (8 publisher connections with one request in flight: ~7 events per iteration) to
#: one socket write per subscriber; measured at 100 subscribers: 7 events per write without
#: waiting, ~10.5 waiting one iteration, ~13 waiting up to two. It only waits while the batch
#: grows, so the wait ends as soon as an iteration brings nothing.
MAX_DEFER_TURNS = 2

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

    __slots__ = ("acl", "family", "fmt", "last_write", "sinks", "spec")

    def __init__(self, family: Family, acl: Acl) -> None:
        #: ``time.monotonic()`` of the last write to every sink of the group (a ping, or
        #: private records); public records are written to the whole family and stamp
        #: ``Family.last_write`` instead: the group's silence began at the later of the two.
        #: A sink that joined later was written to (its headers) no earlier than this.
        self.last_write = time.monotonic()
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

    __slots__ = ("_flat", "anchors", "fmt", "groups", "last_write", "pending", "segments", "spec",
                 "visible")

    def __init__(self, spec: TopicSpec, fmt: Framing) -> None:
        self.spec = spec
        self.fmt = fmt
        #: ``time.monotonic()`` of the last write to every sink of every group (public records)
        self.last_write = time.monotonic()
        self.groups: dict[Acl, Group] = {}
        self.pending: list[Event] = []
        #: for each pending private event, its index in ``pending`` and the groups that see it
        self.visible: list[tuple[int, dict[Group, None]]] = []
        self.anchors: list[tuple[str, frozenset[str]]] = []
        #: ACL segment index: anchor topic (the segment's least topic, "" for an empty segment)
        #: -> segment -> the groups whose ACL holds it. A segment that is a subset of an event's
        #: topics has its anchor among them, so only the event's own topics are looked up.
        self.segments: dict[str, dict[frozenset[str], dict[Group, None]]] = {}
        #: every sink of every group (None: to be rebuilt); a join appends to it, so that a
        #: family's first write after its subscribers joined builds nothing
        self._flat: list[Sink] | None = []

    def flat_sinks(self) -> list[Sink]:
        """Every sink of every group, cached until a sink leaves or moves (:meth:`changed`)."""
        flat = self._flat
        if flat is None:
            flat = self._flat = [s for g in self.groups.values() for s in g.sinks]
        return flat

    def changed(self) -> None:
        self._flat = None

    def joined(self, sink: Sink) -> None:
        flat = self._flat
        if flat is not None:
            flat.append(sink)

    def add_group(self, group: Group) -> None:
        self.groups[group.acl] = group
        segments = self.segments
        for seg in group.acl:
            anchor = min(seg) if seg else ""
            segments.setdefault(anchor, {}).setdefault(seg, {})[group] = None

    def remove_group(self, group: Group) -> None:
        if self.groups.get(group.acl) is not group:
            return
        del self.groups[group.acl]
        segments = self.segments
        for seg in group.acl:
            anchor = min(seg) if seg else ""
            by_seg = segments.get(anchor)
            if by_seg is None:
                continue
            holders = by_seg.get(seg)
            if holders is not None:
                holders.pop(group, None)
                if not holders:
                    del by_seg[seg]
                    if not by_seg:
                        del segments[anchor]

    def seeing(self, event: Event) -> dict[Group, None]:
        """The groups of this family allowed to see the private ``event`` (exactly
        :func:`acl_allows` over every group, in O(segments anchored on the event's topics))."""
        segments = self.segments
        out: dict[Group, None] = {}
        if not segments:
            return out
        ts = event.topicset
        by_seg = segments.get("")
        if by_seg:
            for holders in by_seg.values():
                out.update(holders)
        for t in event.topics:
            by_seg = segments.get(t)
            if by_seg:
                for seg, holders in by_seg.items():
                    if seg <= ts:
                        out.update(holders)
        return out

    def may_see(self, event: Event) -> bool:
        """Could any group of this family see this private event?"""
        return bool(self.seeing(event))

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
        #: (event, family) pairs routed since the last flush; whether the last flush joined
        #: several events for some family; iterations the pending batch has waited, and its
        #: size when it last did (see :meth:`_flush_soon`)
        self._batch = 0
        self._coalesced = False
        self._deferred = 0
        self._batch_seen = 0
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
            g = Group(fam, acl)
            fam.add_group(g)
        return g

    def _drop_if_empty(self, group: Group) -> None:
        if group.sinks:
            return
        fam = group.family
        fam.remove_group(group)
        if not fam.groups:
            self._unindex_family(fam)
            self._families.pop((fam.spec, fam.fmt), None)

    def subscribe(self, sink: Sink, spec: TopicSpec, fmt: Framing, acl: Acl = NO_ACL) -> Group:
        """Add ``sink``; returns its group (needed to move or remove it later).

        Records routed before this call are written first: a new subscriber never receives an
        event that was published before it joined.
        """
        self.flush_now()
        g = self._group(spec, fmt, acl)
        if sink not in g.sinks:
            g.family.joined(sink)  # (never during a flush: a sink's send() subscribes nothing)
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
        group.family.changed()
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
        self.flush_now()  # what was routed under the old ACL is delivered under it
        new = self._group(group.spec, group.fmt, acl)
        new.last_write = min(new.last_write, group.last_write)  # the sink's silence goes on
        new.sinks[sink] = None
        del group.sinks[sink]
        group.family.changed()
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

    def _spec_matches(self, event: Event) -> dict[Family, None]:
        ts = event.topicset
        found: dict[Family, None] = dict(self._match_all)
        index = self._index
        for t in event.topics:
            entries = index.get(t)
            if entries:
                for fam, batch in entries:
                    if batch <= ts:
                        found[fam] = None
        return found

    def _private_matches(self, event: Event) -> list[tuple[Family, dict[Group, None]]]:
        out = []
        for f in self._spec_matches(event):
            seeing = f.seeing(event)
            if seeing:
                out.append((f, seeing))
        return out

    def matching_families(self, event: Event) -> list[Family]:
        """Families whose spec matches ``event`` (and, if private, one of whose ACLs allows it)."""
        if event.private:
            return [f for f, _ in self._private_matches(event)]
        return list(self._spec_matches(event))

    def matching_groups(self, event: Event) -> list[Group]:
        """The groups that would receive ``event``."""
        if event.private:
            return [g for _, seeing in self._private_matches(event) for g in seeing]
        return [g for f in self._spec_matches(event) for g in f.groups.values()]

    # -- fan-out -------------------------------------------------------------------------
    def route(self, event: Event) -> int:
        """Queue ``event`` for every matching family; returns their number. Never blocks."""
        dirty = self._dirty
        if event.private:
            matches = self._private_matches(event)
            for f, seeing in matches:
                pending = f.pending
                if not pending:
                    dirty.append(f)
                f.visible.append((len(pending), seeing))
                pending.append(event)
            n = len(matches)
        else:
            # the single-event path: no set of matches is built; a family reached through two
            # of its batches (or a repeated topic) already ends its pending list with the event
            n = 0
            for f in self._match_all:
                pending = f.pending
                if not pending:
                    dirty.append(f)
                pending.append(event)
                n += 1
            ts = event.topicset
            index = self._index
            for t in event.topics:
                entries = index.get(t)
                if entries:
                    for f, batch in entries:
                        if batch <= ts:
                            pending = f.pending
                            if pending:
                                if pending[-1] is event:
                                    continue
                            else:
                                dirty.append(f)
                            pending.append(event)
                            n += 1
        if n:
            self._batch += n
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_soon)
        return n

    def _flush_soon(self) -> None:
        """The loop-iteration callback: flush, or under load let the batch wait for more.

        Publishers with one request in flight each send their next publish only once answered,
        so one iteration reads about one publish per connection. When writes are being joined
        (some family has several events pending, or had in the last flush) the batch waits one
        more iteration, and another while it keeps growing, up to :data:`MAX_DEFER_TURNS`: one
        socket write per subscriber then carries the next rounds of publishes too. Otherwise
        (idle: a lone event after a lone event; or every event for a different family, where
        waiting would join nothing) it is written in the iteration it was routed in."""
        batch = self._batch
        if (self._deferred < MAX_DEFER_TURNS and batch != self._batch_seen
                and (batch > len(self._dirty) or self._coalesced)):
            self._batch_seen = batch
            self._deferred += 1
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_soon)
            return
        self.flush()

    def flush_now(self) -> None:
        """Write everything routed so far now, instead of at the end of the loop iteration."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self.flush()

    def flush(self) -> None:
        """Write every family's pending records: one joined ``bytes``, shared by its sinks."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        self._coalesced = self._batch > len(dirty)
        self._batch = 0
        self._deferred = 0
        self._batch_seen = 0
        sent = 0
        now = time.monotonic()
        for f in dirty:
            events = f.pending
            f.pending = []
            if f.visible:
                visible, f.visible = f.visible, []
                sent += self._flush_private(f, events, visible, now)
                continue
            fmt = f.fmt
            data = events[0].wire(fmt) if len(events) == 1 else b"".join([e.wire(fmt) for e in events])
            # every group of the family gets the same bytes: one loop over the family's sinks
            # (sinks never leave synchronously from send(), and a change makes a new list)
            f.last_write = now
            flat = f.flat_sinks()
            for sink in flat:
                sink.send(data, events)
            sent += len(flat) * len(events)
        self.delivered_batches += len(dirty)
        self.deliveries += sent

    @staticmethod
    def _flush_private(f: Family, events: list[Event],
                       visible: list[tuple[int, dict[Group, None]]], now: float) -> int:
        """Write a batch holding private events: each group gets the public events and the
        private ones its ACL allows; groups seeing the same subset share one joined bytes."""
        fmt = f.fmt
        groups = f.groups
        sent = 0
        n_groups = len(groups)
        if len(visible) == len(events) and all(len(s) == n_groups for _, s in visible):
            # every group sees every event (membership cannot change between route and flush
            # without a flush): one join for the family, as for a public batch
            data = b"".join([e.wire(fmt) for e in events])
            flat = f.flat_sinks()
            f.last_write = now
            for sink in flat:
                sink.send(data, events)
            return len(flat) * len(events)
        public = [i for i, e in enumerate(events) if not e.private]
        seen: dict[Group, list[int]] = {}
        for i, seeing in visible:
            for g in seeing:
                got = seen.get(g)
                if got is None:
                    seen[g] = [i]
                else:
                    got.append(i)
        joined: dict[tuple[int, ...], tuple[bytes, Sequence[Event]]] = {}
        for g, priv in seen.items():
            key = tuple(sorted(public + priv)) if public else tuple(priv)
            hit = joined.get(key)
            if hit is None:
                evs = events if len(key) == len(events) else [events[i] for i in key]
                hit = joined[key] = (b"".join([e.wire(fmt) for e in evs]), evs)
            sent += _send(g, hit[0], hit[1], now) * len(hit[1])
        if public:
            evs = [events[i] for i in public]
            data = b"".join([e.wire(fmt) for e in evs])
            for g in list(groups.values()):
                if g not in seen:
                    sent += _send(g, data, evs, now) * len(evs)
        return sent

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"subscriptions": len(self._families),
                "delivery_batches_total": self.delivered_batches,
                "deliveries_total": self.deliveries}

    def broadcast_ping(self, make: Callable[[Framing], bytes], idle_since: float | None = None,
                       now: float | None = None) -> int:
        """Send a keep-alive record (bytes built once per format) to every sink, or with
        ``idle_since`` (a ``time.monotonic()`` value) only to the groups not written to after it.
        Returns how many sinks were pinged."""
        if now is None:
            now = time.monotonic()
        cache: dict[Framing, bytes] = {}
        pinged = 0
        for g in self.groups():
            if idle_since is not None and (g.last_write > idle_since
                                           or g.family.last_write > idle_since):
                continue
            data = cache.get(g.fmt)
            if data is None:
                data = cache[g.fmt] = make(g.fmt)
            g.last_write = now
            for sink in list(g.sinks):
                sink.send(data, None)
                pinged += 1
        return pinged

    def ping_idle(self, make: Callable[[Framing], bytes], interval: float, step: float) -> int:
        """One tick of a pinger that runs every ``step`` seconds: ping the streams that would
        otherwise have been silent for ``interval`` before the next tick. A stream written to
        within the interval is not pinged, and an idle one is pinged less than ``interval``
        after its last write; pings spread over the interval as the writes did."""
        now = time.monotonic()
        return self.broadcast_ping(make, idle_since=now - interval + step, now=now)


def _send(group: Group, data: bytes, events: Sequence[Event], now: float) -> int:
    """Write to every sink of ``group``; returns how many sinks were written to."""
    # sinks never leave a group synchronously from send(): safe to iterate the dict
    group.last_write = now
    sinks = group.sinks
    for sink in sinks:
        sink.send(data, events)
    return len(sinks)
