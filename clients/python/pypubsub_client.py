#!/usr/bin/env python3
"""A PyPubSub client that survives real networks: standard library only, one file.

Owns reading a PyPubSub stream (HTTP/1.1 chunked or close-delimited, ``JSON\\n`` records,
optionally ``\\0``-terminated), turning it into events, and keeping it alive: reconnect with
exponential backoff and jitter, resume by ``X-Fetch-Since-Cursor`` from the last cursor seen,
reconnect when the server falls silent for longer than ``timeout``. Records may be split over
or merged within TCP reads; both are handled, and a line longer than ``max_line`` is skipped
(logged) without holding more than ``max_line`` bytes. It knows nothing of the server's insides.

Asyncio::

    async with listen("http://localhost:2069/commits", auth=("user", "pass")) as events:
        async for event in events:
            print(event["pubsub_topics"], event)

Blocking::

    for event in listen_blocking("http://localhost:2069/commits"):
        print(event)

Command line::

    python3 pypubsub_client.py listen URL [--user U] [--since EPOCH] [--pretty]
    python3 pypubsub_client.py publish URL '{"json": 1}'

The password for ``--user`` is read from ``$PUBSUB_PASSWORD`` (or asked for on a terminal).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import json
import logging
import os
import random
import re
import ssl as _ssl
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Backoff",
    "ChunkedDecoder",
    "LineBuffer",
    "Listener",
    "ProtocolError",
    "PubSubHTTPError",
    "apublish",
    "listen",
    "listen_blocking",
    "listen_forever",
    "publish",
]

__version__ = "1.0.0"

logger = logging.getLogger("pypubsub_client")

USER_AGENT = f"pypubsub-client/{__version__} (python)"
#: The server pings every 5 s by default; three missed pings and some slack mean a dead path.
DEFAULT_TIMEOUT = 16.0
#: How long to wait for the TCP (and TLS) connection and the response headers.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: A record longer than this is skipped: the daemon's default payload limit is 100 KiB, and
#: its stamped record adds a little; 1 MiB leaves room for servers configured higher while
#: bounding what one record can make us hold.
DEFAULT_MAX_LINE = 1024 * 1024
#: First backoff step and the cap (seconds); each delay is drawn uniformly from [0, step]
#: ("full jitter") so that a restarted server is not hit by every client at the same instant.
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 60.0
#: Response headers larger than this are not a PyPubSub server.
MAX_HEADER_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
CURSOR_KEY = "pubsub_cursor"
#: a cursor is opaque, but it goes back into a request header: visible ASCII, bounded
CURSOR_RE = re.compile(r"[\x21-\x7e]{1,256}")
PING_KEY = "stillalive"


class ProtocolError(Exception):
    """The server's bytes are not an HTTP stream we can read; the connection is dropped."""


class PubSubHTTPError(Exception):
    """The server answered with a status other than 200.

    4xx answers (except 408 and 429) are not retried: asking again would get the same answer.
    """

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {body.strip()[:200]}")
        self.status = status
        self.reason = reason
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status in (408, 429)


