"""Events: the immutable unit that flows publish → log → hub → streams, and its wire bytes.

Owns stamping (``pubsub_*`` fields, never mutating the caller's dict), serialisation (JSON once;
framed bytes once per :class:`Framing`, shared by every subscriber) and restoring an event from
its stored JSON. Knows nothing of HTTP requests, transports, configuration or storage: a framing
(HTTP chunks, Server-Sent Events, WebSocket frames) is supplied by whoever streams the event.
"""

from __future__ import annotations

import json as _json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from hub.cursor import new_cursor
from hub.topics import parse_publish_path, remove_dot_segments

__all__ = ["Event", "EventError", "Framing", "make_event", "restore_event"]


class EventError(ValueError):
    """Stored or supplied data that is not a valid event."""


class Framing(Protocol):
    """How a stream format turns one event into bytes on the wire (hashed by identity).

    The hub groups subscribers by framing and asks :meth:`Event.wire` for each event's bytes,
    which calls :meth:`frame` once per (event, framing); it never looks inside.
    """

    #: a short name for logs and metrics (``chunked``, ``sse``, ``websocket``...)
    name: str

    def frame(self, event: Event) -> bytes:
        """The framed record for ``event`` (its ``json``, ``cursor``... as the format needs)."""


def dumps(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON; falls back to the stdlib for what orjson refuses (integers over 64 bits)."""
    try:
        return bytes(memoryview(orjson.dumps(obj)))  # orjson leaves a 4 KiB allocation: copy
    except orjson.JSONEncodeError:
        return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(slots=True, eq=False)
class Event:
    """One published event. Immutable by convention (not ``frozen``: a frozen dataclass's
    ``__init__`` costs a ``object.__setattr__`` per field, a sixth of a publish's stamping).

    ``payload`` is the stamped object as subscribers see it; ``json`` its serialisation.
    ``topics`` exclude the ``private`` flag segment; ``path`` keeps it.
    """

    topics: tuple[str, ...]
    private: bool
    path: str
    timestamp: float
    cursor: str
    payload: Mapping[str, Any]
    json: bytes
    topicset: frozenset[str] = field(repr=False)
    _wire: dict[Framing, bytes] = field(default_factory=dict, repr=False)
    #: where the event sits in its log (opaque, increasing in log order); 0 until a log keeps it
    position: int = field(default=0, repr=False)

    def wire(self, fmt: Framing) -> bytes:
        """The framed bytes for ``fmt``, computed once and shared by every subscriber."""
        b = self._wire.get(fmt)
        if b is None:
            b = self._wire[fmt] = fmt.frame(self)
        return b

    def __repr__(self) -> str:
        return f"<Event {self.cursor} {self.path!r}{' private' if self.private else ''}>"


def make_event(
    path: str,
    body: Mapping[str, Any],
    *,
    timestamp: float | None = None,
    cursor: str | None = None,
    position: int = 0,
    parsed: tuple[tuple[str, ...], bool] | None = None,
    owned: bool = False,
) -> Event:
    """Stamp ``body`` as published at ``path``; the server's ``pubsub_*`` values win.

    ``body`` is not modified: the stamped payload is a new dict, unless ``owned`` says that
    ``body`` is a ``dict`` nobody else holds (a request's freshly parsed body): it is then
    stamped in place and becomes the payload. ``parsed`` is ``parse_publish_path(path)`` when
    the caller has it already.
    """
    if parsed is None:
        path = remove_dot_segments(path)  # one canonical path: "/x/../private/a" is "/private/a"
        parsed = parse_publish_path(path)
    topics, private = parsed
    ts = time.time() if timestamp is None else timestamp
    cur = new_cursor(ts) if cursor is None else cursor
    payload = body if owned and type(body) is dict else dict(body)
    payload["pubsub_topics"] = list(topics)
    payload["pubsub_path"] = path
    payload["pubsub_timestamp"] = ts
    payload["pubsub_cursor"] = cur
    # positional: the fields in their declared order (cheaper than keywords per publish)
    return Event(topics, private, path, ts, cur, payload, dumps(payload), frozenset(topics), {},
                 position)


def restore_event(data: bytes | str | Mapping[str, Any]) -> Event:
    """Rebuild an event from its stored JSON, keeping its exact path, timestamp and cursor."""
    try:
        obj = orjson.loads(data) if isinstance(data, (bytes, str)) else dict(data)
    except orjson.JSONDecodeError:
        try:
            obj = _json.loads(data) if isinstance(data, (bytes, str)) else None
        except ValueError as e:
            raise EventError(f"stored event is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise EventError("stored event is not a JSON object")
    path, ts, cur = obj.get("pubsub_path"), obj.get("pubsub_timestamp"), obj.get("pubsub_cursor")
    if not isinstance(path, str) or not isinstance(ts, (int, float)) or not isinstance(cur, str):
        raise EventError("stored event lacks pubsub_path, pubsub_timestamp or pubsub_cursor")
    if not path.startswith("/"):
        path = "/" + path  # 0.7.4 restored events without their leading '/'
    topics, private = parse_publish_path(path)
    obj["pubsub_path"] = path
    obj["pubsub_topics"] = list(topics)
    return Event(
        topics=topics,
        private=private,
        path=path,
        timestamp=float(ts),
        cursor=cur,
        payload=obj,
        json=dumps(obj),
        topicset=frozenset(topics),
    )
