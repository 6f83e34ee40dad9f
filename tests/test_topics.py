"""Unit tests of the pure topic rules (no sockets)."""

from __future__ import annotations

import pytest

from hub.topics import TopicError, TopicSpec, parse_publish_path, parse_subscription


def test_publish_path_topics_and_private() -> None:
    assert parse_publish_path("/fruits/apples/red") == (("fruits", "apples", "red"), False)
    assert parse_publish_path("/private/a/b") == (("a", "b"), True)
    assert parse_publish_path("/") == ((), False)
    assert parse_publish_path("//a///b/") == (("a", "b"), False)
    assert parse_publish_path("/a%20b/c%2Fd") == (("a b", "c/d"), False)
    assert parse_publish_path("/a/b?x=1") == (("a", "b"), False)


@pytest.mark.parametrize(("sub", "event", "match"), [
    ("/fruits/apples", ("fruits", "apples"), True),
    ("/fruits/apples", ("fruits", "apples", "red"), True),
    ("/fruits/apples", ("fruits", "oranges"), False),
    ("/fruits/apples", ("fruits",), False),
    ("/apples/fruits", ("fruits", "apples", "red"), True),  # order-agnostic
    ("/", ("anything",), True),
    ("/", (), True),
    ("/a/b,/c", ("c",), True),
    ("/a/b,/c", ("a",), False),
    ("/a/b,/c", ("b", "a"), True),
    ("/x%2Cy", ("x,y",), True),  # an encoded comma stays inside the topic
])
def test_subscription_matching(sub: str, event: tuple[str, ...], match: bool) -> None:
    assert parse_subscription(sub).matches(event) is match


def test_specs_are_order_agnostic_and_deduplicated() -> None:
    assert parse_subscription("/a/b") == parse_subscription("/b/a")
    assert parse_subscription("/a,/b") == parse_subscription("/b,/a,/b")
    assert parse_subscription("/").matches_all
    assert str(parse_subscription("/b/a,/c")) == "/c,/a/b"
    assert TopicSpec.of([["x"]]).batches == (frozenset({"x"}),)


def test_hostile_paths_are_refused() -> None:
    with pytest.raises(TopicError):
        parse_subscription("/" + "/".join(["a"] * 100))
    with pytest.raises(TopicError):
        parse_subscription(",".join(["/a"] * 100))


def test_dot_segments_and_strict_decoding() -> None:
    assert parse_publish_path("/x/../private/a") == (("a",), True)
    assert parse_publish_path("/./private/a") == (("a",), True)
    assert parse_publish_path("/%2e%2e/private/a") == (("a",), True)
    assert parse_publish_path("/d%C3%A9") == parse_publish_path("/dé") == (("dé",), False)
    with pytest.raises(TopicError):
        parse_publish_path("/%ff")  # not UTF-8: refused, not replaced by U+FFFD
