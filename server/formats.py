"""Stream formats: the registry of how events travel on a subscriber's connection.

Owns, for each format, its framing of one event (the bytes the hub computes once per event and
shares between every subscriber of a group), its content type and response headers, its
keep-alive record, the record it opens with, its in-band notices (replay gaps) and how it ends.
Formats are plain values: nothing here does I/O or knows aiohttp. Which kind of stream a request
asks for is :func:`server.negotiate.negotiate`'s decision; :func:`stream_format` maps it (with
the HTTP version and User-Agent) to the registered format.

The hub (``hub/``) sees a format only as a :class:`hub.event.Framing`: an object it hashes by
identity and whose ``frame(event)`` it calls. HTTP chunk framing, Server-Sent Events and
WebSocket frames all live here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from hub.event import Event
from server.negotiate import StreamFormat as Requested

__all__ = [
    "FORMATS",
    "NDJSON",
    "NDJSON_NUL",
    "RAW",
    "RAW_NUL",
    "SSE",
    "SSE_RAW",
    "STREAM_CONTENT_TYPE",
    "WEBSOCKET",
    "StreamFormat",
    "Transfer",
    "chunk",
    "stream_format",
    "wire_format",
    "ws_close_frame",
    "ws_control_frame",
    "ws_text_frame",
]

#: The content type of NDJSON and svnpubsub streams (0.7.4's clients never look at it).
STREAM_CONTENT_TYPE = "application/vnd.pypubsub-stream"
SSE_CONTENT_TYPE = "text/event-stream"
#: What an EventSource waits before reconnecting (the SSE ``retry:`` field), in milliseconds.
SSE_RETRY_MS = 2000
#: WebSocket close codes we send (RFC 6455 section 7.4.1)
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008

#: Headers of every stream: no caching, and nginx must not buffer a stream.
_STREAM_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))


class Transfer(enum.Enum):
    """How the response body is delimited on the connection."""

    #: HTTP/1.1 ``Transfer-Encoding: chunked``, one record per chunk
    CHUNKED = "chunked"
    #: HTTP/1.0: the body ends when the connection closes
    CLOSE = "close"
    #: an upgraded connection carrying WebSocket frames
    WEBSOCKET = "websocket"


def chunk(record: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(record), record)


def _ws_header(opcode: int, n: int) -> bytes:
    # server-to-client frames are never masked: the same bytes serve every subscriber
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")


def ws_text_frame(payload: bytes) -> bytes:
    """One unfragmented, uncompressed WebSocket text frame (FIN set, opcode 1)."""
    return _ws_header(0x1, len(payload)) + payload


def ws_close_frame(code: int, reason: str = "") -> bytes:
    """A WebSocket close frame (opcode 8) with a status code and a short reason."""
    body = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    return _ws_header(0x8, len(body)) + body


def ws_control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A WebSocket ping (9) or pong (10) frame; a control frame's payload is at most 125 bytes."""
    return _ws_header(opcode, len(payload)) + payload


def _stillalive(now: float) -> bytes:
    return orjson.dumps({"stillalive": now})


def _sse_comment(now: float) -> bytes:
    # a comment line: EventSource ignores it, proxies see traffic
    return b": stillalive %.3f\n\n" % now


def _sse_id(cursor: str) -> bytes:
    # a line break would end the field early; our cursors have none, imported ones might
    return cursor.replace("\r", "").replace("\n", "").encode("utf-8")


def _sse_record(e: Event) -> bytes:
    return b"id: %s\ndata: %s\n\n" % (_sse_id(e.cursor), e.json)


class StreamFormat:
    """One stream format. Hashed by identity: the hub groups subscribers by it.

    ``frame`` gives the bytes of one event exactly as they go on the wire (chunk or WebSocket
    frame included), so a joined run of them is written with a single ``transport.write``.
    """

    __slots__ = ("_frame", "_keepalive", "_notice", "content_type", "ending", "headers", "name",
                 "opening", "overflow", "transfer")

    def __init__(self, name: str, transfer: Transfer, content_type: str | None,
                 frame: Callable[[Event], bytes], keepalive: Callable[[float], bytes], *,
                 opening: bytes = b"", notice: Callable[[str, Mapping[str, Any]], bytes] | None = None,
                 overflow: bytes = b"") -> None:
        self.name = name
        self.transfer = transfer
        self.content_type = content_type
        self._frame = frame
        self._keepalive = keepalive
        self._notice = notice
        #: response headers (besides Server and Date), in order
        self.headers: tuple[tuple[str, str], ...] = (
            ((("Content-Type", content_type),) if content_type else ()) + _STREAM_HEADERS)
        #: framed bytes written once when the stream opens (before any event)
        self.opening = opening
        #: framed bytes that end the stream cleanly at shutdown (b"": just close)
        self.ending = chunk(b"") if transfer is Transfer.CHUNKED else b""
        #: framed bytes written before dropping a subscriber too slow for its buffer
        self.overflow = overflow

    @property
    def chunked(self) -> bool:
        return self.transfer is Transfer.CHUNKED

    def frame(self, event: Event) -> bytes:
        """The framed record of ``event`` (the hub caches it per event: call ``event.wire``)."""
        return self._frame(event)

    def keepalive(self, now: float | None = None) -> bytes:
        """The framed keep-alive record sent every ``server.ping_interval``."""
        return self._keepalive(time.time() if now is None else now)

    def notice(self, kind: str, data: Mapping[str, Any]) -> bytes:
        """A framed in-band notice (``gap``), or b"" for formats that have none (NDJSON: 0.7.4's
        clients would take any object for an event)."""
        return self._notice(kind, data) if self._notice is not None else b""

    def __repr__(self) -> str:
        return f"<StreamFormat {self.name}>"


