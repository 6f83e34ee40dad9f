"""Unit tests of the routing index and the coalescing fan-out (sinks are plain recorders)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from hub.event import Event, make_event
from hub.router import TopicRouter
from hub.topics import TopicSpec, parse_subscription
from server.formats import NDJSON, SSE, WEBSOCKET


async def turns(n: int) -> None:
    """Let the event loop run ``n`` iterations."""
    for _ in range(n):
        await asyncio.sleep(0)


class Recorder:
    """A Sink that keeps what it is sent."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.events: list[Event] = []

    def send(self, data: bytes, events: Sequence[Event] | None) -> None:
        self.data.append(data)
        if events is not None:
            self.events.extend(events)


def test_index_agrees_with_a_naive_scan() -> None:
    rnd = random.Random(7)
    words = [f"t{i}" for i in range(12)]
    router = TopicRouter()
    subs: list[tuple[Recorder, TopicSpec]] = []
    for _ in range(300):
        batches = [rnd.sample(words, rnd.randint(0, 3)) for _ in range(rnd.randint(1, 3))]
        spec = TopicSpec.of(batches)
        r = Recorder()
        router.subscribe(r, spec, NDJSON)
        subs.append((r, spec))
    for _ in range(500):
        ev = make_event("/" + "/".join(rnd.sample(words, rnd.randint(0, 5))), {})
        got = {id(s) for g in router.matching_groups(ev) for s in g.sinks}
        want = {id(r) for r, spec in subs if spec.matches(ev.topicset)}
        assert got == want


async def test_coalesced_and_shared_bytes() -> None:
    router = TopicRouter()
    a, b, c = Recorder(), Recorder(), Recorder()
    spec = parse_subscription("/x")
    router.subscribe(a, spec, NDJSON)
    router.subscribe(b, parse_subscription("/x"), NDJSON)
    router.subscribe(c, parse_subscription("/y"), NDJSON)
    assert len(list(router.groups())) == 2  # identical specs share a group
    e1, e2 = make_event("/x", {"n": 1}), make_event("/x/y", {"n": 2})
    router.route(e1)
    router.route(e2)
    assert a.data == []  # nothing written until the loop turns
    await turns(2)  # two events in one iteration: the batch waits one more (see below)
    assert len(a.data) == 1 and a.data[0] is b.data[0]  # one write, the same bytes object
    assert a.data[0] == e1.wire(NDJSON) + e2.wire(NDJSON)
    assert [e.cursor for e in c.events] == [e2.cursor]


async def test_flush_waits_for_more_under_load_only() -> None:
    """A lone event is written in the iteration it was routed in; a batch of several waits one
    more iteration, another while it grows (two at most), and takes what is routed meanwhile;
    idle again, writes are immediate."""
    from hub.router import MAX_DEFER_TURNS
    assert MAX_DEFER_TURNS == 2
    router = TopicRouter()
    r = Recorder()
    router.subscribe(r, parse_subscription("/x"), NDJSON)
    ev = [make_event("/x", {"n": i}) for i in range(8)]
    router.route(ev[0])
    await turns(1)
    assert r.data == [ev[0].wire(NDJSON)]  # idle: at once
    router.route(ev[1])
    router.route(ev[2])
    await turns(1)
    assert len(r.data) == 1  # under load: one more iteration...
    router.route(ev[3])
    await turns(1)
    assert len(r.data) == 1  # ...and another, as it grew...
    router.route(ev[4])
    await turns(1)
    assert r.data[1:] == [b"".join(e.wire(NDJSON) for e in ev[1:5])]  # ...no more: all joined
    router.route(ev[5])  # alone, but the last batch carried four: it waits one iteration
    await turns(1)
    assert len(r.data) == 2
    await turns(1)  # it did not grow: written
    assert r.data[2:] == [ev[5].wire(NDJSON)]
    router.route(ev[6])  # idle again
    await turns(1)
    assert r.data[3:] == [ev[6].wire(NDJSON)]
    router.route(ev[7])
    router.subscribe(Recorder(), parse_subscription("/y"), NDJSON)  # a join writes what is due
    assert r.data[4:] == [ev[7].wire(NDJSON)]
    assert router.stats()["deliveries_total"] == 8


