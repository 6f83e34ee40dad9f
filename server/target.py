"""The request target, made canonical: what both lanes publish to and subscribe to.

Owns one rule, called by the fast lane and by the aiohttp handlers alike, so that a request
means the same thing whichever lane reads it:

1. the target is reduced to its path: origin-form (``/a/b``) is kept, absolute-form
   (``http://host:2069/a/b``, what a client sends through a forward proxy) loses its scheme
   and authority; any other form (``*``, ``host:port``) is refused;
2. the query string and fragment are dropped: they never change topics;
3. dot-segments are removed (RFC 3986 section 5.2.4, ``%2E`` counting as ``.``);
4. segments are percent-decoded as UTF-8, strictly (``%ff`` is refused), so a topic has one
   spelling. Raw non-ASCII bytes never get here over HTTP: both lanes' parser (llhttp) refuses
   them with 400. A non-ASCII character in a path from elsewhere (the library, SQS) is taken as
   the text it is, so ``/d%C3%A9`` and ``/dé`` are one topic ``dé``;
5. then the ``private`` flag and the secure-topic rule are read from that one topic list.

Pure: strings in, values out; no HTTP objects, no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

from hub.topics import TopicError, TopicSpec, parse_publish_path, parse_subscription, remove_dot_segments

__all__ = ["PublishTarget", "origin_path", "publish_target", "subscription_target"]

_SCHEMES = ("http://", "https://")
_NONE: frozenset[str] = frozenset()


class PublishTarget(NamedTuple):
    """Where a publish goes: its canonical path, topics, privacy and the secure topics it names."""

    path: str
    topics: tuple[str, ...]
    private: bool
    #: the configured secure topics among ``topics`` (empty: anyone allow-listed may publish)
    secure: frozenset[str]


def origin_path(target: str) -> str:
    """The path of a request target, without query or fragment (dot-segments not yet removed).

    Raises TopicError for a target that is neither origin-form nor an http(s) absolute URL.
    """
    if not target.startswith("/"):
        low = target[:8].lower()
        scheme = next((s for s in _SCHEMES if low.startswith(s)), None)
        if scheme is None:
            raise TopicError(f"request target {target[:80]!r} is not a path or an http(s) URL")
        rest = target[len(scheme):]
        cut = len(rest)
        for c in "/?#":
            i = rest.find(c)
            if 0 <= i < cut:
                cut = i
        target = rest[cut:] if rest[cut:cut + 1] == "/" else "/" + rest[cut:]
    if "?" in target:
        target = target.partition("?")[0]
    if "#" in target:
        target = target.partition("#")[0]
    return target


def publish_target(target: str, secure_topics: frozenset[str]) -> PublishTarget:
    """The canonical publish target of a request target; raises TopicError (a 400)."""
    path = remove_dot_segments(origin_path(target))
    topics, private = parse_publish_path(path)
    secure = secure_topics.intersection(topics) if secure_topics else _NONE
    return PublishTarget(path, topics, private, secure)


#: canonical subscription path -> its (immutable) spec: subscribers of one path share one
#: TopicSpec instead of ~400 B of frozensets and tuples each (bounded: cleared when full)
_SPECS: dict[str, TopicSpec] = {}
SPEC_CACHE_SIZE = 4096


def subscription_target(target: str) -> TopicSpec:
    """The subscription a request target asks for (each ``,`` batch resolved on its own)."""
    path = origin_path(target)
    spec = _SPECS.get(path)
    if spec is None:
        spec = parse_subscription(path)  # raises TopicError: nothing cached
        if len(_SPECS) >= SPEC_CACHE_SIZE:
            _SPECS.clear()
        _SPECS[path] = spec
    return spec
