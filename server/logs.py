"""Logging set-up: the error log (unbuffered) and the access log (buffered, flushed often).

Owns handlers and formats only. The access log gets one line per request; writing each line
with its own flush cost a third of a publish's CPU, so access lines are buffered and flushed
every :data:`ACCESS_FLUSH_INTERVAL` seconds, when the buffer is large, and at shutdown. Error
and warning lines are never buffered.

Every line goes through one escaping function (:func:`escape`), applied by the formatters to
the whole message and to every request field: a client controls paths, headers, user names
and bodies, and none of it may start a new line or break the JSON of ``--log-format json``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, TextIO

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.tasks import cancel_and_wait

__all__ = [
    "ACCESS_LOGGER",
    "LOG_FORMATS",
    "BufferedLineHandler",
    "JsonFormatter",
    "TextFormatter",
    "access_log_flusher",
    "access_sink",
    "escape",
    "log_access",
    "log_publish",
    "setup_logging",
]

ACCESS_LOGGER = "pypubsub.access"
#: seconds an access line may wait in memory before it is written
ACCESS_FLUSH_INTERVAL = 0.5
#: characters buffered before a write regardless of the timer
ACCESS_BUFFER_MAX = 64 * 1024
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_INFO = logging.getLevelName(logging.INFO)
#: raw access lines kept before they are formatted into the buffer
_RAW_MAX = 512
LOG_FORMATS = ("text", "json")


def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
    table.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t"})
    # line and paragraph separators (some viewers break lines there); lone surrogates
    # (undecodable header bytes) would also make the JSON encoder fail
    table.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0xd800, 0xe000))})
    return table


_ESCAPES = _escape_table()


def escape(text: str) -> str:
    """``text`` with control characters, line separators and lone surrogates written as
    ``\\n``, ``\\x1b``, ``\\u2028``...: what a client sent can never start a log line."""
    return text if text.isprintable() else text.translate(_ESCAPES)


#: aiohttp's access-log ``extra`` keys → the JSON field names
ACCESS_FIELDS = {"remote_address": "peer", "first_request_line": "request",
                 "response_status": "status", "response_size": "bytes",
                 "request_time_frac": "seconds"}


#: the message of :func:`log_access` lines: its arguments are the request fields, in order
ACCESS_MESSAGE = '%s "%s" %d %s %.6f "%s"'
ACCESS_ARGS = ("peer", "request", "status", "bytes", "seconds", "user_agent")
#: ACCESS_MESSAGE around its duration field (a text line keeps these parts per distinct fields)
_BEFORE_DURATION, _AFTER_DURATION = ACCESS_MESSAGE.split("%.6f")
#: a whole text access line from its time text, milliseconds, the text up to the duration, the
#: duration and the text after it (see TextFormatter.access_lines)
_TEXT_LINE = "%s,%03d%s%.6f%s"
#: distinct (peer, request line, status, size, user agent) whose line text is kept
_PARTS_MAX = 1024
#: a fast-lane publish's text access line: its time text, milliseconds, the text up to its
#: request target, the target, the text from the target to the duration, the duration and the
#: text after it (see TextFormatter.access_lines)
_TARGET_LINE = "%s,%03d%s%s%s%.6f%s"


def log_access(peer: str, request_line: str, status: int, size: int | str, seconds: float,
               user_agent: str) -> None:
    """One access line (fast lane, streams) in aiohttp's format. The fields travel as the
    record's arguments only (no ``extra`` dict per request): the JSON formatter names them."""
    sink = access_sink()
    if sink is not None:
        sink.add_access((time.time(), peer, request_line, status, size, seconds, user_agent))
    elif access_logger.isEnabledFor(logging.INFO):
        access_logger.info(ACCESS_MESSAGE, peer, request_line, status, size, seconds, user_agent)


