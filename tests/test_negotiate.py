"""Unit tests of negotiate(): the allow-list that decides lane and outcome (no sockets)."""

from __future__ import annotations

import pytest

from server.negotiate import FAST_HEADERS, Lane, Outcome, StreamFormat, negotiate

H = {b"host": b"x"}


def test_plain_requests_take_the_fast_lane() -> None:
    d = negotiate(b"GET", "1.1", {**H, b"user-agent": b"curl/8", b"accept": b"*/*"})
    assert (d.lane, d.outcome, d.format) == (Lane.FAST, Outcome.STREAM, StreamFormat.NDJSON)
    d = negotiate(b"PUT", "1.1", {**H, b"content-length": b"2", b"content-type": b"application/json"})
    assert (d.lane, d.outcome) == (Lane.FAST, Outcome.PUBLISH)
    d = negotiate(b"GET", "1.1", {**H, b"connection": b"Keep-Alive", b"accept-encoding": b"gzip"})
    assert d.lane is Lane.FAST  # what python-requests (asfpy) sends
    d = negotiate(b"GET", "1.1", {**H, b"accept": b"text/event-stream", b"cache-control": b"no-cache",
                                  b"connection": b"keep-alive", b"user-agent": b"Mozilla/5.0"})
    assert (d.lane, d.outcome, d.format) == (Lane.FAST, Outcome.STREAM, StreamFormat.SSE)  # EventSource
    assert negotiate(b"GET", "1.0", {b"accept": b"text/event-stream"}).lane is Lane.AIOHTTP


@pytest.mark.parametrize(("headers", "fmt"), [
    ({b"accept": b"text/event-stream", b"last-event-id": b"c"}, StreamFormat.SSE),
    ({b"accept": b"text/event-stream", b"origin": b"http://a"}, StreamFormat.SSE),
    ({b"accept": b"text/event-stream, */*"}, StreamFormat.SSE),
    ({b"accept": b"text/event-stream", b"connection": b"close"}, StreamFormat.SSE),
    ({b"accept": b"text/event-stream", b"content-length": b"0"}, StreamFormat.SSE),
    ({b"accept": b"text/html,application/xhtml+xml,*/*;q=0.8"}, StreamFormat.PAGE),
    ({b"upgrade": b"websocket", b"connection": b"Upgrade"}, StreamFormat.WEBSOCKET),
    ({b"authorization": b"Basic eDp5"}, StreamFormat.NDJSON),
    ({b"x-fetch-since": b"0"}, StreamFormat.NDJSON),
    ({b"x-fetch-since-cursor": b"c"}, StreamFormat.NDJSON),
    ({b"last-event-id": b"c"}, StreamFormat.NDJSON),
    ({b"origin": b"http://a"}, StreamFormat.NDJSON),
    ({b"accept": b"application/json"}, StreamFormat.NDJSON),
    ({b"content-length": b"0"}, StreamFormat.NDJSON),
    ({b"connection": b"close"}, StreamFormat.NDJSON),
    ({b"x-unknown": b"1"}, StreamFormat.NDJSON),
])
def test_other_streams_go_to_aiohttp(headers: dict[bytes, bytes], fmt: StreamFormat) -> None:
    d = negotiate(b"GET", "1.1", {**H, **headers})
    assert (d.lane, d.outcome, d.format) == (Lane.AIOHTTP, Outcome.STREAM, fmt)


@pytest.mark.parametrize(("method", "version", "headers", "outcome"), [
    (b"PUT", "1.1", {b"transfer-encoding": b"chunked"}, Outcome.PUBLISH),
    (b"PUT", "1.1", {b"content-length": b"2", b"expect": b"100-continue"}, Outcome.PUBLISH),
    (b"PUT", "1.1", {b"content-length": b"2", b"authorization": b"Basic eDp5"}, Outcome.PUBLISH),
    (b"POST", "1.0", {b"content-length": b"2"}, Outcome.PUBLISH),
    (b"GET", "1.0", {}, Outcome.STREAM),
    (b"HEAD", "1.1", {}, Outcome.HEAD),
    (b"DELETE", "1.1", {}, Outcome.OTHER),
])
def test_aiohttp_lane(method: bytes, version: str, headers: dict[bytes, bytes], outcome: Outcome) -> None:
    d = negotiate(method, version, {**H, **headers})
    assert (d.lane, d.outcome) == (Lane.AIOHTTP, outcome)


def test_missing_host_is_refused_in_http_1_1_only() -> None:
    d = negotiate(b"PUT", "1.1", {b"content-length": b"2"})
    assert (d.lane, d.outcome) == (Lane.AIOHTTP, Outcome.BAD) and "Host" in d.reason
    assert negotiate(b"GET", "1.0", {}).outcome is Outcome.STREAM  # svnwcsub sends no Host


def test_decisions_are_shared_constants() -> None:
    """Negotiating allocates nothing: equal requests get the very same Decision object."""
    assert negotiate(b"GET", "1.1", dict(H)) is negotiate(b"GET", "1.1", dict(H))


def test_credentials_and_replay_headers_are_never_fast() -> None:
    for name in (b"authorization", b"cookie", b"x-fetch-since", b"x-fetch-since-cursor",
                 b"last-event-id", b"upgrade", b"origin", b"expect", b"transfer-encoding", b"te"):
        assert name not in FAST_HEADERS


WS = {**H, b"upgrade": b"websocket", b"connection": b"Upgrade",
      b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==", b"sec-websocket-version": b"13"}


@pytest.mark.parametrize("extra", [
    {},
    {b"connection": b"keep-alive, Upgrade", b"origin": b"http://x"},  # Firefox
    {b"origin": b"http://x", b"sec-websocket-extensions": b"permessage-deflate; client_max_window_bits",
     b"pragma": b"no-cache", b"cache-control": b"no-cache", b"user-agent": b"Mozilla/5.0",
     b"accept-encoding": b"gzip", b"accept-language": b"en"},  # Chromium
    {b"upgrade": b" WebSocket "},
    {b"sec-websocket-key": b"AAAAAAAAAAAAAAAAAAAAAw=="},
])
def test_a_plain_websocket_handshake_takes_the_fast_lane(extra: dict[bytes, bytes]) -> None:
    d = negotiate(b"GET", "1.1", {**WS, **extra})
    assert (d.lane, d.outcome, d.format) == (Lane.FAST, Outcome.STREAM, StreamFormat.WEBSOCKET)


@pytest.mark.parametrize("extra", [
    {b"sec-websocket-version": b"8"},
    {b"sec-websocket-version": b"13 "},
    {b"sec-websocket-key": b"abc"},
    {b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZR=="},  # non-zero trailing bits: aiohttp decides
    {b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ"},
    {b"sec-websocket-protocol": b"chat"},
    {b"authorization": b"Basic eDp5"},
    {b"cookie": b"a=b"},
    {b"last-event-id": b"c"},
    {b"content-length": b"0"},
    {b"connection": b"close, Upgrade"},
    {b"connection": b"keep-alive"},
    {b"x-unknown": b"1"},
])
def test_any_other_websocket_handshake_is_aiohttps(extra: dict[bytes, bytes]) -> None:
    d = negotiate(b"GET", "1.1", {**WS, **extra})
    assert (d.lane, d.outcome, d.format) == (Lane.AIOHTTP, Outcome.STREAM, StreamFormat.WEBSOCKET)
    assert negotiate(b"GET", "1.0", WS).lane is Lane.AIOHTTP
    no_key = {k: v for k, v in WS.items() if k != b"sec-websocket-key"}
    assert negotiate(b"GET", "1.1", no_key).lane is Lane.AIOHTTP
