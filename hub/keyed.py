"""Key subscriptions: aiopubsub's Hub semantics, indexed, plus bounded queues and subscriptions.

Owns the registry of (key → callbacks), the delivery of a published key to its callbacks, the
presence messages (``('Hub', 'addedSubscriber', ...)``), queue-size introspection, and the
message queues behind asynchronous subscriptions (optionally bounded, with an overflow policy).
Knows nothing of HTTP, topic sets, events or the daemon: :mod:`hub.hub` bridges those.

Cost model:

* exact keys are a dict lookup; with no wildcard subscription at all a publish is one lookup;
* wildcard keys live in a trie (:class:`~hub.keys.WildcardIndex`); a publish whose key is not in
  the cache walks only the trie branches that can match it;
* the key → callbacks answer is cached in a bounded FIFO (:data:`CACHE_MAX` keys); adding or
  removing an exact key drops that one entry, a wildcard key drops the cached keys it matches
  (found through a trie of the cached keys, :class:`~hub.keys.KeySet`, not by a scan).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from hub.keys import WILDCARD, Key, KeySet, PossibleKey, WildcardIndex, WildcardKeyError

__all__ = [
    "CACHE_MAX",
    "DEFAULT_SUBSCRIPTION_MAXSIZE",
    "KeyRouter",
    "KeySubscription",
    "MessageQueue",
    "Overflow",
    "SubscriptionClosed",
    "SyncCallback",
    "UnreadCallback",
]

logger = logging.getLogger(__name__)

#: a subscription callback as the hub calls it: ``callback(key, message)`` (never awaited)
SyncCallback = Callable[[Key, Any], Any]
#: returns how many messages a subscription holds unread (for queue-size introspection)
UnreadCallback = Callable[[], int]

#: published keys whose callback lists are remembered; a program publishes under a bounded set
#: of keys in practice, and a bound keeps a program that does not from growing without limit
CACHE_MAX = 4096
#: messages a ``hub.subscribe()`` subscription holds before its overflow policy applies
#: (aiopubsub-style ``Subscriber`` queues stay unbounded unless asked, as in aiopubsub)
DEFAULT_SUBSCRIPTION_MAXSIZE = 10_000
#: presence messages go under these key prefixes (aiopubsub's names)
ADDED_PREFIX = ("Hub", "addedSubscriber")
REMOVED_PREFIX = ("Hub", "removedSubscriber")


class SubscriptionClosed(Exception):
    """Reading from a subscription that was closed and has nothing left."""


class Overflow(enum.Enum):
    """What a bounded queue does with a message when it is full."""

    #: drop the oldest queued message, keep the new one (a consumer sees the latest state)
    DROP_OLDEST = "drop-oldest"
    #: drop the new message, keep what is queued
    DROP_NEWEST = "drop-newest"
    #: raise ``asyncio.QueueFull`` to the publisher (after every other subscriber got it)
    RAISE = "raise"


class MessageQueue:
    """The queue of an asynchronous subscription; the hub calls it as ``queue(key, message)``.

    ``maxsize`` 0 means unbounded (aiopubsub's behaviour). ``dropped`` counts overflowed messages.
    """

    __slots__ = ("_q", "closed", "dropped", "maxsize", "name", "overflow")

    def __init__(self, maxsize: int = 0, overflow: Overflow = Overflow.DROP_OLDEST,
                 name: str = "") -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0: unbounded), got {maxsize}")
        self.maxsize = maxsize
        self.overflow = overflow
        self.name = name
        self.dropped = 0
        self.closed = False
        # unbounded underneath: the bound is enforced here so that close() can always wake readers
        self._q: asyncio.Queue[tuple[Key, Any] | None] = asyncio.Queue()

    def __repr__(self) -> str:
        bound = f"/{self.maxsize}" if self.maxsize else ""
        return f"<MessageQueue {self.name!r} {self.qsize()}{bound} dropped={self.dropped}>"

    def __call__(self, key: Key, message: Any) -> None:
        if self.closed:
            return
        q = self._q
        if self.maxsize and q.qsize() >= self.maxsize:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("queue %r full: %s (%d dropped so far)", self.name,
                               self.overflow.value, self.dropped)
            if self.overflow is Overflow.RAISE:
                raise asyncio.QueueFull(f"subscription queue {self.name!r} is full ({self.maxsize})")
            if self.overflow is Overflow.DROP_NEWEST:
                return
            q.get_nowait()
        q.put_nowait((key, message))

    def qsize(self) -> int:
        """Messages waiting to be consumed."""
        return self._q.qsize() - (1 if self.closed and self._q.qsize() else 0)

    async def get(self) -> tuple[Key, Any] | None:
        """The next ``(key, message)``; None once the queue is closed and drained."""
        item = await self._q.get()
        if item is None:
            self._q.put_nowait(None)  # wake the next reader too
        return item

    def close(self) -> None:
        """Stop accepting messages; readers get the queued ones, then None."""
        if not self.closed:
            self.closed = True
            self._q.put_nowait(None)


def _call_all(callbacks: tuple[SyncCallback, ...], key: Key, message: Any) -> None:
    """Call every callback; re-raise the first failure after all were called, log the others."""
    first: Exception | None = None
    for cb in callbacks:
        try:
            cb(key, message)
        except Exception as e:
            if first is None:
                first = e
            else:
                logger.exception("subscriber %r failed on %r", cb, key)
    if first is not None:
        raise first


class _Entry:
    """The subscriptions to one key. ``seq`` orders delivery across keys (first subscribed first)."""

    __slots__ = ("callbacks", "frozen", "key", "seq", "unreads")

    def __init__(self, key: Key, seq: int) -> None:
        self.key = key
        self.seq = seq
        self.callbacks: list[SyncCallback] = []
        self.frozen: tuple[SyncCallback, ...] = ()
        self.unreads: list[UnreadCallback] = []


class KeyRouter:
    """The aiopubsub ``Hub`` API: key subscriptions, publishing, presence and queue sizes."""

    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}
        self._wild: WildcardIndex[_Entry] = WildcardIndex()
        # OrderedDict: popitem(last=False) is O(1); a dict's next(iter()) after deletions is not
        self._cache: OrderedDict[Key, tuple[SyncCallback, ...]] = OrderedDict()
        #: the cache's keys as a trie: a wildcard (un)subscribe finds what to drop without a scan
        self._cached_keys = KeySet()
        self._has_cache: dict[Key, bool] = {}
        self._seq = itertools.count()
        #: number of (key, callback) subscriptions
        self.key_subscription_count = 0

    # -- publishing ----------------------------------------------------------------------
    def _callbacks_for(self, key: Key, cache: bool = True) -> tuple[SyncCallback, ...]:
        if not self._wild:
            e = self._entries.get(key)
            return () if e is None else e.frozen
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        entries = self._matching_entries(key)
        if not entries:
            found: tuple[SyncCallback, ...] = ()
        elif len(entries) == 1:
            found = entries[0].frozen
        else:
            found = tuple(cb for e in entries for cb in e.frozen)
        if cache:
            c = self._cache
            if len(c) >= CACHE_MAX:
                # FIFO eviction: O(1), good enough for a hot set
                self._cached_keys.discard(c.popitem(last=False)[0])
            c[key] = found
            self._cached_keys.add(key)
        return found

    def _matching_entries(self, key: Key) -> list[_Entry]:
        """Entries whose key ``key`` (concrete) is a subset of, in subscription order."""
        entries = [e for _k, e in self._wild.match(key)]
        exact = self._entries.get(key)
        if exact is not None:
            entries.append(exact)
        if len(entries) > 1:
            entries.sort(key=lambda e: e.seq)
        return entries

    def publish(self, key: PossibleKey, message: Any) -> None:
        """Deliver ``message`` to every subscription matching ``key``, synchronously.

        Synchronous callbacks run now; asynchronous subscriptions enqueue. A callback that
        raises does not stop delivery to the others: the first exception is re-raised to the
        publisher once all were called (the others are logged).
        """
        if type(key) is not Key:
            key = Key.create_from(key)
        if WILDCARD in key:
            raise WildcardKeyError(key, "publish to")
        callbacks = self._callbacks_for(key)
        if callbacks:
            _call_all(callbacks, key, message)

    def deliver_isolated(self, key: Key, message: Any) -> int:
        """Like :meth:`publish` for a concrete ``key``, but every failure is logged, none raised.

        Used where the publisher is the daemon itself (HTTP events): a plugin's bug must not
        break routing. Returns the number of callbacks called.
        """
        callbacks = self._callbacks_for(key)
        for cb in callbacks:
            try:
                cb(key, message)
            except Exception:
                logger.exception("key subscriber %r failed on %r", cb, key)
        return len(callbacks)

    # -- membership ----------------------------------------------------------------------
    def _invalidate(self, key: Key, membership_changed: bool) -> None:
        if key.is_wildcard:
            cache = self._cache
            if not self._wild:
                cache.clear()  # no wildcard left: the cache is not consulted any more
                self._cached_keys.clear()
            else:
                for cached in self._cached_keys.matching(key):
                    del cache[cached]
                    self._cached_keys.discard(cached)
        elif self._cache.pop(key, None) is not None:
            self._cached_keys.discard(key)
        if membership_changed:
            self._has_cache.clear()

    def add_subscriber(self, key: PossibleKey, callback: SyncCallback,
                       unread: UnreadCallback | None = None) -> None:
        """Register ``callback(key, message)`` for messages matching ``key``.

        :param unread: returns how many messages the subscription holds unread (for
            :meth:`get_subscriber_queue_sizes`). A repeated (key, callback) is ignored with a
            warning. Publishes ``{'key', 'currentSubscriberCount'}`` under
            ``('Hub', 'addedSubscriber', *key)`` with each ``*`` written ``\\*``.
        """
        key = Key.create_from(key)
        logger.debug("subscription to key = %r", key)
        e = self._entries.get(key)
        if e is not None and callback in e.callbacks:
            logger.warning("repeated subscription to key = %r", key)
            return
        new = e is None
        if e is None:
            e = self._entries[key] = _Entry(key, next(self._seq))
            if key.is_wildcard:
                self._wild.set(key, e)
        e.callbacks.append(callback)
        e.frozen = tuple(e.callbacks)
        if unread is not None:
            e.unreads.append(unread)
        self.key_subscription_count += 1
        self._invalidate(key, new)
        self._presence(ADDED_PREFIX, key, len(e.callbacks))

    def remove_subscriber(self, key: PossibleKey, callback: SyncCallback,
                          unread: UnreadCallback | None = None) -> None:
        """Unregister a subscription made by :meth:`add_subscriber` (a warning if there is none).

        Publishes the count left under ``('Hub', 'removedSubscriber', *key)``.
        """
        key = Key.create_from(key)
        e = self._entries.get(key)
        if e is None or callback not in e.callbacks:
            logger.warning("unsubscribe from nonexistent subscription to key = %r", key)
            return
        logger.debug("canceled subscription to key = %r", key)
        e.callbacks.remove(callback)
        e.frozen = tuple(e.callbacks)
        if unread is not None and unread in e.unreads:
            e.unreads.remove(unread)
        self.key_subscription_count -= 1
        gone = not e.callbacks
        if gone:
            del self._entries[key]
            if key.is_wildcard:
                self._wild.remove(key)
        self._invalidate(key, gone)
        self._presence(REMOVED_PREFIX, key, len(e.callbacks))

    def _presence(self, prefix: tuple[str, str], key: Key, count: int) -> None:
        """aiopubsub's presence message; its key is never cached (one-off keys would evict hot ones)."""
        pkey = Key(*prefix, *key.escaped())
        callbacks = self._callbacks_for(pkey, cache=False)
        if not callbacks:
            return
        _call_all(callbacks, pkey, {"key": key, "currentSubscriberCount": count})

    # -- introspection -------------------------------------------------------------------
    def has_subscribers(self, key: PossibleKey = Key(WILDCARD)) -> bool:  # noqa: B008 - immutable
        """Would anyone hear about ``key``?

        For a concrete key: would a publish to it reach a subscription (wildcards included).
        For a wildcard key (the default ``Key('*')``: "anyone at all"): is any subscribed key a
        subset of it, e.g. ``Key('a', 'b')`` or ``Key('a', '*')`` for ``Key('a', '*')``.
        """
        key = Key.create_from(key)
        if not key.is_wildcard:
            return bool(self._callbacks_for(key))
        memo = self._has_cache
        hit = memo.get(key)
        if hit is None:
            hit = any(k.is_subset_of(key) for k in self._entries)
            if len(memo) >= CACHE_MAX:
                memo.clear()
            memo[key] = hit
        return hit

    def get_subscriber_queue_sizes(self, key: PossibleKey) -> tuple[int, ...]:
        """Unread counts of the asynchronous subscriptions that ``key`` (concrete) reaches."""
        key = Key.create_from(key)
        if key.is_wildcard:
            raise WildcardKeyError(key, "get queue sizes of")
        return tuple(u() for e in self._matching_entries(key) for u in e.unreads)

    def get_all_subscriber_queue_sizes(self) -> dict[Key, tuple[int, ...]]:
        """Every subscribed key with asynchronous subscriptions, and their unread counts."""
        return {k: tuple(u() for u in e.unreads) for k, e in self._entries.items() if e.unreads}

    def subscribed_keys(self) -> dict[Key, int]:
        """Every subscribed key and its number of subscriptions."""
        return {k: len(e.callbacks) for k, e in self._entries.items()}

    @property
    def cache_size(self) -> int:
        """Published keys whose callback lists are cached now (at most :data:`CACHE_MAX`)."""
        return len(self._cache)

    # -- the asyncio API -----------------------------------------------------------------
    def subscribe(self, *keys: PossibleKey, maxsize: int = DEFAULT_SUBSCRIPTION_MAXSIZE,
                  overflow: Overflow = Overflow.DROP_OLDEST) -> KeySubscription:
        """Subscribe one queue to ``keys``, now; use as ``async with`` / ``async for``.

        ``maxsize`` 0 means unbounded; otherwise ``overflow`` says what a full queue does
        (``KeySubscription.dropped`` counts it).
        """
        return KeySubscription(self, keys, maxsize=maxsize, overflow=overflow)


class KeySubscription:
    """One queue subscribed to one or more keys, in arrival order across keys.

    An async context manager (unsubscribes on exit, whatever happened) and an async iterator of
    ``(key, message)``. Subscribed from construction, so nothing published after
    ``hub.subscribe(...)`` returns is missed.
    """

    def __init__(self, router: KeyRouter, keys: Iterable[PossibleKey], *, maxsize: int,
                 overflow: Overflow) -> None:
        self.keys = tuple(dict.fromkeys(Key.create_from(k) for k in keys))
        if not self.keys:
            raise ValueError("subscribe() needs at least one key")
        self._router = router
        self.queue = MessageQueue(maxsize, overflow, name=",".join("/".join(k) for k in self.keys))
        self._closed = False
        done: list[Key] = []
        try:
            for k in self.keys:
                done.append(k)  # add_subscriber raises only after registering (a presence listener)
                router.add_subscriber(k, self.queue, self.queue.qsize)
        except BaseException:
            # leave nothing half-subscribed
            self.keys = tuple(done)
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<KeySubscription {list(self.keys)} {self.queue!r}{' closed' if self._closed else ''}>"

    @property
    def dropped(self) -> int:
        """Messages lost to the overflow policy."""
        return self.queue.dropped

    def qsize(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        """Unsubscribe every key; queued messages can still be read, then iteration stops."""
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        first: Exception | None = None
        for k in self.keys:
            try:
                self._router.remove_subscriber(k, self.queue, self.queue.qsize)
            except Exception as e:  # a presence listener's: still remove the other keys
                if first is None:
                    first = e
                else:
                    logger.exception("while unsubscribing %r", k)
        if first is not None:
            raise first

    async def get(self) -> tuple[Key, Any]:
        """The next ``(key, message)``; raises :class:`SubscriptionClosed` once closed and drained."""
        item = await self.queue.get()
        if item is None:
            raise SubscriptionClosed(f"{self!r} is closed")
        return item

    def __aiter__(self) -> KeySubscription:
        return self

    async def __anext__(self) -> tuple[Key, Any]:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> KeySubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