async def test_events_for_different_families_do_not_wait() -> None:
    """Selective routing (every event for another subscriber) joins nothing by waiting: each
    batch is written in the iteration it was routed in."""
    router = TopicRouter()
    sinks = [Recorder() for _ in range(4)]
    for i, r in enumerate(sinks):
        router.subscribe(r, parse_subscription(f"/git/repo{i}"), NDJSON)
    for rnd in range(3):
        evs = [make_event(f"/git/repo{i}", {"round": rnd}) for i in range(4)]
        for e in evs:
            router.route(e)
        await turns(1)
        assert [r.events[-1] for r in sinks] == evs
    router.route(make_event("/git/repo0", {}))
    router.route(make_event("/git/repo0", {}))  # now a family has two: wait for more
    await turns(1)
    assert len(sinks[0].data) == 3
    await turns(1)
    assert len(sinks[0].data) == 4 and len(sinks[0].events) == 5


async def test_an_event_reaches_a_family_once() -> None:
    """A spec matched through two of its batches, a repeated topic, a match-all spec: one
    delivery each."""
    router = TopicRouter()
    either, twice, everything = Recorder(), Recorder(), Recorder()
    router.subscribe(either, TopicSpec.of([["a"], ["b"]]), NDJSON)
    router.subscribe(twice, parse_subscription("/a"), NDJSON)
    router.subscribe(everything, parse_subscription("/"), NDJSON)
    e1, e2 = make_event("/a/b", {}), make_event("/a/a", {})
    assert router.route(e1) == 3
    assert router.route(e2) == 3
    router.flush_now()
    for r in (either, twice, everything):
        assert r.events == [e1, e2]
        assert r.data == [e1.wire(NDJSON) + e2.wire(NDJSON)]


async def test_joins_between_writes_get_the_next_batch_once() -> None:
    """The family's cached sink list follows joins (and a repeated join adds no second copy)."""
    router = TopicRouter()
    spec = parse_subscription("/x")
    a, b = Recorder(), Recorder()
    router.subscribe(a, spec, NDJSON)
    e1, e2 = make_event("/x", {"n": 1}), make_event("/x", {"n": 2})
    router.route(e1)
    router.flush_now()
    router.subscribe(b, spec, NDJSON, frozenset({frozenset({"x"})}))  # another group, same family
    router.subscribe(a, spec, NDJSON)
    router.route(e2)
    router.flush_now()
    assert a.events == [e1, e2] and b.events == [e2]


async def test_private_events_need_an_acl_segment() -> None:
    router = TopicRouter()
    anon, ok, partial = Recorder(), Recorder(), Recorder()
    spec = parse_subscription("/")
    router.subscribe(anon, spec, NDJSON)
    router.subscribe(ok, spec, NDJSON, frozenset({frozenset({"svn"})}))
    router.subscribe(partial, spec, NDJSON, frozenset({frozenset({"svn", "secret"})}))
    router.route(make_event("/private/svn/commit", {}))
    await asyncio.sleep(0)
    assert (len(anon.events), len(ok.events), len(partial.events)) == (0, 1, 0)


async def test_unsubscribe_and_move_keep_counts() -> None:
    router = TopicRouter()
    seen: list[tuple[str, int, bool]] = []
    router.add_listener(lambda spec, n, joined: seen.append((str(spec), n, joined)))
    r = Recorder()
    g = router.subscribe(r, parse_subscription("/a"), NDJSON)
    g2 = router.move(r, g, frozenset({frozenset({"a"})}))
    assert router.subscriber_count == 1 and g2 is not g
    router.unsubscribe(r, g2)
    router.unsubscribe(r, g2)  # idempotent
    assert router.subscriber_count == 0 and list(router.groups()) == []
    assert seen == [("/a", 1, True), ("/a", 0, False)]
    router.route(make_event("/a", {}))
    await asyncio.sleep(0)
    assert r.events == []


async def test_every_format_shares_one_bytes_object_per_group() -> None:
    router = TopicRouter()
    spec = parse_subscription("/a")
    sinks = {fmt: [Recorder(), Recorder()] for fmt in (NDJSON, SSE, WEBSOCKET)}
    for fmt, rs in sinks.items():
        for r in rs:
            router.subscribe(r, spec, fmt)
    ev = make_event("/a", {"k": 1})
    router.route(ev)
    router.flush()
    for fmt, (r1, r2) in sinks.items():
        assert r1.data == [ev.wire(fmt)]
        assert r1.data[0] is r2.data[0]  # framed once, the same object written to both


