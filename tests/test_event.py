"""Unit tests of events: stamping, restoring, cursors (framing: test_formats)."""

from __future__ import annotations

import json
import uuid

from hub.cursor import cursor_time, new_cursor
from hub.event import make_event, restore_event


def test_stamping_does_not_mutate_and_server_wins() -> None:
    body = {"x": 1, "pubsub_path": "/forged", "pubsub_cursor": "forged"}
    ev = make_event("/private/a/b", body, timestamp=123.5)
    assert body == {"x": 1, "pubsub_path": "/forged", "pubsub_cursor": "forged"}
    assert ev.payload["pubsub_path"] == "/private/a/b"
    assert ev.payload["pubsub_topics"] == ["a", "b"]
    assert ev.payload["pubsub_timestamp"] == 123.5
    assert ev.payload["pubsub_cursor"] == ev.cursor != "forged"
    assert ev.private and ev.topics == ("a", "b")
    assert json.loads(ev.json) == ev.payload


def test_big_integers_survive() -> None:
    ev = make_event("/a", {"n": 2**70})
    assert json.loads(ev.json)["n"] == 2**70


def test_restore_keeps_everything_and_fixes_the_leading_slash() -> None:
    ev = make_event("/private/svn/commit", {"x": [1, 2]})
    back = restore_event(ev.json)
    assert (back.path, back.topics, back.private, back.timestamp, back.cursor) == (
        ev.path, ev.topics, ev.private, ev.timestamp, ev.cursor)
    old = dict(ev.payload, pubsub_path="svn/commit")  # 0.7.4 lost the leading '/'
    assert restore_event(old).path == "/svn/commit"


def test_cursors_are_unique_ordered_and_timed() -> None:
    cs = [new_cursor() for _ in range(5000)]
    assert len(set(cs)) == len(cs)
    assert cs == sorted(cs)
    assert all(len(c) == 36 for c in cs)
    t = cursor_time(cs[0])
    assert t is not None and t > 1.7e9
    assert cursor_time("not-a-uuid") is None


def test_is_uuid7_one_definition() -> None:
    from hub.cursor import is_uuid7

    assert is_uuid7(new_cursor())
    assert not is_uuid7(str(uuid.uuid4()))  # 0.7.4's cursors
    assert not is_uuid7("x" * 14 + "7" + "x" * 21)  # 36 characters with a 7 in place: not a UUID
    assert not is_uuid7(new_cursor()[:35])
    v7 = new_cursor()
    assert not is_uuid7(v7[:19] + "c" + v7[20:])  # not the RFC 9562 variant


def test_make_event_path_is_canonical() -> None:
    ev = make_event("/x/../private/a", {})
    assert (ev.path, ev.topics, ev.private, ev.payload["pubsub_path"]) == ("/private/a", ("a",), True,
                                                                           "/private/a")
