"""Keys of the in-process pubsub API: aiopubsub's ``Key`` and its matching rules, indexed.

Owns the :class:`Key` type (a tuple of strings, ``*`` wildcards), the pure match rule
(:meth:`Key.is_subset_of`, aiopubsub 2.1.5's semantics) and two tries: :class:`WildcardIndex`
finds the wildcard keys matching a concrete key, :class:`KeySet` the concrete keys matching a
wildcard key, each without looking at the others.
Knows nothing of callbacks, queues, HTTP topic sets or events.

Matching (a published, concrete key against a subscribed key):

* a key without ``*`` matches only an equal key;
* ``*`` in any position matches exactly one part;
* a trailing ``*`` matches one *or more* remaining parts: ``('a', 'b', '*')`` matches
  ``('a', 'b', 'c')`` and ``('a', 'b', 'c', 'd')``, never ``('a', 'b')``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

__all__ = [
    "ESCAPED_WILDCARD",
    "WILDCARD",
    "Key",
    "KeySet",
    "PossibleKey",
    "WildcardIndex",
    "WildcardKeyError",
]

#: the part that matches any one part (and, last in a key, one or more parts)
WILDCARD = "*"
#: how a ``*`` is written inside a presence key, so that the presence key is never a wildcard
ESCAPED_WILDCARD = r"\*"

#: what the API accepts wherever aiopubsub accepted a key: a string (one part) or parts
PossibleKey = str | Iterable[str]


class WildcardKeyError(ValueError):
    """A wildcard key given where a concrete key is needed (publishing, queue sizes)."""

    def __init__(self, key: Key, what: str) -> None:
        super().__init__(f"cannot {what} a wildcard key {key!r}: a '*' part only matches in subscriptions")
        self.key = key


class Key(tuple[str, ...]):
    """A message key: an ordered tuple of string parts; a part ``'*'`` is a wildcard.

    ``Key('a', 'b')`` is ``('a', 'b')``; ``Key.create_from('ab')`` is ``('ab',)``.
    """

    __slots__ = ()

    def __new__(cls, *parts: str) -> Key:
        return super().__new__(cls, parts)

    @property
    def is_wildcard(self) -> bool:
        """Does any part equal ``'*'``?"""
        return WILDCARD in self

    def is_subset_of(self, another: Key | tuple[str, ...]) -> bool:
        """Is this key a special case of ``another`` (would a subscription to it receive us)?

        With a non-wildcard ``another`` the keys must be equal; otherwise each ``*`` of
        ``another`` stands for one part, and a trailing ``*`` for one or more parts. A wildcard
        key is a subset of a wider wildcard key (``('a', '*', 'c')`` of ``('a', '*')``).
        """
        if WILDCARD not in another:
            return tuple.__eq__(self, another)
        n, m = len(self), len(another)
        if n < m or (n > m and another[-1] != WILDCARD):
            return False
        return all(a == WILDCARD or s == a for s, a in zip(self, another, strict=False))

    def __add__(self, other: Iterable[str]) -> Key:  # type: ignore[override]
        return Key(*self, *other)

    @classmethod
    def create_from(cls, x: PossibleKey) -> Key:
        """A Key from a string (one part) or an iterable of strings (its parts)."""
        if isinstance(x, Key):
            return x
        if isinstance(x, str):
            return cls(x)
        return cls(*x)

    def escaped(self) -> tuple[str, ...]:
        """The parts with every ``*`` written ``\\*`` (how presence keys carry a subscription key)."""
        return tuple(ESCAPED_WILDCARD if p == WILDCARD else p for p in self)


V = TypeVar("V")


class _Node(Generic[V]):
    __slots__ = ("children", "star", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.star: _Node[V] | None = None
        #: values of keys ending at this node (under a ``star`` node: keys ending with ``*``)
        self.values: dict[Key, V] = {}

    def empty(self) -> bool:
        return not self.values and not self.children and self.star is None


class WildcardIndex(Generic[V]):
    """A trie of wildcard keys: ``match(key)`` visits only branches that can match ``key``.

    Cost of a match: O(len(key) x wildcard branches along the way), independent of how many
    wildcard keys are stored elsewhere in the trie.
    """

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[tuple[Key, V]]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.values.items()
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)

    def set(self, key: Key, value: V) -> None:
        node = self._root
        for part in key:
            if part == WILDCARD:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                nxt = node.children.get(part)
                if nxt is None:
                    nxt = node.children[part] = _Node()
                node = nxt
        if key not in node.values:
            self._size += 1
        node.values[key] = value

    def remove(self, key: Key) -> None:
        """Forget ``key`` (no error if absent) and prune emptied branches."""
        path: list[tuple[_Node[V], str]] = []
        node: _Node[V] | None = self._root
        for part in key:
            if node is None:
                return
            path.append((node, part))
            node = node.star if part == WILDCARD else node.children.get(part)
        if node is None or key not in node.values:
            return
        del node.values[key]
        self._size -= 1
        for parent, part in reversed(path):
            child = parent.star if part == WILDCARD else parent.children.get(part)
            if child is None or not child.empty():
                break
            if part == WILDCARD:
                parent.star = None
            else:
                del parent.children[part]

    def match(self, key: tuple[str, ...]) -> list[tuple[Key, V]]:
        """Stored keys that the concrete ``key`` is a subset of, in no particular order."""
        found: list[tuple[Key, V]] = []
        n = len(key)
        # iterative walk: (node, index of the next part of `key` to consume)
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.values:
                    found.extend(node.values.items())
                continue
            child = node.children.get(key[i])
            if child is not None:
                stack.append((child, i + 1))
            star = node.star
            if star is not None:
                # keys ending in this '*' also match when more than one part remains
                if i + 1 < n and star.values:
                    found.extend(star.values.items())
                stack.append((star, i + 1))
        return found


class _SetNode:
    __slots__ = ("children", "end")

    def __init__(self) -> None:
        self.children: dict[str, _SetNode] = {}
        #: the key ending at this node, if any
        self.end: Key | None = None


class KeySet:
    """A set of concrete keys, as a trie: finds the members a wildcard key matches.

    ``matching(pattern)`` costs O(members it returns + branches its ``*`` parts open), not
    O(all members): this is what keeps invalidating the key → callbacks cache cheap.
    """

    def __init__(self) -> None:
        self._root = _SetNode()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, key: Key) -> None:
        node = self._root
        for part in key:
            nxt = node.children.get(part)
            if nxt is None:
                nxt = node.children[part] = _SetNode()
            node = nxt
        if node.end is None:
            self._size += 1
        node.end = key

    def discard(self, key: Key) -> None:
        path: list[tuple[_SetNode, str]] = []
        node: _SetNode | None = self._root
        for part in key:
            if node is None:
                return
            path.append((node, part))
            node = node.children.get(part)
        if node is None or node.end is None:
            return
        node.end = None
        self._size -= 1
        for parent, part in reversed(path):
            child = parent.children[part]
            if child.end is not None or child.children:
                break
            del parent.children[part]

    def clear(self) -> None:
        self._root = _SetNode()
        self._size = 0

    def matching(self, pattern: tuple[str, ...]) -> list[Key]:
        """Members that are subsets of ``pattern`` (see :meth:`Key.is_subset_of`)."""
        out: list[Key] = []
        m = len(pattern)
        stack: list[tuple[_SetNode, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == m:
                if node.end is not None:
                    out.append(node.end)
                continue
            part = pattern[i]
            if part != WILDCARD:
                child = node.children.get(part)
                if child is not None:
                    stack.append((child, i + 1))
            elif i == m - 1:
                # trailing '*': every member below each child, one part or more
                below = list(node.children.values())
                while below:
                    n = below.pop()
                    if n.end is not None:
                        out.append(n.end)
                    below.extend(n.children.values())
            else:
                stack.extend((child, i + 1) for child in node.children.values())
        return out