async def test_acl_segment_index_agrees_with_acl_allows() -> None:
    """Random ACLs, batches mixing public and private events, ACL moves and departures between
    batches: every sink gets exactly the public events and the private ones its ACL allows."""
    from hub.router import NO_ACL, Acl, acl_allows
    rnd = random.Random(11)
    words = ["a", "b", "c", "d", "e"]

    def rand_acl() -> Acl:
        if rnd.random() < 0.2:
            return NO_ACL
        return frozenset(frozenset(rnd.sample(words, rnd.randint(0, 2))) for _ in range(rnd.randint(1, 3)))

    router = TopicRouter()
    spec = parse_subscription("/")
    sinks = [Recorder() for _ in range(40)]
    acls = {s: rand_acl() for s in sinks}
    groups = {s: router.subscribe(s, spec, NDJSON, acls[s]) for s in sinks}
    for _ in range(30):
        for s in rnd.sample(list(groups), 4):  # ACL reload
            acls[s] = rand_acl()
            groups[s] = router.move(s, groups[s], acls[s])
        if rnd.random() < 0.3 and len(groups) > 5:
            gone = rnd.choice(list(groups))
            router.unsubscribe(gone, groups.pop(gone))
        for s in sinks:
            s.events.clear()
        batch = []
        for _ in range(rnd.randint(1, 5)):
            topics = "/".join(rnd.sample(words, rnd.randint(1, 3)))
            batch.append(make_event(("/private/" if rnd.random() < 0.6 else "/") + topics, {}))
            router.route(batch[-1])
        router.flush_now()
        for s in sinks:
            acl = acls[s]
            want = [e for e in batch if not e.private or (acl and acl_allows(acl, e))] if s in groups else []
            assert s.events == want


async def test_private_event_everyone_sees_skips_departed_sinks() -> None:
    """The all-see path's cached sink list follows departures."""
    router = TopicRouter()
    spec = parse_subscription("/x")
    acl = frozenset({frozenset({"x"})})
    a, b = Recorder(), Recorder()
    ga = router.subscribe(a, spec, NDJSON, acl)
    router.subscribe(b, spec, NDJSON, frozenset({frozenset()}))
    router.route(make_event("/private/x", {}))
    await asyncio.sleep(0)
    router.unsubscribe(a, ga)
    router.route(make_event("/private/x/y", {}))
    await asyncio.sleep(0)
    assert len(a.events) == 1 and len(b.events) == 2


async def test_keepalive_pings_idle_streams_only() -> None:
    """A pinger ticking every interval/8 pings an idle stream less than one interval after its
    last write, every interval, and never pings a stream written to within the interval."""
    import time
    router = TopicRouter()
    idle, busy = Recorder(), Recorder()
    router.subscribe(idle, parse_subscription("/idle"), NDJSON)
    router.subscribe(busy, parse_subscription("/busy"), NDJSON)
    interval, step = 1.0, 0.125
    t0 = time.monotonic()
    pings: list[float] = []
    for tick in range(1, 8 * 4 + 1):  # four intervals of simulated ticks, one event per tick
        now = t0 + tick * step
        router.route(make_event("/busy", {"tick": tick}))
        router.flush_now()
        for g in router.groups():  # the event was written at ``now`` in simulated time (public
            if busy in g.sinks:    # records stamp the family)
                g.family.last_write = now
        before = len(idle.data)
        router.broadcast_ping(lambda _fmt: b"ping\n", idle_since=now - interval + step, now=now)
        if len(idle.data) > before:
            pings.append(now)
    assert all(d != b"ping\n" for d in busy.data) and len(busy.events) == 32
    assert len(pings) == 4  # once per interval
    gaps = [b - a for a, b in zip([t0, *pings], pings, strict=False)]
    assert all(g <= interval for g in gaps), gaps


async def test_keepalive_every_format_and_moved_stream_keeps_its_silence() -> None:
    """ping_idle builds one keep-alive per format; a stream moved to a new ACL group is still
    due (its silence began before the move)."""
    router = TopicRouter()
    sinks = {fmt: Recorder() for fmt in (NDJSON, SSE, WEBSOCKET)}
    groups = {fmt: router.subscribe(s, parse_subscription("/t"), fmt) for fmt, s in sinks.items()}
    for g in groups.values():  # ten seconds of silence
        g.last_write -= 10.0
        g.family.last_write -= 10.0
    moved = router.move(sinks[SSE], groups[SSE], frozenset({frozenset({"t"})}))
    assert moved.last_write <= groups[SSE].last_write
    built: list[object] = []

    def make(fmt: object) -> bytes:
        built.append(fmt)
        return b"ka"

    assert router.ping_idle(make, interval=5.0, step=5.0 / 8) == 3
    assert sorted(map(id, built)) == sorted(map(id, (NDJSON, SSE, WEBSOCKET)))
    assert all(s.data == [b"ka"] for s in sinks.values())
    assert router.ping_idle(make, interval=5.0, step=5.0 / 8) == 0  # just pinged: not due
