"""The Hub: the one routing engine shared by the daemon's HTTP streams and in-process users.

Owns the two subscription registries side by side — topic sets for HTTP streams
(:attr:`Hub.topics`, a :class:`~hub.router.TopicRouter`) and aiopubsub keys (inherited from
:class:`~hub.keyed.KeyRouter`: ``publish``, ``add_subscriber``, ``subscribe``...) — and the entry
point for publishing a stamped :class:`~hub.event.Event` to both. No HTTP, no YAML, no storage.

An event reaches key subscribers under the key of its publish path's segments:
``PUT /svn/commit`` → ``Key('svn', 'commit')``, ``PUT /private/a/b`` → ``Key('private', 'a', 'b')``
(in-process code is trusted; HTTP subscribers still need an ACL for private events). The message
is the :class:`~hub.event.Event` itself. A ``*`` segment is written ``\\*`` so that an event key
is never a wildcard. With no key subscriber at all this costs one attribute test per event.
"""

from __future__ import annotations

import logging

from hub.event import Event
from hub.keyed import KeyRouter
from hub.keys import ESCAPED_WILDCARD, WILDCARD, Key
from hub.router import TopicRouter
from hub.topics import PRIVATE_SEGMENT

__all__ = ["Hub", "event_key"]

logger = logging.getLogger(__name__)


def event_key(event: Event) -> Key:
    """The key an HTTP event is delivered under to key subscribers."""
    parts = event.topics
    if WILDCARD in parts:
        parts = tuple(ESCAPED_WILDCARD if p == WILDCARD else p for p in parts)
    return Key(PRIVATE_SEGMENT, *parts) if event.private else Key(*parts)


class Hub(KeyRouter):
    """Routes events to subscribers. Publishing never awaits a subscriber.

    ``Hub()`` is also aiopubsub's ``Hub``: see :class:`~hub.keyed.KeyRouter` for the key API.
    """

    def __init__(self) -> None:
        super().__init__()
        self.topics = TopicRouter()

    def __repr__(self) -> str:
        return (f"<Hub streams={self.topics.subscriber_count} "
                f"key_subscriptions={self.key_subscription_count}>")

    def publish_event(self, event: Event) -> int:
        """Deliver a stamped event to every matching topic-set subscription, then to key
        subscribers (whose failures are logged, never raised). Returns the topic groups reached."""
        n = self.topics.route(event)
        if self.key_subscription_count:
            self.deliver_isolated(event_key(event), event)
        return n

    @property
    def subscriber_count(self) -> int:
        """HTTP streams subscribed (what ``HEAD /`` reports); key subscriptions are not counted."""
        return self.topics.subscriber_count
