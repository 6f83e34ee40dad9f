"""aiopubsub 2.1.5's Publisher and Subscriber, on PyPubSub's Hub.

Owns the per-object conveniences of the aiopubsub API: a publisher's key prefix, a subscriber's
named subscriptions (one queue each), and listeners (a callback fed from one subscription; an
asynchronous listener has a task, owned here, created by ``add_async_listener`` and cancelled
and awaited by ``remove_listener`` / ``remove_all_listeners``).
Knows nothing of HTTP, topic sets or events; routing is :class:`~hub.keyed.KeyRouter`'s.

Differences from aiopubsub, all on the side of not losing things silently: an asynchronous
listener whose callback raises logs the exception and keeps consuming (aiopubsub's loop died and
its queue then grew forever); adding the same listener twice is a warning, not a second task;
removing a listener also frees its subscription; queues may be bounded (``maxsize``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NamedTuple

from hub.keyed import KeyRouter, MessageQueue, Overflow, SyncCallback, UnreadCallback
from hub.keys import WILDCARD, Key, PossibleKey

__all__ = [
    "ConsumeQueueNotFoundError",
    "ListenerAsyncCallback",
    "ListenerCallback",
    "ListenerSyncCallback",
    "Publisher",
    "Subscriber",
    "SubscriptionNotFoundError",
    "ThrottledPublisher",
]

logger = logging.getLogger(__name__)

ListenerSyncCallback = Callable[[Key, Any], None]
ListenerAsyncCallback = Callable[[Key, Any], Awaitable[None]]
ListenerCallback = ListenerSyncCallback | ListenerAsyncCallback
#: what listener methods accept: one key, or a set of keys
ListenerKeys = PossibleKey | set[Key] | frozenset[Key]


class ConsumeQueueNotFoundError(TypeError):
    """``consume()`` on a synchronous subscription: it has no queue (aiopubsub's error)."""


class SubscriptionNotFoundError(KeyError):
    """No subscription (or listener) by that id on this subscriber."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "subscription not found"


class Publisher:
    """Publishes under a fixed key prefix: ``Publisher(hub, 'a').publish('b', m)`` → ``('a', 'b')``."""

    def __init__(self, hub: KeyRouter, prefix: PossibleKey) -> None:
        self._hub = hub
        self.prefix = Key.create_from(prefix)

    def __repr__(self) -> str:
        return f"<Publisher prefix={self.prefix!r}>"

    def publish(self, key: PossibleKey, message: Any) -> None:
        """Deliver ``message`` under ``prefix + key`` (see :meth:`KeyRouter.publish`)."""
        self._hub.publish(self.prefix + Key.create_from(key), message)

    def has_subscribers(self, key: PossibleKey = Key(WILDCARD)) -> bool:  # noqa: B008 - immutable
        """Anyone subscribed under ``prefix + key`` (by default: under the prefix at all)?"""
        return self._hub.has_subscribers(self.prefix + Key.create_from(key))


class ThrottledPublisher:
    """aiopubsub.utils' ThrottledPublisher: after each publish, wait (sleeping the delays that
    ``delay_sequence_factory()`` yields) until every queue fed by any key this publisher has
    published to holds at most ``max_qsize`` messages.

    When the delay sequence runs out its last delay is repeated (aiopubsub crashed instead).
    """

    def __init__(self, hub: KeyRouter, publisher: Publisher, max_qsize: int,
                 delay_sequence_factory: Callable[[], Iterable[float]]) -> None:
        self._hub = hub
        self._publisher = publisher
        self._max_qsize = max_qsize
        self._published_keys: set[Key] = set()
        self._delay_sequence_factory = delay_sequence_factory

    async def publish(self, key: PossibleKey, message: Any) -> None:
        self._publisher.publish(key, message)
        self._published_keys.add(self._publisher.prefix + Key.create_from(key))
        delays: Iterator[float] = iter(self._delay_sequence_factory())
        delay: float | None = None
        for published_key in list(self._published_keys):
            for _ in iter(int, 1):  # until this key's queues are short enough
                sizes = self._hub.get_subscriber_queue_sizes(published_key)
                if not sizes or max(sizes) <= self._max_qsize:
                    break
                delay = next(delays, delay)
                if delay is None:
                    raise ValueError("delay_sequence_factory() yielded no delay")
                await asyncio.sleep(delay)


class _Subscription(NamedTuple):
    callback: SyncCallback
    queue: MessageQueue | None
    unread_callback: UnreadCallback | None


class _Listener(NamedTuple):
    task: asyncio.Task[None] | None
    keys: set[Key]


class Subscriber:
    """Named subscriptions (one queue per id) and listeners, as in aiopubsub.

    ``maxsize``/``overflow`` bound every queue this subscriber creates; the default (0) keeps
    aiopubsub's unbounded queues.
    """

    #: subscriptions are created and consumed with this id unless told otherwise
    DEFAULT_SUBSCRIPTION_ID = "default"

    def __init__(self, hub: KeyRouter, id_: str, *, maxsize: int = 0,
                 overflow: Overflow = Overflow.DROP_OLDEST) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0 (0: unbounded), got {maxsize}")
        self.id = id_
        self._hub = hub
        self._maxsize = maxsize
        self._overflow = overflow
        self._subscriptions: dict[str, _Subscription] = {}
        self._listeners: dict[str, _Listener] = {}
        self._listeners_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (f"<Subscriber {self.id!r} subscriptions={len(self._subscriptions)} "
                f"listeners={len(self._listeners)}>")

    # -- subscriptions -------------------------------------------------------------------
    def sync_subscribe(self, key: PossibleKey, callback: ListenerSyncCallback,
                       subscription_id: str = DEFAULT_SUBSCRIPTION_ID) -> None:
        """Call ``callback(key, message)`` synchronously for each message matching ``key``.

        An existing ``subscription_id`` keeps its first callback (aiopubsub's rule).
        """
        key = Key.create_from(key)
        logger.debug("%s: synchronous subscription %s to key = %r", self.id, subscription_id, key)
        sub = self._subscriptions.get(subscription_id)
        if sub is None:
            sub = self._subscriptions[subscription_id] = _Subscription(callback, None, None)
        self._hub.add_subscriber(key, sub.callback)

    def async_subscribe(self, key: PossibleKey, subscription_id: str = DEFAULT_SUBSCRIPTION_ID) -> None:
        """Queue messages matching ``key`` for :meth:`consume`; one queue per ``subscription_id``
        (possibly for several keys, in publishing order)."""
        key = Key.create_from(key)
        logger.debug("%s: asynchronous subscription %s to key = %r", self.id, subscription_id, key)
        sub = self._subscriptions.get(subscription_id)
        if sub is None:
            q = MessageQueue(self._maxsize, self._overflow, name=f"{self.id}/{subscription_id}")
            sub = self._subscriptions[subscription_id] = _Subscription(q, q, q.qsize)
        self._hub.add_subscriber(key, sub.callback, sub.unread_callback)

    #: aiopubsub's name for :meth:`async_subscribe`
    subscribe = async_subscribe

    def unsubscribe(self, key: PossibleKey, subscription_id: str = DEFAULT_SUBSCRIPTION_ID) -> None:
        """Stop a subscription made by :meth:`subscribe`/:meth:`sync_subscribe` for ``key``.

        Messages already queued stay readable.
        """
        key = Key.create_from(key)
        sub = self._get(subscription_id)
        logger.debug("%s: removing subscription %s to key = %r", self.id, subscription_id, key)
        self._hub.remove_subscriber(key, sub.callback, sub.unread_callback)

    async def consume(self, subscription_id: str = DEFAULT_SUBSCRIPTION_ID) -> tuple[Key, Any]:
        """The next ``(key, message)`` of an asynchronous subscription, waiting if needed."""
        sub = self._get(subscription_id)
        if sub.queue is None:
            raise ConsumeQueueNotFoundError(
                f"Cannot use consume to get data from sync subscriptions ({subscription_id!r} of "
                f"subscriber {self.id!r} was made by sync_subscribe/add_sync_listener).")
        item = await sub.queue.get()
        if item is None:  # only a listener's removal closes a queue
            raise SubscriptionNotFoundError(f"subscription {subscription_id!r} was removed")
        return item

    def dropped(self, subscription_id: str = DEFAULT_SUBSCRIPTION_ID) -> int:
        """Messages a bounded subscription lost to its overflow policy."""
        q = self._get(subscription_id).queue
        return 0 if q is None else q.dropped

    def _get(self, subscription_id: str) -> _Subscription:
        sub = self._subscriptions.get(subscription_id)
        if sub is None:
            raise SubscriptionNotFoundError(
                f"subscriber {self.id!r} has no subscription {subscription_id!r}")
        return sub

    # -- listeners -----------------------------------------------------------------------
    def add_sync_listener(self, keys: ListenerKeys, callback: ListenerSyncCallback) -> None:
        """Call ``callback(key, message)`` synchronously, at publish time, for each message
        matching one of ``keys`` (one key or a set of keys)."""
        key_set, sub_id = self._get_listener_subscription(keys, callback)
        if sub_id in self._listeners:
            logger.warning("%s: listener %s already added", self.id, sub_id)
            return
        for key in key_set:
            self.sync_subscribe(key, callback, sub_id)
        self._listeners[sub_id] = _Listener(None, key_set)

    #: aiopubsub's name for :meth:`add_sync_listener`
    add_listener = add_sync_listener

    def add_async_listener(self, keys: ListenerKeys, callback: ListenerAsyncCallback) -> None:
        """Await ``callback(key, message)`` for each message matching one of ``keys``, one at a
        time, from one queue: messages arrive in publishing order across all the keys.

        Needs a running event loop (the listener's task starts now). A callback that raises is
        logged and the listener goes on with the next message.
        """
        key_set, sub_id = self._get_listener_subscription(keys, callback)
        if sub_id in self._listeners:
            logger.warning("%s: listener %s already added", self.id, sub_id)
            return
        loop = asyncio.get_running_loop()
        for key in key_set:
            self.async_subscribe(key, sub_id)
        queue = self._subscriptions[sub_id].queue
        if queue is None:  # sub_id was used by a sync subscription: refuse, as consume() would
            for key in key_set:
                self.unsubscribe(key, sub_id)
            raise ConsumeQueueNotFoundError(f"subscription {sub_id!r} is synchronous")
        task = loop.create_task(self._listen(sub_id, queue, callback), name=f"listener {self.id}/{sub_id}")
        self._listeners[sub_id] = _Listener(task, key_set)

    async def _listen(self, sub_id: str, queue: MessageQueue, callback: ListenerAsyncCallback) -> None:
        for _ in iter(int, 1):  # until the queue is closed or the task cancelled
            item = await queue.get()
            if item is None:
                return
            key, message = item
            try:
                result = callback(key, message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # aiopubsub's listener died here and its queue grew forever; keep consuming
                logger.exception("%s: listener %s failed on %r; going on", self.id, sub_id, key)

    async def remove_listener(self, keys: ListenerKeys, callback: ListenerCallback) -> None:
        """Remove a listener; ``keys`` and ``callback`` must be as given when it was added.

        An asynchronous listener's task is cancelled and awaited; unread messages are dropped.
        """
        async with self._listeners_lock:
            key_set, sub_id = self._get_listener_subscription(keys, callback)
            if sub_id not in self._listeners:
                raise SubscriptionNotFoundError(f"subscriber {self.id!r} has no listener {sub_id}")
            await self._stop_listener(sub_id, key_set)

    async def remove_all_listeners(self) -> None:
        """Remove every listener of this subscriber (tasks cancelled and awaited)."""
        async with self._listeners_lock:
            for sub_id, listener in list(self._listeners.items()):
                await self._stop_listener(sub_id, listener.keys)

    async def _stop_listener(self, sub_id: str, keys: set[Key]) -> None:
        listener = self._listeners.pop(sub_id)
        sub = self._subscriptions.pop(sub_id, None)
        if sub is not None:
            for key in keys:
                self._hub.remove_subscriber(key, sub.callback, sub.unread_callback)
            if sub.queue is not None:
                sub.queue.close()
        task = listener.task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are being cancelled ourselves, not just the listener
        logger.debug("%s: removed listener %s", self.id, sub_id)

    @staticmethod
    def _get_listener_subscription(keys: ListenerKeys, callback: ListenerCallback) -> tuple[set[Key], str]:
        """Normalise ``keys`` to a set of :class:`Key` and derive the listener's subscription id."""
        raw: Iterable[PossibleKey] = keys if isinstance(keys, (set, frozenset)) else (keys,)
        key_set = {Key.create_from(k) for k in raw}
        sub_id = f"callback-{sorted(key_set)!s}-{callback!r}"
        return key_set, sub_id