def log_publish(peer: str, method: bytes, target: bytes, size: int, seconds: float,
                user_agent: bytes) -> None:
    """The access line of a publish the fast lane answered 202 (HTTP/1.1): the same line as
    :func:`log_access` writes, its request line and user agent decoded only when written."""
    sink = access_sink()
    if sink is not None:
        sink.add_access((time.time(), peer, (method, target), 202, size, seconds, user_agent))
    elif access_logger.isEnabledFor(logging.INFO):
        access_logger.info(ACCESS_MESSAGE, peer, _request_line((method, target)), 202, size, seconds,
                           user_agent.decode("latin-1"))


def _request_line(request: tuple[bytes, bytes]) -> str:
    return f"{request[0].decode()} {request[1].decode('latin-1')} HTTP/1.1"


#: an access line kept raw until its handler writes it:
#: (created, peer, request line or (method, target), status, size, seconds, user agent)
RawAccess = tuple[float, str, "str | tuple[bytes, bytes]", int, "int | str", float, "str | bytes"]


def access_sink() -> BufferedLineHandler | None:
    """The handler that takes access lines raw (formatted when written, not per request), or None
    when the access logger's configuration needs each line to go through ``logging``: a level
    above INFO, filters, propagation, another handler or a formatter of unknown format."""
    lg = access_logger
    if lg.filters or lg.propagate or lg.disabled or not lg.isEnabledFor(logging.INFO):
        return None
    hs = lg.handlers
    if len(hs) != 1:
        return None
    h = hs[0]
    if type(h) is not BufferedLineHandler or h.filters or h.level > logging.INFO:
        return None
    return h if _access_formatter(h.formatter) is not None else None


def _access_formatter(f: logging.Formatter | None) -> TextFormatter | JsonFormatter | None:
    """``f`` if it can format raw access lines itself (our text format, or JSON), else None."""
    if type(f) is JsonFormatter:
        return f
    if type(f) is TextFormatter and f._fmt == FORMAT and type(f._style) is logging.PercentStyle:
        return f
    return None


access_logger = logging.getLogger(ACCESS_LOGGER)


class CachedTimeFormatter(logging.Formatter):
    """The standard format, with the date/time text built once per second, not per record."""

    _sec = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, _datefmt: str | None = None) -> str:
        sec = int(record.created)
        if sec != self._sec:
            self._sec = sec
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{self._text},{int(record.msecs):03d}"


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text or ""
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}" if text else record.stack_info
    return text


def _around_target(peer: str, method: bytes, status: int, n: int | str, ua: str | bytes
                   ) -> tuple[str, str, str]:
    """The text of a text access line of a request ``(method, target)`` between its time and its
    target, from its target to its duration, and after it: :func:`_around_duration` split at the
    target (escaping is character by character, so the parts escaped apart are the whole
    escaped)."""
    if type(ua) is bytes:
        ua = ua.decode("latin-1")
    before, _, after = _BEFORE_DURATION.partition('"%s"')
    return (f" {_INFO} {ACCESS_LOGGER}: " + escape(before % peer + f'"{method.decode()} '),
            escape(' HTTP/1.1"' + after % (status, n)), escape(_AFTER_DURATION % ua))


def _around_duration(peer: str, request: str | tuple[bytes, bytes], status: int, n: int | str,
                     ua: str | bytes) -> tuple[str, str]:
    """The text of a text access line between its time and its duration, and after it (the
    message escaped as :meth:`TextFormatter.format` escapes it: character by character)."""
    if type(request) is tuple:
        request = _request_line(request)
    if type(ua) is bytes:
        ua = ua.decode("latin-1")
    return (f" {_INFO} {ACCESS_LOGGER}: " + escape(_BEFORE_DURATION % (peer, request, status, n)),
            escape(_AFTER_DURATION % ua))