# -- pure parts: no sockets ---------------------------------------------------------------------
class LineBuffer:
    """Turns arbitrary slices of a byte stream into complete lines (without the ``\\n``).

    A line longer than ``max_line`` is dropped as it arrives (never held whole) and counted in
    :attr:`skipped`.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False
        self.skipped = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False
            elif len(self._buf) + nl - start > self.max_line:
                self._skip(len(self._buf) + nl - start)
            else:
                self._buf += data[start:nl]
                lines.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        if not self._discarding:
            self._buf += data[start:]
            if len(self._buf) > self.max_line:
                self._skip(len(self._buf))
                self._buf.clear()
                self._discarding = True
        return lines

    def _skip(self, size: int) -> None:
        self.skipped += 1
        logger.error("skipping a record of at least %d bytes (max_line is %d)", size, self.max_line)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)


class ChunkedDecoder:
    """Decodes an HTTP/1.1 ``Transfer-Encoding: chunked`` body fed in arbitrary slices."""

    #: a chunk-size line (with extensions) or trailer line longer than this is an error
    MAX_CONTROL_LINE = 4096

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # data bytes left in the current chunk
        self._state = "size"  # size | data | crlf | trailer | done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The body bytes contained in ``data``; raises ProtocolError on bad framing."""
        out = bytearray()
        self._buf += data
        buf = self._buf
        pos = 0
        while pos < len(buf) and not self.done:
            if self._state == "data":
                take = min(self._left, len(buf) - pos)
                out += buf[pos:pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > self.MAX_CONTROL_LINE:
                    raise ProtocolError("chunk framing line too long")
                break
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            pos = nl + 1
            if self._state == "crlf":
                if line:
                    raise ProtocolError("missing CRLF after chunk data")
                self._state = "size"
            elif self._state == "size":
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                if size < 0:
                    raise ProtocolError("negative chunk size")
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left = size
                    self._state = "data"
            elif not line:  # trailer section ends with an empty line
                self.done = True
        del buf[:pos]
        return bytes(out)


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in [0, min(cap, base*2**n)].

    :meth:`reset` after a connection that delivered data, so one blip costs little.
    """

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = DEFAULT_BACKOFF_CAP
    attempt: int = 0

    def next_delay(self) -> float:
        step = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return random.uniform(0, step)

    def reset(self) -> None:
        self.attempt = 0


def parse_record(line: bytes) -> dict[str, Any] | None:
    """The JSON object in one stream line, or None for a blank/NUL line or a non-object.

    0.7.4's svnpubsub framing ends records with ``\\n\\0``; the NUL then starts the next line.
    """
    line = line.strip(b"\0\r\t ")
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError as e:
        logger.error("skipping a record that is not JSON (%s): %.80r", e, line)
        return None
    if not isinstance(obj, dict):
        logger.error("skipping a record that is not a JSON object: %.80r", line)
        return None
    return obj


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# -- the connection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls: bool
    path: str
    host_header: str


def _target(url: str) -> _Target:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if any(c <= " " or c == "\x7f" for c in path):
        raise ValueError(f"the URL's path must be percent-encoded: {path!r}")
    host = u.hostname
    hh = f"[{host}]" if ":" in host else host
    if u.port:
        hh += f":{u.port}"
    return _Target(host, port, tls, path, hh)


class Listener:
    """A subscription that keeps itself alive; an async iterator and an async context manager.

    :attr:`cursor` is the last ``pubsub_cursor`` seen (persist it and pass it back as
    ``cursor=`` to resume after a restart of your program).
    """

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        since: float | None = None,
        cursor: str | None = None,
        pings: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_line: int = DEFAULT_MAX_LINE,
        backoff: Backoff | None = None,
        headers: Mapping[str, str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        reconnect: bool = True,
    ) -> None:
        self.url = url
        self._target = _target(url)
        self.auth = auth
        self.since = since
        self.cursor = cursor
        self.pings = pings
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_line = max_line
        self.backoff = backoff or Backoff()
        self.headers = dict(headers or {})
        self.ssl = ssl
        self.reconnect = reconnect
        #: connections that got a 200 answer
        self.connections = 0
        #: records skipped for exceeding max_line
        self.skipped = 0
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False
        self._gen: AsyncGenerator[dict[str, Any], None] | None = None
        self._stop: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Listener {self.url} cursor={self.cursor} connections={self.connections}>"

    # -- public API --
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop: close the connection and end the iteration (also from another task)."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()  # wakes a backoff wait
        self._drop()  # a pending read sees EOF and the iteration ends
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                await gen.aclose()
            except RuntimeError:  # another task is inside it: it ends on the EOF or the stop
                logger.debug("%s: closed while iterated elsewhere", self.url)

    # -- internals --
    def _request(self) -> bytes:
        t = self._target
        h = {"Host": t.host_header, "User-Agent": USER_AGENT, "Accept": "*/*"}
        if self.auth is not None:
            h["Authorization"] = basic_auth(*self.auth)
        if self.cursor is not None:
            h["X-Fetch-Since-Cursor"] = self.cursor
        elif self.since is not None:
            h["X-Fetch-Since"] = str(int(self.since))
        h.update(self.headers)
        lines = [f"GET {t.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _drop(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()

    async def _run(self) -> AsyncGenerator[dict[str, Any], None]:
        self._stop = stop = asyncio.Event()
        try:
            while not self._closed:
                delivered = False
                try:
                    async for ev in self._connection():
                        delivered = True
                        yield ev
                    logger.info("%s: stream ended", self.url)
                except PubSubHTTPError as e:
                    if not e.retryable:
                        raise
                    logger.warning("%s: %s", self.url, e)
                except (OSError, ProtocolError, asyncio.IncompleteReadError, TimeoutError) as e:
                    logger.warning("%s: connection lost: %s", self.url, e or type(e).__name__)
                finally:
                    self._drop()
                if not self.reconnect or self._closed:
                    return
                if delivered:
                    self.backoff.reset()
                delay = self.backoff.next_delay()
                logger.info("%s: reconnecting in %.2fs (cursor %s)", self.url, delay, self.cursor)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            self._drop()

    async def _connection(self) -> AsyncGenerator[dict[str, Any], None]:
        """One connection's events; ends at EOF, raises on errors."""
        t = self._target
        ctx: _ssl.SSLContext | None = None
        if t.tls:
            ctx = self.ssl or _ssl.create_default_context()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(t.host, t.port, ssl=ctx, server_hostname=t.host if ctx else None,
                                    limit=MAX_HEADER_BYTES),
            self.connect_timeout)
        self._writer = writer
        if self._closed:  # close() ran while we connected
            return
        asked = self.cursor
        writer.write(self._request())
        await writer.drain()
        status, reason, headers = await asyncio.wait_for(_read_head(reader), self.connect_timeout)
        if status != 200:
            body = b""
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                body = await asyncio.wait_for(reader.read(4096), 1.0)
            raise PubSubHTTPError(status, reason, body.decode("utf-8", "replace"))
        self.connections += 1
        if asked and headers.get("x-fetch-since-cursor-found", "").lower() == "false":
            logger.warning("%s: the server no longer holds cursor %s: events may have been missed",
                           self.url, asked)
        logger.info("%s: connected%s", self.url, f" (resuming after {asked})" if asked else "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        decoder = ChunkedDecoder() if chunked else None
        lines = LineBuffer(self.max_line)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(READ_SIZE), self.timeout)
                if not data:
                    return
                if decoder is not None:
                    data = decoder.feed(data)
                for line in lines.feed(data):
                    ev = parse_record(line)
                    if ev is None:
                        continue
                    if PING_KEY in ev and len(ev) == 1:
                        if self.pings:
                            yield ev
                        continue
                    cur = ev.get(CURSOR_KEY)
                    if isinstance(cur, str) and CURSOR_RE.fullmatch(cur):
                        self.cursor = cur
                    yield ev
                if decoder is not None and decoder.done:
                    return
        except TimeoutError:
            raise TimeoutError(f"no data for {self.timeout}s") from None
        finally:
            self.skipped += lines.skipped


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError("response headers too large") from None
    first, *rest = head.decode("latin-1").split("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {first[:80]!r}")
    headers: dict[str, str] = {}
    for h in rest:
        if ":" in h:
            k, v = h.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def listen(url: str, **kw: Any) -> Listener:
    """``async for event in listen(url, auth=(user, password), since=epoch, ...)``.

    See :class:`Listener` for the options; use ``async with`` for a prompt, clean close.
    """
    return Listener(url, **kw)


