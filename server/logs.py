"""Logging set-up: the error log (unbuffered) and the access log (buffered, flushed often).

Owns handlers and formats only. The access log gets one line per request; writing each line
with its own flush cost a third of a publish's CPU, so access lines are buffered and flushed
every :data:`ACCESS_FLUSH_INTERVAL` seconds, when the buffer is large, and at shutdown. Error
and warning lines are never buffered.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.tasks import cancel_and_wait

__all__ = ["ACCESS_LOGGER", "BufferedLineHandler", "access_log_flusher", "setup_logging"]

ACCESS_LOGGER = "pypubsub.access"
#: seconds an access line may wait in memory before it is written
ACCESS_FLUSH_INTERVAL = 0.5
#: characters buffered before a write regardless of the timer
ACCESS_BUFFER_MAX = 64 * 1024
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


class BufferedLineHandler(logging.Handler):
    """Formats records into an in-memory buffer written to ``stream`` on :meth:`flush`."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._buf: list[str] = []
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
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


def setup_logging(level: str) -> None:
    """Error log and access log to stderr; caller lookup off (the logging docs' optimisation)."""
    logging._srcfile = None  # no findCaller() per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr, format=FORMAT)
    for h in logging.getLogger().handlers:
        h.setFormatter(CachedTimeFormatter(FORMAT))
    logging.getLogger("aiohttp.server").addFilter(ClientErrorFilter())
    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False
    handler = BufferedLineHandler(sys.stderr)
    handler.setFormatter(CachedTimeFormatter(FORMAT))
    access.addHandler(handler)


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
