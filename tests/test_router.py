"""Unit tests of the routing index and the coalescing fan-out (sinks are plain recorders)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from hub.event import Event, make_event
from hub.router import TopicRouter
from hub.topics import TopicSpec, parse_subscription
from server.formats import NDJSON, SSE, WEBSOCKET


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
    await asyncio.sleep(0)
    assert len(a.data) == 1 and a.data[0] is b.data[0]  # one write, the same bytes object
    assert a.data[0] == e1.wire(NDJSON) + e2.wire(NDJSON)
    assert [e.cursor for e in c.events] == [e2.cursor]


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
