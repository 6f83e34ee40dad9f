"""What a request head asks for, and which lane may answer it: one pure decision.

Owns :func:`negotiate`: from the method, the HTTP version and the headers of a request head it
decides

* the **outcome**: a publish, a stream (and in which format), a health check, a refusal, or
  a method we do not serve;
* the **lane**: ``FAST`` only when every header is on :data:`FAST_HEADERS` (an explicit
  allow-list: a header whose meaning the fast lane does not implement is never ignored by it)
  and the request is the plain shape the fast lane serves; ``AIOHTTP`` for everything else.

The fast lane calls it on every head it parsed; the aiohttp handlers call it to pick their
handler, so both lanes read a request the same way. It knows nothing of sockets or aiohttp.

Adding a stream format: add a member to :class:`StreamFormat`, a rule to :func:`_stream_format`
(the first rule that claims the request wins; NDJSON is the default), its :class:`Decision`
constant, and its framing in the registry (:func:`server.formats.stream_format`). The fast lane
serves ``NDJSON``, plain ``SSE`` (``Accept: text/event-stream`` exactly, no replay, no
credentials, no Origin) and a well-formed ``WEBSOCKET`` handshake (version 13, a canonical key,
headers on :data:`FAST_WS_HEADERS` only: :mod:`server.fastws`); any other format, and any
unusual handshake, is answered by aiohttp.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["FAST_HEADERS", "FAST_WS_HEADERS", "Decision", "Lane", "Outcome", "StreamFormat", "negotiate"]


class Lane(enum.Enum):
    FAST = "fast"
    AIOHTTP = "aiohttp"


class Outcome(enum.Enum):
    PUBLISH = "publish"
    STREAM = "stream"
    HEAD = "head"
    #: a request refused with 400 whatever its target (``Decision.reason`` says why)
    BAD = "bad"
    #: a method we do not serve (405)
    OTHER = "other"


class StreamFormat(enum.Enum):
    """What kind of stream a subscription asks for; :mod:`server.formats` has the framing of
    each (NDJSON covers the svnpubsub framing too: see ``formats.wire_format``)."""

    NDJSON = "ndjson"
    #: ``Accept: text/event-stream``: Server-Sent Events (``formats.SSE``)
    SSE = "sse"
    #: ``Upgrade: websocket``: a WebSocket (``formats.WEBSOCKET``, server/websocket.py)
    WEBSOCKET = "websocket"
    #: a browser navigation (``Accept: text/html...``): the live page (server/page.py)
    PAGE = "page"


@dataclass(frozen=True, slots=True)
class Decision:
    lane: Lane
    outcome: Outcome
    format: StreamFormat | None = None
    reason: str = ""


# Every decision is one of these constants: negotiating allocates nothing.
FAST_PUBLISH = Decision(Lane.FAST, Outcome.PUBLISH)
FAST_STREAM = Decision(Lane.FAST, Outcome.STREAM, StreamFormat.NDJSON)
FAST_SSE = Decision(Lane.FAST, Outcome.STREAM, StreamFormat.SSE)
FAST_WEBSOCKET = Decision(Lane.FAST, Outcome.STREAM, StreamFormat.WEBSOCKET)
PUBLISH = Decision(Lane.AIOHTTP, Outcome.PUBLISH)
HEAD = Decision(Lane.AIOHTTP, Outcome.HEAD)
OTHER = Decision(Lane.AIOHTTP, Outcome.OTHER)
NO_HOST = Decision(Lane.AIOHTTP, Outcome.BAD, reason="an HTTP/1.1 request needs a Host header")
STREAMS = {f: Decision(Lane.AIOHTTP, Outcome.STREAM, f) for f in StreamFormat}

#: request headers (lower-case) the fast lane may see: each one is either ignored by both lanes
#: (the response does not depend on it) or read by the fast lane exactly as aiohttp reads it.
#: Anything else (Authorization, X-Fetch-Since*, Last-Event-ID, Upgrade, Origin, Expect,
#: Transfer-Encoding, TE, Cookie...) sends the request to aiohttp.
FAST_HEADERS = frozenset({
    b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"connection",
    b"content-length", b"content-type", b"cache-control", b"pragma",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"x-request-id",
})
#: ``Accept`` values a fast-lane stream may carry: they ask for nothing in particular
_ANY_ACCEPT = frozenset({b"*/*", b"*/*; q=1", b"*/*;q=1"})
#: the one ``Accept`` value of an SSE stream the fast lane serves
_SSE_ACCEPT = b"text/event-stream"
#: headers a fast-lane WebSocket handshake may carry besides :data:`FAST_HEADERS`: the handshake's
#: own, read by :mod:`server.fastws` as aiohttp reads them (``Origin`` against the same rule;
#: ``Sec-WebSocket-Extensions`` ignored by both lanes: compression is off, none is negotiated).
#: ``Sec-WebSocket-Protocol``, credentials, cookies and replay headers leave it to aiohttp.
FAST_WS_HEADERS = FAST_HEADERS | frozenset({
    b"upgrade", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"origin",
})
#: the canonical base64 spelling of a 16-byte key (what every client sends); aiohttp also takes
#: other spellings (its decoder skips stray characters): those stay on aiohttp
_WS_KEY = re.compile(rb"[A-Za-z0-9+/]{21}[AQgw]==")
#: ``Connection`` tokens of a fast-lane handshake (browsers send ``Upgrade`` or
#: ``keep-alive, Upgrade``)
_WS_CONNECTION = frozenset({b"upgrade", b"keep-alive"})
_METHODS = {b"GET": Outcome.STREAM, b"PUT": Outcome.PUBLISH, b"POST": Outcome.PUBLISH,
            b"HEAD": Outcome.HEAD}


def _stream_format(headers: Mapping[bytes, bytes]) -> StreamFormat:
    """The format a subscription asks for: the first rule that claims it wins."""
    upgrade = headers.get(b"upgrade")
    if upgrade is not None and upgrade.strip().lower() == b"websocket":
        return StreamFormat.WEBSOCKET
    accept = headers.get(b"accept")
    if accept is not None:
        low = accept.lower()
        if b"text/event-stream" in low:
            return StreamFormat.SSE
        if low.lstrip().startswith(b"text/html"):
            return StreamFormat.PAGE
    return StreamFormat.NDJSON


def _fast_websocket(headers: Mapping[bytes, bytes]) -> bool:
    """Is this WebSocket handshake the plain shape the fast lane answers exactly as aiohttp?"""
    if not FAST_WS_HEADERS.issuperset(headers) or b"content-length" in headers:
        return False
    if headers[b"upgrade"].strip().lower() != b"websocket" or headers.get(b"sec-websocket-version") != b"13":
        return False
    key = headers.get(b"sec-websocket-key")
    if key is None or _WS_KEY.fullmatch(key) is None:
        return False
    tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
    return b"upgrade" in tokens and _WS_CONNECTION.issuperset(tokens)


def negotiate(method: bytes, version: str, headers: Mapping[bytes, bytes]) -> Decision:
    """Decide outcome and lane for a request head.

    ``version`` is ``"1.1"``-shaped; ``headers`` maps lower-case names to raw values (one
    value per name: a fast-lane head that repeats a name never reaches here).
    """
    outcome = _METHODS.get(method, Outcome.OTHER)
    if outcome is Outcome.OTHER:
        return OTHER
    if version != "1.0" and version != "0.9" and b"host" not in headers:
        return NO_HOST  # RFC 9112 section 3.2: 400 for an HTTP/1.1 request without Host
    fast = version == "1.1" and FAST_HEADERS.issuperset(headers)
    if fast:
        conn = headers.get(b"connection")
        fast = conn is None or conn.lower() == b"keep-alive"
    if outcome is Outcome.PUBLISH:
        return FAST_PUBLISH if fast and b"content-length" in headers else PUBLISH
    if outcome is Outcome.HEAD:
        return HEAD
    fmt = _stream_format(headers)
    if fmt is StreamFormat.WEBSOCKET:  # a browser's handshake carries Origin and its own headers
        if version == "1.1" and _fast_websocket(headers):
            return FAST_WEBSOCKET
        return STREAMS[fmt]
    if fmt is StreamFormat.SSE:  # what an EventSource sends: exactly this Accept
        if fast and b"content-length" not in headers and headers[b"accept"].strip() == _SSE_ACCEPT:
            return FAST_SSE
        return STREAMS[fmt]
    if fmt is not StreamFormat.NDJSON:
        return STREAMS[fmt]
    if fast and b"content-length" not in headers:
        accept = headers.get(b"accept")
        if accept is None or accept.strip() in _ANY_ACCEPT:
            return FAST_STREAM
    return STREAMS[StreamFormat.NDJSON]
