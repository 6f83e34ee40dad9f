"""Presence: HTTP stream join/leave events for admins (real daemon), and the hub's key bridge."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hub import Hub, Key, make_event
from hub.event import Event
from hub.topics import parse_subscription
from plugins.presence import PRESENCE_PATH, presence_event
from tests.support import (
    DaemonFactory,
    Subscription,
    auth_header,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
)

ADMIN = auth_header("admin", "admin-pw")
BOB = auth_header("bob", "bob-pw-SECRET")


def acl() -> dict[str, Any]:
    return {
        "admin": {"password": "admin-pw", "acl": {"presence": ["pubsub", "presence"]}},
        "bob": {"password": "bob-pw-SECRET", "acl": {"foo": ["foo"]}},
    }


async def next_presence(sub: Subscription, **want: Any) -> dict[str, Any]:
    """The next presence record whose fields include ``want`` (others are skipped)."""
    for _ in range(50):
        ev = await sub.next(5.0)
        p = ev.get("presence")
        if p is not None and all(p.get(k) == v for k, v in want.items()):
            return ev
    raise AssertionError(f"no presence event with {want}")


# -- pure ---------------------------------------------------------------------------------------
def test_presence_event_shape() -> None:
    ev = presence_event(parse_subscription("/svn/commit,/git"), 3, True, 7)
    assert ev.private and ev.topics == ("pubsub", "presence") and ev.path == PRESENCE_PATH
    assert ev.payload["presence"] == {"event": "joined", "subscription": "/git,/commit/svn",
                                      "topics": [["git"], ["commit", "svn"]], "count": 3, "total": 7}
    left = presence_event(parse_subscription("/"), 0, False, 0)
    assert left.payload["presence"]["event"] == "left"
    assert left.payload["presence"]["subscription"] == "/"


def test_http_events_reach_key_subscribers_under_their_path() -> None:
    hub = Hub()
    got: list[tuple[Key, Event]] = []
    hub.add_subscriber(Key("svn", "*"), lambda k, m: got.append((k, m)))
    hub.add_subscriber(Key("private", "*"), lambda k, m: got.append((k, m)))
    e1 = make_event("/svn/commit", {"r": 1})
    e2 = make_event("/private/svn/secret", {"r": 2})
    e3 = make_event("/git/push", {"r": 3})
    e4 = make_event("/svn/*", {"r": 4})
    for e in (e1, e2, e3, e4):
        hub.publish_event(e)
    assert got == [(Key("svn", "commit"), e1), (Key("private", "svn", "secret"), e2),
                   (Key("svn", r"\*"), e4)]


def test_key_bridge_failures_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub()
    got: list[Any] = []

    def boom(_k: Key, _m: Any) -> None:
        raise RuntimeError("plugin bug")

    hub.add_subscriber(Key("a"), boom)
    hub.add_subscriber(Key("a"), lambda _k, m: got.append(m))
    ev = make_event("/a", {})
    hub.publish_event(ev)  # the daemon's routing must not see a plugin's exception
    assert got == [ev]
    assert "plugin bug" in caplog.text


def test_no_key_subscribers_means_no_key_work() -> None:
    hub = Hub()
    hub.publish_event(make_event("/a/b", {}))
    assert hub.cache_size == 0 and hub.key_subscription_count == 0


# -- the real daemon ------------------------------------------------------------------------------
async def test_admin_follows_joins_and_leaves(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl())
    async with subscribe(d.url, "/pubsub/presence", headers=ADMIN) as admin:
        # the admin's own stream is the first join it hears about
        ev = await next_presence(admin, event="joined", subscription="/presence/pubsub")
        assert ev["presence"]["count"] == 1 and ev["presence"]["total"] == 1
        assert ev["pubsub_path"] == PRESENCE_PATH
        async with subscribe(d.url, "/svn/commit", headers=BOB), \
                subscribe(d.url, "/commit/svn"):
            first = await next_presence(admin, event="joined", subscription="/commit/svn")
            second = await next_presence(admin, event="joined", subscription="/commit/svn")
            assert [first["presence"]["count"], second["presence"]["count"]] == [1, 2]
            assert second["presence"]["topics"] == [["commit", "svn"]]
            assert second["presence"]["total"] == 3
            await wait_subscribers(d.url, 3)
        left = [await next_presence(admin, event="left", subscription="/commit/svn") for _ in range(2)]
        assert sorted(e["presence"]["count"] for e in left) == [0, 1]
        # nothing about who subscribed leaks: no user, password or address in any record
        raw = json.dumps(admin.events)
        for secret in ("bob", "SECRET", "admin-pw", "127.0.0.1", "Authorization"):
            assert secret not in raw


async def test_presence_is_private(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(acl=acl())
    async with subscribe(d.url, "/pubsub/presence") as anon, \
            subscribe(d.url, "/pubsub/presence", headers=BOB) as bob, \
            subscribe(d.url, "/", headers=BOB) as bob_all:
        await wait_subscribers(d.url, 3)
        async with subscribe(d.url, "/pubsub/presence", headers=ADMIN) as admin:
            await next_presence(admin, event="joined", subscription="/presence/pubsub")
            async with subscribe(d.url, "/foo"):
                await next_presence(admin, event="joined", subscription="/foo")
            await next_presence(admin, event="left", subscription="/foo")
        # a public event after all that: each must get it as their *first* record
        status, _ = await publish(d.url, "/pubsub/presence", {"public": True})
        assert status == 202
        for sub in (anon, bob, bob_all):
            ev = await sub.next(5.0)
            assert ev.get("public") is True, ev


async def test_presence_is_not_kept_in_the_backlog(daemon_factory: DaemonFactory) -> None:
    port = free_port()
    cfg = base_config(port, backlog={"size": 100, "max_age": 0})
    d = daemon_factory(config=cfg, acl=acl(), port=port)
    async with subscribe(d.url, "/pubsub/presence", headers=ADMIN) as admin:
        await next_presence(admin, event="joined")
        async with subscribe(d.url, "/x"):
            await next_presence(admin, event="joined", subscription="/x")
        await next_presence(admin, event="left", subscription="/x")
    status, _ = await publish(d.url, "/x", {"n": 1})
    assert status == 202
    hdr = {**ADMIN, "X-Fetch-Since": "0"}
    async with subscribe(d.url, "/", headers=hdr) as replay:
        first = await replay.next(5.0)
        assert first.get("n") == 1, first  # the replay holds the published event, no presence
        live = await replay.next(5.0)  # then its own join arrives live
        assert live["presence"]["event"] == "joined"
