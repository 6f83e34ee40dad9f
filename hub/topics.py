"""Topic paths: parsing publish paths and subscription specs, and matching them.

Owns the pure rules of 0.7.4's topic model and nothing else (no HTTP, no I/O):

* a publish path ``/private/a/b`` gives the event topics ``("a", "b")`` and marks it private;
* a subscription path ``/a/b,/c`` is two OR-ed *batches*; the topics of one batch are AND-ed
  and order-agnostic; ``/`` (an empty batch) matches every event;
* dot-segments are removed first, as RFC 3986 section 5.2.4 does (``/a/../private/b`` is
  ``/private/b``; ``%2E`` counts as ``.``), so a path has one meaning whoever normalises it;
* segments are then percent-decoded as UTF-8 (strictly: bytes that are not UTF-8 are refused);
  empty segments are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = [
    "PRIVATE_SEGMENT",
    "TopicError",
    "TopicSpec",
    "parse_publish_path",
    "parse_subscription",
    "remove_dot_segments",
    "split_segments",
]

PRIVATE_SEGMENT = "private"
# A limit on what one request may ask for, so a hostile path cannot make routing expensive.
MAX_SEGMENTS = 64
MAX_BATCHES = 64


class TopicError(ValueError):
    """A path that cannot be turned into topics."""


def _dot(seg: str) -> str:
    """``seg`` with percent-encoded dots decoded (RFC 3986 6.2.2.2: ``%2E`` *is* ``.``)."""
    return seg.replace("%2e", ".").replace("%2E", ".") if "%" in seg else seg


def remove_dot_segments(path: str) -> str:
    """``path`` with its ``.`` and ``..`` segments resolved (RFC 3986 section 5.2.4).

    ``..`` above the root stays at the root; empty segments are kept (``/a//../b`` is
    ``/a/b``, as the RFC says). The query string is not special here: strip it first.
    """
    if "/." not in path and "/%2" not in path:  # the common case: nothing to resolve
        return path
    segs = path.split("/")
    last = len(segs) - 1
    out: list[str] = []
    for i, seg in enumerate(segs[1:], 1) if path.startswith("/") else enumerate(segs):
        d = _dot(seg)
        if d == "." or d == "..":
            if d == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." is "/a/": the path still ends in a directory
            continue
        out.append(seg)
    return "/" + "/".join(out)


def _decode(seg: str) -> str:
    """One percent-decoded segment; raw non-ASCII characters are taken as they are."""
    if "%" in seg:
        try:
            seg = unquote(seg, errors="strict")
        except UnicodeDecodeError:
            raise TopicError(f"percent-encoded bytes in {seg[:80]!r} are not UTF-8") from None
    if not seg.isascii():
        try:
            seg.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: raw bytes that were not UTF-8
            raise TopicError(f"topic {seg[:80]!r} is not valid UTF-8") from None
    return seg


def split_segments(path: str) -> tuple[str, ...]:
    """Non-empty, percent-decoded segments of a URL path, dot-segments resolved (query string
    excluded)."""
    if "?" in path:
        path = path.split("?", 1)[0]
    path = remove_dot_segments(path)
    if "%" not in path and path.isascii():  # the common case: nothing to decode
        segs = tuple(filter(None, path.split("/")))
    else:
        segs = tuple(_decode(s) for s in path.split("/") if s)
    if len(segs) > MAX_SEGMENTS:
        raise TopicError(f"too many topic segments ({len(segs)} > {MAX_SEGMENTS})")
    return segs


def parse_publish_path(path: str) -> tuple[tuple[str, ...], bool]:
    """Topics of an event published at ``path`` and whether it is private.

    The leading ``private`` segment is a flag, not a topic (0.7.4's rule).
    """
    segs = split_segments(path)
    if segs and segs[0] == PRIVATE_SEGMENT:
        return segs[1:], True
    return segs, False


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What one subscriber asked for: OR-ed batches of AND-ed topics.

    Batches are frozensets, so ``/a/b`` and ``/b/a`` give equal specs (and share a hub group).
    """

    batches: tuple[frozenset[str], ...]

    @classmethod
    def of(cls, batches: Iterable[Iterable[str]]) -> TopicSpec:
        uniq: list[frozenset[str]] = []
        for b in batches:
            fb = frozenset(b)
            if fb not in uniq:
                uniq.append(fb)
        uniq.sort(key=lambda b: (len(b), sorted(b)))
        return cls(tuple(uniq))

    @property
    def matches_all(self) -> bool:
        return any(not b for b in self.batches)

    def matches(self, topics: Iterable[str]) -> bool:
        """Does an event with these topics match any batch?"""
        ts = topics if isinstance(topics, (set, frozenset)) else frozenset(topics)
        return any(b <= ts for b in self.batches)

    def __str__(self) -> str:
        return ",".join("/" + "/".join(sorted(b)) for b in self.batches)


def parse_subscription(path: str) -> TopicSpec:
    """The spec of a ``GET`` path: ``,`` separates batches, ``/`` separates AND-ed topics."""
    raw = path.split("?", 1)[0].split(",")
    if len(raw) > MAX_BATCHES:
        raise TopicError(f"too many topic batches ({len(raw)} > {MAX_BATCHES})")
    return TopicSpec.of(split_segments(b) for b in raw)
