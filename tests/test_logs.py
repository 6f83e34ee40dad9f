"""Log lines: nothing a client sends can forge a line or break the JSON (both formats)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import Iterator

import pytest

from server.logs import (
    ACCESS_LOGGER,
    FORMAT,
    BufferedLineHandler,
    JsonFormatter,
    TextFormatter,
    access_sink,
    escape,
    log_access,
    log_publish,
)
from tests.support import HOST, Daemon, DaemonFactory, put

HOSTILE = ["a\nFORGED 2026-01-01 00:00:00,000 INFO x: y", "\r\x00\x1b[2J\x7f\x85", "\u2028\u2029",
           "\udcff\udc80", '"}{"level":"CRITICAL', "é漢字 plain"]


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_leaves_one_printable_line(text: str) -> None:
    out = escape(text)
    assert out.isprintable() or not any(ord(c) < 32 for c in out)
    assert "\n" not in out and "\r" not in out and "\u2028" not in out
    out.encode("utf-8")  # no lone surrogate left


def test_escape_is_the_identity_on_printable_text() -> None:
    s = "GET /a/b?c=d HTTP/1.1 \"curl/8\" é"
    assert escape(s) is s


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("pypubsub.access", logging.INFO, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


@pytest.mark.parametrize("text", HOSTILE)
def test_text_and_json_formatters_keep_one_line(text: str) -> None:
    r = record('%s "%s"', "1.2.3.4", text, remote_address="1.2.3.4", first_request_line=text,
               response_status=202, request_header={"User-Agent": text})
    line = TextFormatter("%(levelname)s %(message)s").format(r)
    assert len(line.splitlines()) == 1 and "\x1b" not in line
    obj = json.loads(JsonFormatter().format(r))
    assert obj["level"] == "INFO" and obj["logger"] == "pypubsub.access"
    assert obj["peer"] == "1.2.3.4" and obj["status"] == 202
    assert obj["request"] == escape(text) and obj["user_agent"] == escape(text)
    assert obj["time"].endswith("Z")


def test_a_traceback_cannot_pass_for_a_log_line() -> None:
    try:
        raise ValueError("bad\nFORGED line")
    except ValueError:
        r = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = TextFormatter("%(levelname)s %(message)s").format(r)
    assert all(ln.startswith("  ") for ln in text.splitlines()[1:])
    assert "\nFORGED" not in text
    obj = json.loads(JsonFormatter().format(r))
    assert "Traceback" in obj["traceback"] and "\n" not in obj["traceback"]


def test_log_access_gives_the_json_formatter_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "pypubsub.access"):
        log_access("10.0.0.1", "PUT /x HTTP/1.1", 202, 39, 0.001, "ua\nFORGED")
    obj = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert obj["peer"] == "10.0.0.1" and obj["bytes"] == 39 and obj["user_agent"] == "ua\\nFORGED"


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def hostile_requests(d: Daemon) -> None:
    # a bare LF and an escape sequence inside a User-Agent, a control byte in the path
    await raw(d.port, b"PUT /t HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                      b"User-Agent: x\nFORGED 2026 ERROR fake: line\x1b[31m\r\n\r\n{}")
    await raw(d.port, b"PUT /t%0aFORGED HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                      b"User-Agent: \xff\xfe\x85\r\n\r\n{}")
    await put(d, "/t", {"fine": True})


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_client_can_forge_a_log_line(daemon_factory: DaemonFactory, fmt: str) -> None:
    d = daemon_factory(args=["--log-format", fmt])
    await hostile_requests(d)
    d.wait_log('"PUT /t HTTP/1.1" 202' if fmt == "text" else '"status":202', count=1)
    assert d.stop() == 0
    lines = d.log().splitlines()
    assert not [ln for ln in lines if ln.startswith("FORGED")]
    assert "\x1b" not in d.log()
    if fmt == "json":
        objs = [json.loads(ln) for ln in lines]  # every line is one JSON object
        access = [o for o in objs if o["logger"] == "pypubsub.access"]
        assert access and all({"time", "level", "message", "peer", "request", "status"} <= o.keys()
                              for o in access)


async def test_server_log_format_json_from_the_config(daemon_factory: DaemonFactory) -> None:
    from tests.support import base_config, free_port

    port = free_port()
    d = daemon_factory(config=base_config(port, log_format="json"), port=port)
    await put(d, "/t", {"a": 1})
    assert d.stop() == 0
    objs = [json.loads(ln) for ln in d.log().splitlines()]
    assert any(o["message"].startswith("PyPubSub listening on") for o in objs)


# -- access lines taken raw (formatted when written): the same lines as through logging ----------
@pytest.fixture
def access_buffer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logging.Logger, BufferedLineHandler,
                                                                      io.StringIO]]:
    """The access logger with one buffered handler on a StringIO (restored after), the clock fixed."""
    lg = logging.getLogger(ACCESS_LOGGER)
    saved = lg.handlers[:], lg.filters[:], lg.propagate, lg.level
    out = io.StringIO()
    h = BufferedLineHandler(out)
    lg.handlers[:] = [h]
    lg.filters[:] = []
    lg.propagate = False
    lg.setLevel(logging.INFO)
    fixed_clock(monkeypatch)
    yield lg, h, out
    lg.handlers[:], lg.filters[:], lg.propagate = saved[0], saved[1], saved[2]
    lg.setLevel(saved[3])


def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.time() (logging's clock too) from a fixed start, a third of a second per call."""
    now = iter(1_780_000_000.0 + i * 0.3337 for i in range(1000))
    monkeypatch.setattr(time, "time", lambda: next(now))


