"""Topic paths: parsing publish paths and subscription specs, and matching them.

Owns the pure rules of 0.7.4's topic model and nothing else (no HTTP, no I/O):

* a publish path ``/private/a/b`` gives the event topics ``("a", "b")`` and marks it private;
* a subscription path ``/a/b,/c`` is two OR-ed *batches*; the topics of one batch are AND-ed
  and order-agnostic; ``/`` (an empty batch) matches every event;
* percent-encoded segments are decoded; empty segments are ignored.
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
    "split_segments",
]

PRIVATE_SEGMENT = "private"
# A limit on what one request may ask for, so a hostile path cannot make routing expensive.
MAX_SEGMENTS = 64
MAX_BATCHES = 64


class TopicError(ValueError):
    """A path that cannot be turned into topics."""


def split_segments(path: str) -> tuple[str, ...]:
    """Non-empty, percent-decoded segments of a URL path (query string excluded)."""
    path = path.split("?", 1)[0]
    segs = tuple(unquote(s) for s in path.split("/") if s)
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
