"""PyPubSub's routing engine: events, topic matching, and the Hub.

No HTTP and no configuration here: the daemon (``server``) and in-process programs both use it.
It is also aiopubsub 2.1.5's API: ``from hub import Hub, Key, Publisher, Subscriber``.
"""

from hub.api import (
    ConsumeQueueNotFoundError,
    Publisher,
    Subscriber,
    SubscriptionNotFoundError,
    ThrottledPublisher,
)
from hub.cursor import new_cursor
from hub.event import Event, EventError, Framing, make_event, restore_event
from hub.hub import Hub
from hub.keyed import KeySubscription, Overflow, SubscriptionClosed
from hub.keys import Key, WildcardKeyError
from hub.router import Acl, Sink, TopicRouter
from hub.topics import TopicError, TopicSpec, parse_publish_path, parse_subscription

__all__ = [
    "Acl",
    "ConsumeQueueNotFoundError",
    "Event",
    "EventError",
    "Framing",
    "Hub",
    "Key",
    "KeySubscription",
    "Overflow",
    "Publisher",
    "Sink",
    "Subscriber",
    "SubscriptionClosed",
    "SubscriptionNotFoundError",
    "ThrottledPublisher",
    "TopicError",
    "TopicRouter",
    "TopicSpec",
    "WildcardKeyError",
    "make_event",
    "new_cursor",
    "parse_publish_path",
    "parse_subscription",
    "restore_event",
]
