"""Unit tests of events: stamping, restoring, cursors (framing: test_formats)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

import hub.cursor as cursor_mod
from hub.cursor import cursor_time, is_uuid7, new_cursor
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


def test_an_owned_body_is_stamped_in_place_alike() -> None:
    """``owned``: the caller's fresh dict becomes the payload; the same keys, order and JSON as
    a copy's."""
    def body() -> dict[str, object]:
        return {"x": 1, "pubsub_path": "/forged", "y": [2]}
    copied = make_event("/a/b", body(), timestamp=5.0, cursor="c")
    mine = body()
    owned = make_event("/a/b", mine, timestamp=5.0, cursor="c", owned=True)
    assert owned.payload is mine and owned.json == copied.json
    assert list(mine) == ["x", "pubsub_path", "y", "pubsub_topics", "pubsub_timestamp", "pubsub_cursor"]


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


@pytest.fixture
def far_clock() -> Iterator[None]:
    """Cursors stamped with far-future times, the process's cursor state restored after."""
    saved = cursor_mod._last_ms, cursor_mod._seq
    cursor_mod._last_ms = cursor_mod._seq = 0
    yield
    cursor_mod._last_ms, cursor_mod._seq = saved


def _check_cursors(cs: list[str], times: list[float]) -> None:
    assert len(set(cs)) == len(cs)
    assert cs == sorted(cs)
    for c, t in zip(cs, times, strict=True):
        assert is_uuid7(c)
        u = uuid.UUID(c)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        ct = cursor_time(c)
        assert ct is not None and ct >= int(t * 1000) / 1000  # never behind its clock


@pytest.mark.usefixtures("far_clock")
def test_cursors_within_one_millisecond_at_high_rate() -> None:
    # 5 000 cursors stamped in the same millisecond: past 4 096 they borrow the next ms
    now = 4_000_000_000.0005
    cs = [new_cursor(now) for _ in range(5000)]
    _check_cursors(cs, [now] * len(cs))
    assert cursor_time(cs[0]) == 4_000_000_000.0
    assert cursor_time(cs[-1]) == 4_000_000_000.001  # the 4 097th on: the next millisecond


@pytest.mark.usefixtures("far_clock")
def test_cursors_across_millisecond_boundaries() -> None:
    base = 4_100_000_000.0
    times = [base + i * 0.0004 for i in range(3000)]  # 2-3 cursors per ms, each ms boundary
    cs = [new_cursor(t) for t in times]
    _check_cursors(cs, times)
    assert {cursor_time(c) for c in cs} == {round(int(t * 1000) / 1000, 3) for t in times}
    # the clock stepping back: still strictly greater, on the last millisecond seen
    back = new_cursor(base)
    assert back > cs[-1] and cursor_time(back) == cursor_time(cs[-1])


@pytest.mark.usefixtures("far_clock")
def test_cursors_after_advance_past() -> None:
    from hub.cursor import advance_past

    stored = new_cursor(4_200_000_000.0)
    advance_past(stored)
    later = new_cursor(1_800_000_000.0)  # a clock behind the stored cursor
    assert later > stored and is_uuid7(later)


def test_is_uuid7_one_definition() -> None:
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
