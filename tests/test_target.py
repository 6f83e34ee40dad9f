"""Unit tests of the canonical request target (no sockets): one topic list whatever the form."""

from __future__ import annotations

import pytest

from hub.topics import TopicError, remove_dot_segments
from server.target import origin_path, publish_target, subscription_target

SECURE = frozenset({"secret", "dé"})


@pytest.mark.parametrize(("target", "path"), [
    ("/a/b", "/a/b"),
    ("/a/b?x=/private", "/a/b"),
    ("/a#frag", "/a"),
    ("http://host:2069/private/foo", "/private/foo"),
    ("HTTPS://host/a?q", "/a"),
    ("http://host", "/"),
    ("http://host?x=1", "/"),
    ("http://user@host:1/a/../b", "/a/../b"),  # dot-segments are the publish/subscribe step's
])
def test_origin_path(target: str, path: str) -> None:
    assert origin_path(target) == path


@pytest.mark.parametrize("target", ["*", "host:2069", "ftp://h/a", "a/b", ""])
def test_other_target_forms_are_refused(target: str) -> None:
    with pytest.raises(TopicError):
        origin_path(target)


@pytest.mark.parametrize(("path", "resolved"), [
    ("/a/b", "/a/b"),
    ("/./private/x", "/private/x"),
    ("/x/../private/x", "/private/x"),
    ("/x/%2e%2E/private/x", "/private/x"),
    ("/%2E/private/x", "/private/x"),
    ("/private//../x", "/private/x"),  # RFC 3986 5.2.4: ".." removes the empty segment
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/../../a", "/a"),
    ("/..", "/"),
    ("/a/.b/..c/...", "/a/.b/..c/..."),  # only "." and ".." are dot-segments
])
def test_remove_dot_segments(path: str, resolved: str) -> None:
    assert remove_dot_segments(path) == resolved


@pytest.mark.parametrize(("target", "path", "topics", "private", "secure"), [
    ("/a/b", "/a/b", ("a", "b"), False, set()),
    ("http://h:2069/private/foo", "/private/foo", ("foo",), True, set()),
    ("/x/../private/secret", "/private/secret", ("secret",), True, {"secret"}),
    ("/./private/x?/public", "/private/x", ("x",), True, set()),
    ("/d%C3%A9", "/d%C3%A9", ("dé",), False, {"dé"}),
    ("/dé", "/dé", ("dé",), False, {"dé"}),  # raw non-ASCII read as UTF-8, one spelling
    ("/x?/secret", "/x", ("x",), False, set()),  # the query never changes topics
    ("/secret/..", "/", (), False, set()),
])
def test_publish_target(target: str, path: str, topics: tuple[str, ...], private: bool,
                        secure: set[str]) -> None:
    t = publish_target(target, SECURE)
    assert (t.path, t.topics, t.private, set(t.secure)) == (path, topics, private, secure)


@pytest.mark.parametrize("target", ["/%ff", "/d%C3", "/a/\udce9", "*"])
def test_publish_targets_refused(target: str) -> None:
    with pytest.raises(TopicError):
        publish_target(target, SECURE)


def test_subscription_target() -> None:
    assert subscription_target("http://h/a/b,/c?x") == subscription_target("/b/a,/c")
    assert subscription_target("/a,/x/../b") == subscription_target("/a,/b")  # per batch
    assert subscription_target("/x/%2e%2e") == subscription_target("/")
