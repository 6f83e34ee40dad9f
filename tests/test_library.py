"""The in-process pubsub API (aiopubsub 2.1.5's, on PyPubSub's Hub): pure tests, no sockets."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from hub import (
    ConsumeQueueNotFoundError,
    Hub,
    Key,
    Overflow,
    Publisher,
    Subscriber,
    SubscriptionClosed,
    SubscriptionNotFoundError,
    WildcardKeyError,
)
from hub.keyed import CACHE_MAX
from hub.keys import KeySet, WildcardIndex
from tests.support import await_until

Got = list[tuple[Key, Any]]


def collector() -> tuple[Got, Any]:
    got: Got = []

    def cb(k: Key, m: Any) -> None:
        got.append((k, m))

    return got, cb


# -- Key -------------------------------------------------------------------------------------
def test_key_is_a_tuple_of_strings() -> None:
    k = Key("a", "b")
    assert k == ("a", "b") and isinstance(k, tuple)
    assert hash(k) == hash(("a", "b"))
    assert repr(k) == "('a', 'b')"  # prints like aiopubsub's (a plain tuple)
    assert Key() == ()


def test_is_wildcard() -> None:
    assert not Key("a").is_wildcard
    assert not Key("a", "b", "c").is_wildcard
    assert Key("*").is_wildcard
    assert Key("a", "b", "*").is_wildcard
    assert Key("a", "*", "c").is_wildcard
    assert Key("*", "b", "*").is_wildcard
    assert not Key("a", r"\*").is_wildcard


def test_is_subset_of_exact_and_trailing_wildcard() -> None:
    exact = Key("a", "b")
    assert not Key("a").is_subset_of(exact)
    assert not Key("a", "x").is_subset_of(exact)
    assert Key("a", "b").is_subset_of(exact)
    wild = Key("a", "b", "*")
    assert not Key("a").is_subset_of(wild)
    assert not Key("a", "x").is_subset_of(wild)
    assert not Key("a", "b").is_subset_of(wild)  # a trailing '*' needs at least one part
    assert Key("a", "b", "c").is_subset_of(wild)
    assert Key("a", "b", "c", "d").is_subset_of(wild)
    assert Key("a", "b", "*").is_subset_of(wild)
    assert Key("a", "b", "c", "d", "*").is_subset_of(wild)


def test_is_subset_of_wildcard_in_the_middle() -> None:
    wild = Key("a", "b", "*", "d")
    assert not Key("a", "b", "c").is_subset_of(wild)
    assert not Key("a", "b", "c", "d", "e").is_subset_of(wild)
    assert not Key("a", "b", "c", "x").is_subset_of(wild)
    assert Key("a", "b", "c", "d").is_subset_of(wild)
    assert Key("a", "b", "*", "d").is_subset_of(wild)
    lead = Key("*", "b")
    assert Key("x", "b").is_subset_of(lead)
    assert not Key("x", "b", "c").is_subset_of(lead)


def test_add_and_create_from() -> None:
    added = Key("1") + Key("2")
    assert added == Key("1", "2") and isinstance(added, Key)
    tail = ("b", "c")
    assert Key("a") + tail == Key("a", "b", "c") and isinstance(Key("a") + tail, Key)
    assert Key.create_from(("a", "b")) == Key("a", "b")
    assert Key.create_from(["a", "b"]) == Key("a", "b")
    assert Key.create_from("ab") == Key("ab")
    assert isinstance(Key.create_from(["a"]), Key)


def test_escaped() -> None:
    assert Key("a", "*", "b").escaped() == ("a", r"\*", "b")


# -- the wildcard index against the rule it indexes -----------------------------------------
def test_wildcard_index_agrees_with_is_subset_of() -> None:
    rnd = random.Random(7)
    parts = ["a", "b", "c", "*"]
    idx: WildcardIndex[int] = WildcardIndex()
    stored: set[Key] = set()
    for _ in range(300):
        k = Key(*(rnd.choice(parts) for _ in range(rnd.randint(1, 4))))
        if k.is_wildcard:
            idx.set(k, 1)
            stored.add(k)
    assert len(idx) == len(stored)
    for _ in range(500):
        probe = Key(*(rnd.choice(parts[:3]) for _ in range(rnd.randint(0, 5))))
        want = {k for k in stored if probe.is_subset_of(k)}
        assert {k for k, _ in idx.match(probe)} == want, probe
    for k in list(stored)[::2]:
        idx.remove(k)
        stored.discard(k)
    idx.remove(Key("zz", "*"))  # absent: no error
    assert len(idx) == len(stored)
    assert {k for k, _ in idx} == stored
    for _ in range(200):
        probe = Key(*(rnd.choice(parts[:3]) for _ in range(rnd.randint(0, 5))))
        assert {k for k, _ in idx.match(probe)} == {k for k in stored if probe.is_subset_of(k)}
    for k in list(stored):
        idx.remove(k)
    assert len(idx) == 0 and list(idx) == []


def test_key_set_agrees_with_is_subset_of() -> None:
    rnd = random.Random(11)
    parts = ["a", "b", "c"]
    ks = KeySet()
    members: set[Key] = set()
    for _ in range(300):
        k = Key(*(rnd.choice(parts) for _ in range(rnd.randint(0, 4))))
        ks.add(k)
        members.add(k)
    for k in list(members)[::3]:
        ks.discard(k)
        members.discard(k)
    ks.discard(Key("zz"))
    assert len(ks) == len(members)
    for _ in range(300):
        pattern = Key(*(rnd.choice([*parts, "*"]) for _ in range(rnd.randint(0, 4))))
        assert sorted(ks.matching(pattern)) == sorted(k for k in members if k.is_subset_of(pattern))


def test_hub_agrees_with_a_naive_loop_under_churn() -> None:
    """Random subscribe/unsubscribe/publish: the indexed, cached hub delivers what a loop would."""
    rnd = random.Random(5)
    parts = ["a", "b", "c"]
    hub = Hub()
    subs: dict[tuple[Key, int], Any] = {}
    got: list[tuple[int, Key]] = []

    def make(n: int) -> Any:
        return lambda k, _m: got.append((n, k))

    for step in range(3000):
        op = rnd.random()
        k = Key(*(rnd.choice([*parts, "*"]) for _ in range(rnd.randint(1, 3))))
        if op < 0.25:
            n = rnd.randint(0, 5)
            if (k, n) not in subs:
                subs[(k, n)] = make(n)
                hub.add_subscriber(k, subs[(k, n)])
        elif op < 0.4 and subs:
            key, n = rnd.choice(sorted(subs))
            hub.remove_subscriber(key, subs.pop((key, n)))
        else:
            pk = Key(*(rnd.choice(parts) for _ in range(rnd.randint(1, 4))))
            got.clear()
            hub.publish(pk, step)
            want = sorted(n for (sk, n) in subs if pk.is_subset_of(sk))
            assert sorted(n for n, _ in got) == want, (step, pk)
            assert hub.has_subscribers(pk) == bool(want)


# -- Hub -------------------------------------------------------------------------------------
def test_add_and_remove_subscriber() -> None:
    hub = Hub()
    got, cb = collector()
    k = Key("a", "b")
    hub.add_subscriber(k, cb)
    hub.publish(k, "message1")
    hub.remove_subscriber(k, cb)
    hub.publish(k, "message2")
    assert got == [(k, "message1")]
    assert hub.key_subscription_count == 0


def test_publish_multi_and_order() -> None:
    hub = Hub()
    seen: list[str] = []
    k = Key("a", "b")
    hub.add_subscriber(Key("a", "*"), lambda _key, _m: seen.append("wild"))
    hub.add_subscriber(k, lambda _key, _m: seen.append("exact1"))
    hub.add_subscriber(k, lambda _key, _m: seen.append("exact2"))
    hub.publish(k, "m")
    assert seen == ["wild", "exact1", "exact2"]  # subscription order, across keys


def test_publish_wildcards_middle_and_end() -> None:
    hub = Hub()
    mid, cb_mid = collector()
    end, cb_end = collector()
    hub.add_subscriber(Key("a", "*", "c"), cb_mid)
    hub.add_subscriber(Key("a", "*"), cb_end)
    for k in [("a", "b", "c"), ("a", "x", "c"), ("a", "b"), ("a",), ("a", "b", "c", "d"), ("b", "b", "c")]:
        hub.publish(Key(*k), k)
    assert [m for _, m in mid] == [("a", "b", "c"), ("a", "x", "c")]
    assert [m for _, m in end] == [("a", "b", "c"), ("a", "x", "c"), ("a", "b"), ("a", "b", "c", "d")]


def test_publish_accepts_tuples_and_refuses_wildcards() -> None:
    hub = Hub()
    got, cb = collector()
    hub.add_subscriber(("a", "b"), cb)
    hub.publish(("a", "b"), 1)
    assert got == [(Key("a", "b"), 1)] and type(got[0][0]) is Key
    with pytest.raises(WildcardKeyError, match="wildcard"):
        hub.publish(Key("a", "*"), 2)
    with pytest.raises(WildcardKeyError):
        hub.get_subscriber_queue_sizes(Key("*"))


def test_cache_invalidation() -> None:
    hub = Hub()
    d1, cb1 = collector()
    d2, cb2 = collector()
    d3, cb3 = collector()
    k = Key("a", "b")
    hub.add_subscriber(Key("*", "b"), cb1)
    hub.publish(k, "m1")
    assert hub.cache_size >= 1
    hub.add_subscriber(Key("a", "b"), cb2)  # exact add after the key was cached
    hub.publish(k, "m2")
    hub.add_subscriber(Key("a", "*"), cb3)  # wildcard add after the key was cached
    hub.publish(k, "m3")
    hub.remove_subscriber(Key("*", "b"), cb1)
    hub.publish(k, "m4")
    hub.remove_subscriber(Key("a", "b"), cb2)
    hub.publish(k, "m5")
    assert [m for _, m in d1] == ["m1", "m2", "m3"]
    assert [m for _, m in d2] == ["m2", "m3", "m4"]
    assert [m for _, m in d3] == ["m3", "m4", "m5"]
    hub.remove_subscriber(Key("a", "*"), cb3)
    assert hub.cache_size == 0  # no wildcard left: nothing cached


def test_cache_is_bounded() -> None:
    hub = Hub()
    got, cb = collector()
    hub.add_subscriber(Key("k", "*"), cb)
    for i in range(CACHE_MAX + 500):
        hub.publish(Key("k", str(i)), i)
    assert hub.cache_size <= CACHE_MAX
    assert len(got) == CACHE_MAX + 500
    # evicted keys are still delivered (recomputed), and invalidation still reaches them
    hub.remove_subscriber(Key("k", "*"), cb)
    hub.publish(Key("k", "0"), "after")
    assert got[-1][1] != "after"


def test_repeated_and_unknown_subscriptions_warn(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    got, cb = collector()
    k = Key("a")
    caplog.set_level(logging.WARNING, logger="hub.keyed")
    hub.add_subscriber(k, cb)
    hub.add_subscriber(k, cb)
    assert "repeated subscription" in caplog.text
    hub.publish(k, 1)
    assert got == [(k, 1)]  # once, not twice
    hub.remove_subscriber(Key("nope"), cb)
    assert "nonexistent subscription" in caplog.text


def test_failing_callback_does_not_starve_the_others() -> None:
    hub = Hub()
    got, cb = collector()

    def boom(_k: Key, _m: Any) -> None:
        raise RuntimeError("boom")

    hub.add_subscriber(Key("a"), boom)
    hub.add_subscriber(Key("a"), cb)
    with pytest.raises(RuntimeError, match="boom"):
        hub.publish(Key("a"), 1)
    assert got == [(Key("a"), 1)]


def test_has_subscribers() -> None:
    hub = Hub()
    _, cb = collector()
    k = Key("a", "b")
    assert not hub.has_subscribers()
    assert not hub.has_subscribers(k)
    hub.add_subscriber(k, cb)
    assert hub.has_subscribers()
    assert hub.has_subscribers(k)
    assert not hub.has_subscribers(Key("a", "x"))
    assert hub.has_subscribers(Key("a", "*"))
    assert not hub.has_subscribers(Key("b", "*"))
    hub.remove_subscriber(k, cb)
    assert not hub.has_subscribers()
    assert not hub.has_subscribers(k)
    # a concrete key answers "would a publish reach anyone", wildcards included
    hub.add_subscriber(Key("a", "*"), cb)
    assert hub.has_subscribers(Key("a", "zz"))
    assert not hub.has_subscribers(Key("a"))


def test_presence_messages_and_escape() -> None:
    hub = Hub()
    added, cb_added = collector()
    removed, cb_removed = collector()
    hub.add_subscriber(Key("Hub", "addedSubscriber", "*"), cb_added)
    hub.add_subscriber(Key("Hub", "removedSubscriber", "*"), cb_removed)
    # a presence listener hears about itself (added after registering), and about the next one
    assert added == [
        (Key("Hub", "addedSubscriber", "Hub", "addedSubscriber", r"\*"),
         {"key": Key("Hub", "addedSubscriber", "*"), "currentSubscriberCount": 1}),
        (Key("Hub", "addedSubscriber", "Hub", "removedSubscriber", r"\*"),
         {"key": Key("Hub", "removedSubscriber", "*"), "currentSubscriberCount": 1}),
    ]
    added.clear()
    f1, f2 = (lambda _k, _m: None), (lambda _k, _m: None)
    hub.add_subscriber(Key("x", "*", "y"), f1)
    hub.add_subscriber(Key("x", "*", "y"), f2)
    xy = Key("x", "*", "y")
    added_key = Key("Hub", "addedSubscriber", "x", r"\*", "y")
    assert added == [(added_key, {"key": xy, "currentSubscriberCount": n}) for n in (1, 2)]
    for _, m in added:
        assert isinstance(m["key"], Key)
    hub.remove_subscriber(Key("x", "*", "y"), f1)
    hub.remove_subscriber(Key("x", "*", "y"), f2)
    removed_key = Key("Hub", "removedSubscriber", "x", r"\*", "y")
    assert removed == [(removed_key, {"key": xy, "currentSubscriberCount": n}) for n in (1, 0)]
    # an escaped '*' is a plain part: a subscriber to a literal ('x', '\*', 'y') presence key works
    exact, cb_exact = collector()
    hub.add_subscriber(Key("Hub", "addedSubscriber", "q", r"\*"), cb_exact)
    hub.add_subscriber(Key("q", "*"), f1)
    assert [m["currentSubscriberCount"] for _, m in exact] == [1]


def test_queue_sizes() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    s.subscribe(Key("a", "*"), "wild")
    s.subscribe(Key("a", "b"), "exact")
    s.sync_subscribe(Key("a", "b"), lambda _k, _m: None, "sync")
    for _ in range(3):
        hub.publish(Key("a", "b"), 0)
    hub.publish(Key("a", "c"), 0)
    assert hub.get_subscriber_queue_sizes(Key("a", "b")) == (4, 3)
    assert hub.get_subscriber_queue_sizes(Key("a", "c")) == (4,)
    assert hub.get_subscriber_queue_sizes(Key("z")) == ()
    assert hub.get_all_subscriber_queue_sizes() == {Key("a", "*"): (4,), Key("a", "b"): (3,)}


# -- Publisher -------------------------------------------------------------------------------
def test_publisher_prefix_and_has_subscribers() -> None:
    hub = Hub()
    pub = Publisher(hub, "Tester")
    assert pub.prefix == Key("Tester")
    got, cb = collector()
    k1, k2 = Key("a", "b"), Key("a", "x")
    assert not pub.has_subscribers()
    assert not pub.has_subscribers(k1)
    hub.add_subscriber(Key("Tester") + k1, cb)
    assert pub.has_subscribers()
    assert pub.has_subscribers(k1)
    assert not pub.has_subscribers(k2)
    pub.publish(("a", "b"), "message")
    pub.publish(k2, "nobody")
    assert got == [(Key("Tester", "a", "b"), "message")]
    assert Publisher(hub, ("p", "q")).prefix == Key("p", "q")


# -- Subscriber ------------------------------------------------------------------------------
async def test_subscribe_consume_unsubscribe() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    k = Key("a", "b")
    s.subscribe(k)
    assert hub.subscribed_keys() == {k: 1}
    hub.publish(k, "message1")
    hub.publish(k, "message2")
    assert await s.consume() == (k, "message1")
    assert await s.consume() == (k, "message2")
    s.unsubscribe(k)
    assert hub.subscribed_keys() == {}
    hub.publish(k, "message3")
    assert hub.get_all_subscriber_queue_sizes() == {}


async def test_one_queue_per_subscription_id_keeps_order_across_keys() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    s.async_subscribe(Key("a"), "q")
    s.async_subscribe(Key("b", "*"), "q")
    s.async_subscribe(Key("c"), "other")
    order = [Key("a"), Key("b", "1"), Key("c"), Key("a"), Key("b", "2", "3")]
    for i, k in enumerate(order):
        hub.publish(k, i)
    got = [await s.consume("q") for _ in range(4)]
    assert got == [(Key("a"), 0), (Key("b", "1"), 1), (Key("a"), 3), (Key("b", "2", "3"), 4)]
    assert await s.consume("other") == (Key("c"), 2)


async def test_consume_errors() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    s.sync_subscribe(Key("a"), lambda _k, _m: None, "sync")
    with pytest.raises(ConsumeQueueNotFoundError, match="sync subscriptions"):
        await s.consume("sync")
    with pytest.raises(SubscriptionNotFoundError, match="no subscription 'nope'"):
        await s.consume("nope")
    with pytest.raises(KeyError):  # aiopubsub raised KeyError: still catchable as one
        s.unsubscribe(Key("a"), "nope")


async def test_sync_listener_add_remove() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    got, cb = collector()
    k1, k2 = Key("a", "b"), Key("a", "x")
    s.add_sync_listener({k1, k2}, cb)
    hub.publish(k1, 1)
    hub.publish(k2, 2)
    assert got == [(k1, 1), (k2, 2)]  # called at publish time
    await s.remove_listener({k1, k2}, cb)
    hub.publish(k1, 3)
    assert got == [(k1, 1), (k2, 2)]
    assert hub.subscribed_keys() == {}
    with pytest.raises(SubscriptionNotFoundError):
        await s.remove_listener(k1, cb)
    s.add_listener(k1, cb)  # aiopubsub's old name
    hub.publish(k1, 4)
    assert got[-1] == (k1, 4)


async def test_async_listener_order_across_keys_and_removal() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    got: Got = []

    async def cb(k: Key, m: Any) -> None:
        await asyncio.sleep(0)  # yield between messages: order must still hold
        got.append((k, m))

    k1, k2 = Key("a", "b"), Key("x", "*")
    s.add_async_listener({k1, k2}, cb)
    sent = [(k1 if i % 3 else Key("x", str(i)), i) for i in range(30)]
    for k, m in sent:
        hub.publish(k, m)
    assert sum(hub.get_subscriber_queue_sizes(k1)) == 30  # all queued, none consumed yet
    await await_until(lambda: len(got) == 30, what="async listener to consume")
    assert got == sent
    assert hub.get_subscriber_queue_sizes(k1) == (0,)
    await s.remove_listener({k1, k2}, cb)
    hub.publish(k1, "late")
    assert hub.subscribed_keys() == {}
    assert got == sent
    assert not s._listeners and not s._subscriptions


async def test_async_listener_survives_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    got: list[Any] = []

    async def cb(_k: Key, m: Any) -> None:
        if m == "bad":
            raise ValueError("bad message")
        got.append(m)

    s.add_async_listener(Key("a"), cb)
    for m in ["one", "bad", "two"]:
        hub.publish(Key("a"), m)
    await await_until(lambda: got == ["one", "two"], what="listener to go on after a failure")
    assert "bad message" in caplog.text and "going on" in caplog.text
    assert hub.get_subscriber_queue_sizes(Key("a")) == (0,)
    await s.remove_all_listeners()


async def test_remove_all_listeners() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    got: Got = []

    def sync_cb(k: Key, m: Any) -> None:
        got.append((k, m))

    async def async_cb(k: Key, m: Any) -> None:
        got.append((k, m))

    await s.remove_all_listeners()  # nothing to do
    k1, k2 = Key("a", "b"), Key("a", "x")
    s.add_sync_listener(k1, sync_cb)
    s.add_sync_listener(k2, sync_cb)
    s.add_async_listener(k2, async_cb)
    tasks = [lst.task for lst in s._listeners.values() if lst.task is not None]
    assert len(s._listeners) == 3 and len(tasks) == 1
    await s.remove_all_listeners()
    assert not s._listeners
    assert all(t.done() for t in tasks)  # the listener task was cancelled and awaited
    assert hub.subscribed_keys() == {}
    hub.publish(k1, 1)
    hub.publish(k2, 1)
    assert got == []


async def test_concurrent_remove_all_listeners() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    for i in range(10):
        s.add_sync_listener(Key("a", str(i)), lambda *_: None)
        s.add_async_listener(Key("b", str(i)), _noop)
    await asyncio.gather(s.remove_all_listeners(), s.remove_all_listeners())
    assert not s._listeners and hub.subscribed_keys() == {}


async def _noop(_k: Key, _m: Any) -> None:
    return None


async def test_adding_the_same_listener_twice_is_one_listener(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    s.add_async_listener(Key("a"), _noop)
    s.add_async_listener(Key("a"), _noop)
    assert len(s._listeners) == 1 and "already added" in caplog.text
    await s.remove_listener(Key("a"), _noop)


async def test_bounded_subscriber_queues() -> None:
    hub = Hub()
    s = Subscriber(hub, "t", maxsize=2)
    s.subscribe(Key("a"))
    for i in range(5):
        hub.publish(Key("a"), i)
    assert s.dropped() == 3
    assert [await s.consume() for _ in range(2)] == [(Key("a"), 3), (Key("a"), 4)]
    with pytest.raises(ValueError, match="maxsize"):
        Subscriber(hub, "bad", maxsize=-1)


# -- hub.subscribe: context manager and async iterator -----------------------------------------
async def test_subscribe_context_manager_and_iterator() -> None:
    hub = Hub()
    async with hub.subscribe(Key("a", "*"), ("b",)) as sub:
        assert hub.subscribed_keys() == {Key("a", "*"): 1, Key("b"): 1}
        hub.publish(Key("a", "1"), 1)
        hub.publish(Key("b"), 2)
        hub.publish(Key("c"), 3)
        hub.publish(Key("a", "2", "3"), 4)
        got = []
        async for key, msg in sub:
            got.append((key, msg))
            if len(got) == 3:
                break
        assert got == [(Key("a", "1"), 1), (Key("b"), 2), (Key("a", "2", "3"), 4)]
    assert hub.subscribed_keys() == {}
    with pytest.raises(SubscriptionClosed):
        await sub.get()


async def test_subscribe_cleans_up_on_error() -> None:
    hub = Hub()
    with pytest.raises(RuntimeError, match="inside"):
        async with hub.subscribe("x") as sub:
            hub.publish("x", 1)
            assert await sub.get() == (Key("x"), 1)
            raise RuntimeError("inside")
    assert hub.subscribed_keys() == {}
    assert not hub.has_subscribers()


async def test_close_wakes_a_waiting_reader() -> None:
    hub = Hub()
    sub = hub.subscribe("x")
    got: list[Any] = []

    async def read() -> None:
        async for item in sub:
            got.append(item)

    task = asyncio.get_running_loop().create_task(read())
    hub.publish("x", 1)
    await await_until(lambda: got == [(Key("x"), 1)], what="reader")
    sub.close()
    await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None


@pytest.mark.parametrize(("policy", "kept"), [
    (Overflow.DROP_OLDEST, [3, 4]),
    (Overflow.DROP_NEWEST, [0, 1]),
])
async def test_subscribe_overflow_policies(policy: Overflow, kept: list[int]) -> None:
    hub = Hub()
    async with hub.subscribe("x", maxsize=2, overflow=policy) as sub:
        for i in range(5):
            hub.publish("x", i)
        assert sub.dropped == 3
        assert hub.get_subscriber_queue_sizes("x") == (2,)
        assert [(await sub.get())[1] for _ in range(2)] == kept


async def test_subscribe_overflow_raise_reaches_publisher_after_the_others() -> None:
    hub = Hub()
    other, cb = collector()
    async with hub.subscribe("x", maxsize=1, overflow=Overflow.RAISE) as sub:
        hub.add_subscriber("x", cb)
        hub.publish("x", 0)
        with pytest.raises(asyncio.QueueFull):
            hub.publish("x", 1)
        assert [m for _, m in other] == [0, 1]  # the other subscriber still got it
        assert sub.dropped == 1 and sub.qsize() == 1
    hub.remove_subscriber("x", cb)


def test_subscribe_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        Hub().subscribe()


async def test_cancelled_reader_unsubscribes() -> None:
    hub = Hub()
    entered = asyncio.Event()

    async def reader() -> None:
        async with hub.subscribe(Key("a", "*")) as sub:
            entered.set()
            async for _ in sub:
                pass

    task = asyncio.get_running_loop().create_task(reader())
    await entered.wait()
    assert hub.has_subscribers(Key("a", "b"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.subscribed_keys() == {}


async def test_unsubscribe_keeps_queued_messages() -> None:
    hub = Hub()
    s = Subscriber(hub, "t")
    s.subscribe("a")
    hub.publish("a", 1)
    s.unsubscribe("a")
    hub.publish("a", 2)
    assert await s.consume() == (Key("a"), 1)
    assert hub.get_all_subscriber_queue_sizes() == {}


def test_failing_presence_listener_leaves_no_half_subscription() -> None:
    hub = Hub()

    def boom(_k: Key, m: Any) -> None:
        if m["key"] in (Key("b"), Key("a")):
            raise RuntimeError("presence listener bug")

    hub.add_subscriber(Key("Hub", "*"), boom)
    with pytest.raises(RuntimeError, match="presence listener bug"):
        hub.subscribe("a", "b", "c")
    assert set(hub.subscribed_keys()) == {Key("Hub", "*")}


async def test_throttled_publisher_waits_for_slow_queues() -> None:
    from hub import ThrottledPublisher

    hub = Hub()
    s = Subscriber(hub, "slow")
    s.subscribe(Key("p", "a"))
    tp = ThrottledPublisher(hub, Publisher(hub, "p"), max_qsize=2,
                            delay_sequence_factory=lambda: [0.001])
    await tp.publish("a", 1)
    await tp.publish("a", 2)
    assert hub.get_subscriber_queue_sizes(Key("p", "a")) == (2,)

    async def drain() -> None:
        await s.consume()

    waiter = asyncio.get_running_loop().create_task(tp.publish("a", 3))  # 3 queued > 2: waits
    await await_until(lambda: hub.get_subscriber_queue_sizes(Key("p", "a")) == (3,), what="publish")
    assert not waiter.done()
    await drain()
    await asyncio.wait_for(waiter, 5)
    assert hub.get_subscriber_queue_sizes(Key("p", "a")) == (2,)