def _sse_notice(kind: str, data: Mapping[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode("ascii"), orjson.dumps(data))


def _ws_notice(kind: str, data: Mapping[str, Any]) -> bytes:
    return ws_text_frame(orjson.dumps({"pubsub_" + kind: data}))


#: HTTP/1.1 chunked, one ``JSON\n`` record per chunk (0.7.4's default).
NDJSON = StreamFormat(
    "chunked", Transfer.CHUNKED, STREAM_CONTENT_TYPE,
    lambda e: b"%x\r\n%s\n\r\n" % (len(e.json) + 1, e.json),
    lambda now: chunk(_stillalive(now) + b"\n"))
#: HTTP/1.1 chunked, one ``JSON\n\0`` record per chunk (``oldschoolers`` User-Agents).
NDJSON_NUL = StreamFormat(
    "chunked-nul", Transfer.CHUNKED, STREAM_CONTENT_TYPE,
    lambda e: b"%x\r\n%s\n\0\r\n" % (len(e.json) + 2, e.json),
    lambda now: chunk(_stillalive(now) + b"\n\0"))
#: HTTP/1.0 close-delimited body of ``JSON\n`` records (an HTTP/1.0 client with a User-Agent).
RAW = StreamFormat(
    "raw", Transfer.CLOSE, STREAM_CONTENT_TYPE,
    lambda e: e.json + b"\n", lambda now: _stillalive(now) + b"\n")
#: HTTP/1.0 close-delimited body of ``JSON\n\0`` records (svnpubsub's svnwcsub).
RAW_NUL = StreamFormat(
    "raw-nul", Transfer.CLOSE, STREAM_CONTENT_TYPE,
    lambda e: e.json + b"\n\0", lambda now: _stillalive(now) + b"\n\0")
#: Server-Sent Events over HTTP/1.1 chunks: ``id: <cursor>`` + ``data: <JSON>`` per event.
SSE = StreamFormat(
    "sse", Transfer.CHUNKED, SSE_CONTENT_TYPE,
    lambda e: chunk(_sse_record(e)),
    lambda now: chunk(_sse_comment(now)),
    opening=chunk(b"retry: %d\n\n" % SSE_RETRY_MS),
    notice=lambda kind, data: chunk(_sse_notice(kind, data)))
#: Server-Sent Events on an HTTP/1.0 connection (close-delimited).
SSE_RAW = StreamFormat(
    "sse-raw", Transfer.CLOSE, SSE_CONTENT_TYPE,
    _sse_record,
    _sse_comment,
    opening=b"retry: %d\n\n" % SSE_RETRY_MS,
    notice=_sse_notice)
#: WebSocket: one text frame per event carrying the NDJSON line's JSON object.
WEBSOCKET = StreamFormat(
    "websocket", Transfer.WEBSOCKET, None,
    lambda e: ws_text_frame(e.json),
    lambda now: ws_text_frame(_stillalive(now)),
    notice=_ws_notice,
    overflow=ws_close_frame(WS_POLICY_VIOLATION, "too slow: resume by cursor"))

#: Every format by name (the names are the ``transport`` label of the subscriber metrics).
FORMATS: dict[str, StreamFormat] = {
    f.name: f for f in (NDJSON, NDJSON_NUL, RAW, RAW_NUL, SSE, SSE_RAW, WEBSOCKET)}


def stream_format(requested: Requested, version: tuple[int, int], ua: str | None,
                  oldschoolers: tuple[str, ...]) -> StreamFormat:
    """The registered format serving what :func:`server.negotiate.negotiate` read from a
    subscription request (``Accept: text/event-stream``: SSE; ``Upgrade: websocket``: WebSocket;
    anything else: 0.7.4's NDJSON or svnpubsub framing, byte for byte)."""
    if requested is Requested.SSE:
        return SSE if version >= (1, 1) else SSE_RAW
    if requested is Requested.WEBSOCKET:
        return WEBSOCKET
    return wire_format(version, ua, oldschoolers)


def wire_format(version: tuple[int, int], ua: str | None, oldschoolers: tuple[str, ...]) -> StreamFormat:
    """0.7.4's framing choice, from the HTTP version and User-Agent (both lanes use it)."""
    nul = ua is None or any(o in ua for o in oldschoolers)
    if version < (1, 1):
        return RAW_NUL if nul else RAW
    # an HTTP/1.1 client without a User-Agent is not svnwcsub: only the list switches it
    if ua is not None and nul:
        return NDJSON_NUL
    return NDJSON