def listen_blocking(url: str, **kw: Any) -> Iterator[dict[str, Any]]:
    """The same events from plain blocking code (runs a private event loop in this thread).

    Must not be called from inside a running event loop. Closing the iterator (or leaving the
    ``for`` loop and dropping it) closes the connection.
    """
    loop = asyncio.new_event_loop()
    listener = Listener(url, **kw)
    it = listener.__aiter__()

    async def step() -> dict[str, Any] | None:
        try:
            return await it.__anext__()
        except StopAsyncIteration:
            return None

    try:
        while True:
            task = loop.create_task(step())
            try:
                ev = loop.run_until_complete(task)
            except BaseException:  # KeyboardInterrupt included: end the step before the loop
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        loop.run_until_complete(task)
                raise
            if ev is None:
                return
            yield ev
    finally:
        try:
            loop.run_until_complete(listener.close())
        finally:
            loop.close()


def listen_forever(callback: Callable[[dict[str, Any]], object], url: str, **kw: Any) -> None:
    """Call ``callback(event)`` for each event, blocking, until the callback raises."""
    for event in listen_blocking(url, **kw):
        callback(event)


# -- publishing ---------------------------------------------------------------------------------
def publish(url: str, event: Mapping[str, Any], *, auth: tuple[str, str] | None = None,
            timeout: float = 30.0, method: str = "PUT",
            ssl: _ssl.SSLContext | None = None) -> tuple[int, str]:
    """Publish ``event`` (a JSON object) to ``url``; returns (status, text). Raises
    PubSubHTTPError when the server refuses it and OSError when it cannot be reached."""
    _target(url)  # validates the URL
    req = urllib.request.Request(url, data=json.dumps(event).encode("utf-8"), method=method,
                                 headers={"Content-Type": "application/json", "User-Agent": USER_AGENT})
    if auth is not None:
        req.add_header("Authorization", basic_auth(*auth))
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl) as r:  # http(s) checked by _target
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        raise PubSubHTTPError(e.code, str(e.reason), body) from None


