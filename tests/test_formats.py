"""Unit tests of the stream formats, their selection, and the CORS rules (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.event import make_event
from server.cors import Cors
from server.formats import (
    FORMATS,
    NDJSON,
    NDJSON_NUL,
    RAW,
    RAW_NUL,
    SSE,
    SSE_RAW,
    WEBSOCKET,
    chunk,
    stream_format,
    ws_close_frame,
    ws_text_frame,
)
from server.negotiate import StreamFormat as Requested
from server.negotiate import negotiate


def _unchunk(data: bytes) -> list[bytes]:
    out = []
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        out.append(rest[:n])
        assert rest[n:n + 2] == b"\r\n"
        data = rest[n + 2:]
    return out


def _ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode unmasked server frames: (opcode, payload)."""
    out = []
    while data:
        b0, b1 = data[0], data[1]
        assert b0 & 0x80 and not b1 & 0x80  # FIN set, never masked
        n, i = b1 & 0x7F, 2
        if n == 126:
            n, i = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, i = int.from_bytes(data[2:10], "big"), 10
        out.append((b0 & 0x0F, data[i:i + n]))
        data = data[i + n:]
    return out


def test_one_record_per_chunk_and_svnpubsub_framing() -> None:
    ev = make_event("/a", {"k": "v"})
    c = ev.wire(NDJSON)
    assert c == b"%x\r\n%s\n\r\n" % (len(ev.json) + 1, ev.json)
    assert ev.wire(NDJSON) is c  # serialised once, shared
    assert _unchunk(ev.wire(NDJSON_NUL)) == [ev.json + b"\n\0"]
    assert ev.wire(RAW_NUL) == ev.json + b"\n\0"
    assert ev.wire(RAW) == ev.json + b"\n"
    assert json.loads(RAW.keepalive(5.0)) == {"stillalive": 5.0}
    assert _unchunk(NDJSON.keepalive(5.0)) == [b'{"stillalive":5.0}\n']
    assert NDJSON.ending == b"0\r\n\r\n" and RAW.ending == b""


def test_sse_framing() -> None:
    ev = make_event("/a/b", {"k": "line\nbreak"})
    (rec,) = _unchunk(ev.wire(SSE))
    assert rec == b"id: %s\ndata: %s\n\n" % (ev.cursor.encode(), ev.json)
    assert ev.wire(SSE_RAW) == rec
    assert json.loads(rec.split(b"data: ", 1)[1]) == ev.payload  # the NDJSON line's object
    assert _unchunk(SSE.opening) == [b"retry: 2000\n\n"]
    (ka,) = _unchunk(SSE.keepalive(7.0))
    assert ka.startswith(b":") and ka.endswith(b"\n\n")  # a comment: EventSource ignores it
    (gap,) = _unchunk(SSE.notice("gap", {"reason": "x"}))
    assert gap == b'event: gap\ndata: {"reason":"x"}\n\n'
    assert NDJSON.notice("gap", {}) == b""  # 0.7.4 clients would take it for an event
    assert dict(SSE.headers)["Content-Type"] == "text/event-stream"
    assert dict(SSE.headers)["Cache-Control"] == "no-cache"
    assert dict(SSE.headers)["X-Accel-Buffering"] == "no"


def test_sse_id_cannot_break_the_record() -> None:
    ev = make_event("/a", {}, cursor="evil\nid: forged")
    (rec,) = _unchunk(ev.wire(SSE))
    assert rec.count(b"\n") == 3 and rec.startswith(b"id: evilid: forged\n")


@pytest.mark.parametrize("size", [0, 10, 125, 126, 1000, 65535, 65536, 200_000])
def test_websocket_text_frames(size: int) -> None:
    payload = b"x" * size
    assert _ws_frames(ws_text_frame(payload)) == [(1, payload)]