class TextFormatter(CachedTimeFormatter):
    """``time LEVEL logger: message``, the message escaped; a traceback's lines are indented
    (and escaped), so that no line of it can pass for a log line."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        #: the constant parts of access lines by their fields (see :meth:`access_lines`)
        self._parts: dict[tuple[object, ...], tuple[str, ...]] = {}

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        tb = _traceback(self, record)
        if tb:
            line += "".join(f"\n  {escape(t)}" for t in tb.splitlines())
        return line

    def access_lines(self, raw: list[RawAccess]) -> str:
        """What :meth:`format` makes of each raw access line (an INFO record of the access logger
        with ``ACCESS_MESSAGE``; for the format :data:`FORMAT` only), each ended by a newline.

        The text around the duration (level, logger's name, peer, request line, status, size;
        the user agent) is built and escaped once per distinct set of those fields (a publisher
        sends the same ones each time), so a line is one ``%`` of the time and duration. A
        fast-lane request ``(method, target)`` whose target is not the line before's has its
        parts kept without the target (a publisher to many topics sends many targets), and its
        target escaped in the line.
        """
        lines = []
        parts = self._parts
        prev = None
        for created, peer, request, status, n, seconds, ua in raw:
            sec = int(created)
            if sec != self._sec:
                self._sec = sec
                self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
            if type(request) is tuple and request[1] != prev:
                prev = request[1]
                key: tuple[object, ...] = (peer, request[0], status, n, ua)
                split = parts.get(key)
                if split is None:
                    if len(parts) >= _PARTS_MAX:
                        parts.clear()
                    split = parts[key] = _around_target(peer, request[0], status, n, ua)
                target = request[1].decode("latin-1")
                lines.append(_TARGET_LINE % (self._text, int((created - sec) * 1000), split[0],
                                             target if target.isprintable() else escape(target),
                                             split[1], seconds, split[2]))
                continue
            key = (peer, request, status, n, ua)
            around = parts.get(key)
            if around is None:
                if len(parts) >= _PARTS_MAX:
                    parts.clear()
                around = parts[key] = _around_duration(peer, request, status, n, ua)
            lines.append(_TEXT_LINE % (self._text, int((created - sec) * 1000), around[0], seconds,
                                       around[1]))
        lines.append("")
        return "\n".join(lines)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the request
    fields of access lines (peer, request, status, bytes, seconds, user_agent) and a traceback."""

    _sec = -1
    _text = ""

    def _time(self, record: logging.LogRecord) -> str:
        sec = int(record.created)
        if sec != self._sec:  # the date text is built once per second, not per record
            self._sec = sec
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        d = record.__dict__
        args = record.args
        if record.msg is ACCESS_MESSAGE and isinstance(args, tuple) and len(args) == len(ACCESS_ARGS):
            for field, v in zip(ACCESS_ARGS, args, strict=True):
                obj[field] = escape(v) if isinstance(v, str) else v
        for key, field in ACCESS_FIELDS.items():  # aiohttp's access lines
            if key in d:
                v = d[key]
                obj[field] = escape(v) if isinstance(v, str) else v
        headers = d.get("request_header")
        if isinstance(headers, Mapping) and "User-Agent" in headers:
            obj["user_agent"] = escape(str(headers["User-Agent"]))
        tb = _traceback(self, record)
        if tb:
            obj["traceback"] = escape(tb)
        return _json_line(obj)

    def access_line(self, created: float, args: tuple[Any, ...]) -> str:
        """What :meth:`format` makes of an INFO record of the access logger with ``ACCESS_MESSAGE``
        and ``args`` created at ``created``."""
        sec = int(created)
        if sec != self._sec:
            self._sec = sec
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        obj: dict[str, Any] = {
            "time": f"{self._text}.{int((created - sec) * 1000):03d}Z",
            "level": _INFO,
            "logger": ACCESS_LOGGER,
            "message": escape(ACCESS_MESSAGE % args),
        }
        for field, v in zip(ACCESS_ARGS, args, strict=True):
            obj[field] = escape(v) if isinstance(v, str) else v
        return _json_line(obj)