def some_access_lines() -> None:
    for text in HOSTILE:
        raw_text = text.encode("utf-8", "surrogateescape")
        log_publish("127.0.0.1", b"PUT", b"/t/" + raw_text, 39, 0.000123, raw_text)
        log_access("::1", f"GET /s/{text} HTTP/1.1", 200, "-", 12.5, text)
    log_publish("127.0.0.1", b"POST", b"/a/b", 39, 1e-7, b"-")
    for seconds in (0.5, 1e-6, 12.25):  # the same fields again (a publisher's next publishes)
        log_publish("127.0.0.1", b"POST", b"/a/b", 39, seconds, b"-")
        log_access("::1", f"GET /s/{HOSTILE[0]} HTTP/1.1", 200, "-", seconds, HOSTILE[0])
    for target in (b"/m/1", b"/m/%2e", b"/m/3?q=1", b"/m/\x1b[2J"):  # a publisher to many topics
        log_publish("127.0.0.1", b"PUT", target, 39, 0.25, b"many/1")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_raw_access_lines_equal_the_logging_ones(
        access_buffer: tuple[logging.Logger, BufferedLineHandler, io.StringIO], fmt: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    lg, h, out = access_buffer
    lg.handlers[:] = [h]  # without pytest's capture handlers, added for the test's call
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(FORMAT))
    assert access_sink() is h
    some_access_lines()
    assert out.getvalue() == ""  # kept raw, in memory
    h.flush()
    fast = out.getvalue()
    out.seek(0)
    out.truncate()
    lg.addFilter(logging.Filter())  # a filter: every line through logging, as before
    fixed_clock(monkeypatch)
    assert access_sink() is None
    some_access_lines()
    h.flush()
    assert out.getvalue() == fast
    assert len(fast.splitlines()) == 2 * len(HOSTILE) + 11 and "\x1b" not in fast
    if fmt == "json":
        assert all(json.loads(ln)["logger"] == ACCESS_LOGGER for ln in fast.splitlines())


def test_raw_access_lines_keep_their_order_and_follow_the_format(
        access_buffer: tuple[logging.Logger, BufferedLineHandler, io.StringIO]) -> None:
    lg, h, out = access_buffer
    lg.handlers[:] = [h]  # without pytest's capture handlers, added for the test's call
    h.setFormatter(TextFormatter(FORMAT))
    log_publish("p1", b"PUT", b"/1", 39, 0.1, b"-")
    lg.info("between")  # through logging: written after the raw line before it
    log_publish("p2", b"PUT", b"/2", 39, 0.1, b"-")
    h.setFormatter(logging.Formatter("%(levelname)s|%(message)s"))  # a format changed meanwhile
    assert access_sink() is None  # a formatter we do not know: logging's way from now on
    log_publish("p3", b"PUT", b"/3", 39, 0.1, b"-")
    h.flush()
    lines = out.getvalue().splitlines()
    assert [ln.split("pypubsub.access: ")[-1] for ln in lines[:2]] == [
        'p1 "PUT /1 HTTP/1.1" 202 39 0.100000 "-"', "between"]
    assert lines[2:] == ['INFO|p2 "PUT /2 HTTP/1.1" 202 39 0.100000 "-"',
                         'INFO|p3 "PUT /3 HTTP/1.1" 202 39 0.100000 "-"']


def test_no_raw_access_lines_unless_the_configuration_allows(
        access_buffer: tuple[logging.Logger, BufferedLineHandler, io.StringIO]) -> None:
    lg, h, out = access_buffer
    lg.handlers[:] = [h]  # without pytest's capture handlers, added for the test's call
    h.setFormatter(TextFormatter(FORMAT))
    assert access_sink() is h
    lg.setLevel(logging.WARNING)
    assert access_sink() is None
    log_publish("p", b"PUT", b"/quiet", 39, 0.1, b"-")
    lg.setLevel(logging.INFO)
    lg.propagate = True
    assert access_sink() is None
    lg.propagate = False
    h.addFilter(logging.Filter("elsewhere"))  # refuses every access line
    assert access_sink() is None
    log_publish("p", b"PUT", b"/filtered", 39, 0.1, b"-")
    h.filters.clear()
    lg.addHandler(logging.NullHandler())
    assert access_sink() is None
    h.flush()
    assert out.getvalue() == ""