async def apublish(url: str, event: Mapping[str, Any], **kw: Any) -> tuple[int, str]:
    """:func:`publish` without blocking the event loop."""
    return await asyncio.to_thread(publish, url, event, **kw)


# -- command line -------------------------------------------------------------------------------
class NoPassword(Exception):
    """``--user`` was given but no password can be had: refuse rather than run anonymous."""


def _password(user: str | None) -> tuple[str, str] | None:
    """``(user, password)`` for ``--user``: from $PUBSUB_PASSWORD, else asked on a terminal.

    Raises :class:`NoPassword` when there is neither (or the password is empty): running
    anonymous instead would silently show only public events.
    """
    if user is None:
        return None
    pw = os.environ.get("PUBSUB_PASSWORD")
    if not pw and sys.stdin.isatty():
        pw = getpass.getpass(f"password for {user}: ")
    if not pw:
        raise NoPassword(f"--user {user} needs a password: set $PUBSUB_PASSWORD "
                         "(or run on a terminal to be asked)")
    return user, pw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pypubsub_client.py", description="PyPubSub client")
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("listen", help="print events (one JSON document per line)")
    lp.add_argument("url")
    lp.add_argument("--user", help="Basic auth user; password from $PUBSUB_PASSWORD")
    lp.add_argument("--since", type=float, help="first replay events since this epoch")
    lp.add_argument("--cursor", help="resume after this pubsub_cursor")
    lp.add_argument("--pretty", action="store_true", help="indent the JSON")
    lp.add_argument("--pings", action="store_true", help="print keep-alive pings too")
    lp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help="reconnect after this many seconds of silence")
    lp.add_argument("--max-line", type=int, default=DEFAULT_MAX_LINE)
    lp.add_argument("--backoff", type=float, default=DEFAULT_BACKOFF_BASE, help="first backoff step (s)")
    lp.add_argument("--backoff-cap", type=float, default=DEFAULT_BACKOFF_CAP)
    lp.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")
    pp = sub.add_parser("publish", help="publish one JSON object")
    pp.add_argument("url")
    pp.add_argument("json")
    pp.add_argument("--user")
    pp.add_argument("--method", default="PUT", choices=["PUT", "POST"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        auth = _password(args.user)
    except NoPassword as e:
        print(f"pypubsub_client: {e}", file=sys.stderr)
        return 2
    if args.cmd == "publish":
        try:
            obj = json.loads(args.json)
        except ValueError as e:
            print(f"not JSON: {e}", file=sys.stderr)
            return 2
        if not isinstance(obj, dict):
            print("the event must be a JSON object", file=sys.stderr)
            return 2
        try:
            status, text = publish(args.url, obj, auth=auth, method=args.method)
        except PubSubHTTPError as e:
            print(e, file=sys.stderr)
            return 1
        except OSError as e:
            print(f"cannot reach {args.url}: {e}", file=sys.stderr)
            return 1
        print(f"{status} {text.strip()}")
        return 0
    try:
        events = listen_blocking(args.url, auth=auth, since=args.since, cursor=args.cursor,
                                 pings=args.pings, timeout=args.timeout, max_line=args.max_line,
                                 backoff=Backoff(args.backoff, args.backoff_cap))
        for ev in events:
            sys.stdout.write(json.dumps(ev, indent=2 if args.pretty else None) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except PubSubHTTPError as e:
        print(e, file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
