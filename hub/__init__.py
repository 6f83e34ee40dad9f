"""PyPubSub's routing engine: events, topic matching, and the Hub.

No HTTP and no configuration here: the daemon (``server``) and in-process programs both use it.
"""

from hub.cursor import new_cursor
from hub.event import Event, EventError, WireFormat, make_event, restore_event
from hub.hub import Hub
from hub.router import Acl, Sink, TopicRouter
from hub.topics import TopicError, TopicSpec, parse_publish_path, parse_subscription

__all__ = [
    "Acl",
    "Event",
    "EventError",
    "Hub",
    "Sink",
    "TopicError",
    "TopicRouter",
    "TopicSpec",
    "WireFormat",
    "make_event",
    "new_cursor",
    "parse_publish_path",
    "parse_subscription",
    "restore_event",
]