def _json_line(obj: dict[str, Any]) -> str:
    try:
        return orjson.dumps(obj, default=str).decode()
    except TypeError:  # a value orjson cannot encode: never lose the line
        return orjson.dumps({k: escape(str(v)) for k, v in obj.items()}).decode()


class BufferedLineHandler(logging.Handler):
    """Formats records into an in-memory buffer written to ``stream`` on :meth:`flush`."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._buf: list[str] = []
        self._size = 0
        #: access lines taken raw (:meth:`add_access`), formatted in order before anything else
        self._raw: list[RawAccess] = []

    def add_access(self, item: RawAccess) -> None:
        """Keep an access line raw (see :func:`access_sink`); it is formatted when written."""
        raw = self._raw
        raw.append(item)
        if len(raw) >= _RAW_MAX:
            self._format_raw()
            if self._size >= ACCESS_BUFFER_MAX:
                self.flush()

    def _format_raw(self) -> None:
        raw, self._raw = self._raw, []
        f = _access_formatter(self.formatter)
        if isinstance(f, TextFormatter):
            text = f.access_lines(raw)
            self._buf.append(text)
            self._size += len(text)
            return
        out = self._buf
        size = self._size
        for created, peer, request, status, n, seconds, ua in raw:
            if type(request) is tuple:
                request = _request_line(request)
            if type(ua) is bytes:
                ua = ua.decode("latin-1")
            args = (peer, request, status, n, seconds, ua)
            if f is not None:
                line = f.access_line(created, args) + "\n"
            else:  # the format changed since: the formatter's own way, as logging would
                record = access_logger.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, ACCESS_MESSAGE,
                                                  args, None)
                record.created = created
                record.msecs = int((created - int(created)) * 1000) + 0.0
                try:
                    line = self.format(record) + "\n"
                except (TypeError, ValueError):
                    self.handleError(record)
                    continue
            out.append(line)
            size += len(line)
        self._size = size

    def emit(self, record: logging.LogRecord) -> None:
        if self._raw:
            self._format_raw()  # lines stay in the order they were logged
        try:
            line = self.format(record) + "\n"
        except (TypeError, ValueError):
            self.handleError(record)
            return
        self._buf.append(line)
        self._size += len(line)
        if self._size >= ACCESS_BUFFER_MAX:
            self.flush()

    def flush(self) -> None:
        if self._raw:
            self._format_raw()
        if not self._buf:
            return
        data, self._buf, self._size = "".join(self._buf), [], 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken stream: nowhere left to log to
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        super().close()


class ClientErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (bad request line, oversized header...) as an ERROR with
    a traceback. It is the client's error, already answered with a 400: one INFO line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request refused (%d): %s", (
                exc.code, str(exc.message).splitlines()[0][:200])
            record.exc_info = record.exc_text = None
        return True


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter(FORMAT)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Error log and access log to stderr, in ``fmt`` (``text`` or ``json``); caller lookup
    off (the logging docs' optimisation). Called again, it switches the format."""
    logging._srcfile = None  # no findCaller() per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(getattr(logging, level.upper()))
    for h in root.handlers:
        h.setFormatter(_formatter(fmt))
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorFilter) for f in server_log.filters):
        server_log.addFilter(ClientErrorFilter())
    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False
    handlers = [h for h in access.handlers if isinstance(h, BufferedLineHandler)]
    if not handlers:
        handlers = [BufferedLineHandler(sys.stderr)]
        access.addHandler(handlers[0])
    for h in handlers:
        h.setFormatter(_formatter(fmt))


async def access_log_flusher(_app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: flush the access log periodically; a final flush on the way out."""
    handlers = [h for h in logging.getLogger(ACCESS_LOGGER).handlers
                if isinstance(h, BufferedLineHandler)]

    async def loop() -> None:
        for _ in iter(int, 1):  # until cancelled
            await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
            for h in handlers:
                h.flush()

    task = asyncio.get_running_loop().create_task(loop(), name="pypubsub-access-flush")
    yield
    await cancel_and_wait(task)
    for h in handlers:
        h.flush()