def test_websocket_event_and_control_records() -> None:
    ev = make_event("/a", {"k": 1})
    assert _ws_frames(ev.wire(WEBSOCKET)) == [(1, ev.json)]
    assert _ws_frames(ev.wire(WEBSOCKET) * 2) == [(1, ev.json)] * 2  # joined runs stay frames
    ((op, body),) = _ws_frames(WEBSOCKET.keepalive(3.0))
    assert op == 1 and json.loads(body) == {"stillalive": 3.0}
    ((op, body),) = _ws_frames(ws_close_frame(1001, "bye"))
    assert op == 8 and body == b"\x03\xe9bye"
    assert _ws_frames(WEBSOCKET.overflow)[0][0] == 8
    ((op, body),) = _ws_frames(WEBSOCKET.notice("gap", {"reason": "r"}))
    assert json.loads(body) == {"pubsub_gap": {"reason": "r"}}


def test_registry_names() -> None:
    assert set(FORMATS) == {"chunked", "chunked-nul", "raw", "raw-nul", "sse", "sse-raw", "websocket"}
    assert chunk(b"") == b"0\r\n\r\n"


OLD = ("svnwcsub",)


@pytest.mark.parametrize(("version", "headers", "expect"), [
    ("1.1", {"user-agent": "curl/8"}, NDJSON),
    ("1.1", {"user-agent": "curl/8", "accept": "*/*"}, NDJSON),
    ("1.1", {}, NDJSON),
    ("1.1", {"user-agent": "svnwcsub/1"}, NDJSON_NUL),
    ("1.0", {}, RAW_NUL),
    ("1.0", {"user-agent": "x"}, RAW),
    ("1.1", {"accept": "text/event-stream"}, SSE),
    ("1.1", {"accept": "application/json, Text/Event-Stream;q=0.9"}, SSE),
    ("1.0", {"accept": "text/event-stream"}, SSE_RAW),
    ("1.1", {"upgrade": "websocket", "accept": "text/html"}, WEBSOCKET),
    ("1.1", {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, None),  # the page
])
def test_negotiated_kind_maps_to_a_registered_format(version: str, headers: dict[str, str],
                                                     expect: object) -> None:
    raw = {k.encode(): v.encode() for k, v in {"host": "x", **headers}.items()}
    decision = negotiate(b"GET", version, raw)
    assert decision.format is not None
    if expect is None:
        assert decision.format is Requested.PAGE
        return
    v = (int(version[0]), int(version[2]))
    assert stream_format(decision.format, v, headers.get("user-agent"), OLD) is expect


def test_cors_rules() -> None:
    none = Cors(())
    assert not none.enabled and none.headers("https://a.example") == {}
    listed = Cors(("https://a.example",))
    h = listed.headers("https://A.example")
    assert h["Access-Control-Allow-Origin"] == "https://A.example" and h["Vary"] == "Origin"
    assert h["Access-Control-Allow-Credentials"] == "true"
    assert listed.headers("https://b.example") == {"Vary": "Origin"}
    star = Cors(("*",))
    h = star.headers("https://b.example")
    assert h["Access-Control-Allow-Origin"] == "https://b.example"
    assert "Access-Control-Allow-Credentials" not in h  # never with "*"
    pre = listed.preflight("https://a.example")
    assert pre["Access-Control-Allow-Methods"] == "GET, PUT, POST"
    assert pre["Access-Control-Allow-Headers"] == "Content-Type, Authorization, Last-Event-ID"
    assert "Access-Control-Allow-Methods" not in listed.preflight("https://b.example")


def test_websocket_origin_check() -> None:
    c = Cors(("https://a.example",))
    host = {"Host": "127.0.0.1:2069"}
    assert c.websocket_allowed(host, "http")  # no Origin: not a browser
    assert c.websocket_allowed({**host, "Origin": "http://127.0.0.1:2069"}, "http")  # our own page
    assert c.websocket_allowed({**host, "Origin": "https://a.example"}, "http")
    assert not c.websocket_allowed({**host, "Origin": "https://evil.example"}, "http")
    assert not c.websocket_allowed({**host, "Origin": "https://127.0.0.1:2069"}, "http")
    assert not Cors(()).websocket_allowed({**host, "Origin": "null"}, "http")


def test_a_missing_page_file_means_no_page(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server import page

    assert page.page_response("S") is not None
    monkeypatch.setattr(page, "PAGE_PATH", tmp_path / "gone.html")
    page.load_page.cache_clear()
    try:
        assert page.page_response("S") is None  # browsers then get the NDJSON stream
    finally:
        monkeypatch.undo()
        page.load_page.cache_clear()
    assert page.page_response("S") is not None
