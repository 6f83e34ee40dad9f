"""Connection limits: what is open, who may connect, how long a request head may take.

Owns :class:`Limits`, the one count of open connections that both lanes keep (the fast lane's
protocol and :class:`server.gate.Gate` in front of aiohttp's), updated only when a connection is
made or lost: a publish or a stream pays nothing for it. A connection over a limit is handed
to :class:`Refusal`, which answers its first request head with the same ``503`` whichever lane
accepted it. Also owns the rate-limited log of accept errors (:class:`AcceptErrorLog`).

It knows nothing of HTTP beyond finding the end of a request head, and nothing of aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import logging
import resource
import struct
import time
from email.utils import formatdate
from typing import Any, cast

from server import __version__

__all__ = ["ACCEPT_LOG_INTERVAL", "FD_RESERVE", "RETRY_AFTER", "AcceptErrorLog", "HeadScan",
           "Limits", "Refusal", "fd_of"]

logger = logging.getLogger(__name__)

#: seconds a refused client is told to wait before it reconnects
RETRY_AFTER = 5
#: file descriptors kept free for everything that is not a client connection (the event log,
#: Redis, LDAP, SQS, a log file reopened by logrotate): a connection accepted on a descriptor
#: above ``RLIMIT_NOFILE - FD_RESERVE`` is refused with 503 instead of starving those
FD_RESERVE = 32
#: at most one log line per this many seconds for each kind of refusal or accept error
ACCEPT_LOG_INTERVAL = 10.0
#: seconds a refused connection is kept open after its answer, so the client reads the answer
#: (a close with unread request bytes would reset the connection and lose it); also the most
#: a refused connection is given to send its request head
LINGER = 2.0
#: a head larger than this is answered (refused) without waiting for its end
MAX_HEAD = 16 * 1024

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _fd_ceiling() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(int(soft) - FD_RESERVE, 1)


class _Rate:
    """One log line per :data:`ACCEPT_LOG_INTERVAL` at most, with the count it stands for."""

    __slots__ = ("missed", "next_at")

    def __init__(self) -> None:
        self.next_at = 0.0
        self.missed = 0

    def due(self) -> int:
        """-1 when not due (the event is counted); else the events not logged since the last."""
        now = time.monotonic()
        if now < self.next_at:
            self.missed += 1
            return -1
        self.next_at = now + ACCEPT_LOG_INTERVAL
        n = self.missed
        self.missed = 0
        return n


class Limits:
    """Open connections, in total and per peer address, and the refusals they caused.

    ``admit`` and ``release`` are called once per connection (by whichever protocol accepted
    it), never per request. The per-address map holds only addresses with a connection open:
    it never grows beyond the number of open connections.
    """

    __slots__ = ("_fd_log", "_limit_log", "accept_errors", "fd_ceiling", "header_timeout",
                 "header_timeouts", "max_per_ip", "max_total", "open", "per_ip", "refused")

    def __init__(self, max_total: int = 0, max_per_ip: int = 0, header_timeout: float = 30.0) -> None:
        #: 0 disables each limit
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.header_timeout = header_timeout
        self.fd_ceiling = _fd_ceiling()
        self.open = 0
        self.per_ip: dict[str, int] = {}
        #: refusals by reason: "max_connections", "max_connections_per_ip", "file_descriptors"
        self.refused: dict[str, int] = {"max_connections": 0, "max_connections_per_ip": 0,
                                        "file_descriptors": 0}
        #: connections closed for not sending a complete request head in time
        self.header_timeouts = 0
        #: accept() calls that failed for lack of a resource (descriptors, buffers, memory)
        self.accept_errors = 0
        self._fd_log = _Rate()
        self._limit_log = _Rate()

    def admit(self, ip: str, fd: int) -> str | None:
        """Count a new connection from ``ip`` on descriptor ``fd``, or say (one line) why it is
        refused (then it is not counted)."""
        if fd >= self.fd_ceiling:
            return self._refuse("file_descriptors", self._fd_log, ip,
                                "out of file descriptors: try again later")
        if self.max_total and self.open >= self.max_total:
            return self._refuse("max_connections", self._limit_log, ip,
                                "too many connections: try again later")
        if self.max_per_ip:
            n = self.per_ip.get(ip, 0)
            if n >= self.max_per_ip:
                return self._refuse("max_connections_per_ip", self._limit_log, ip,
                                    "too many connections from your address: try again later")
            self.per_ip[ip] = n + 1
        self.open += 1
        return None

    def release(self, ip: str) -> None:
        """A connection :meth:`admit` counted has closed."""
        self.open -= 1
        if self.max_per_ip:
            n = self.per_ip.get(ip, 0) - 1
            if n > 0:
                self.per_ip[ip] = n
            else:
                self.per_ip.pop(ip, None)

    def _refuse(self, why: str, rate: _Rate, ip: str, reason: str) -> str:
        self.refused[why] += 1
        missed = rate.due()
        if missed >= 0:
            more = f"; {missed} more refused since the last report" if missed else ""
            if why == "file_descriptors":
                logger.warning("refusing new connections (503): descriptor %d of %d reached, the "
                               "last %d are kept for files and backends; %d open%s",
                               self.fd_ceiling, self.fd_ceiling + FD_RESERVE, FD_RESERVE, self.open, more)
            else:
                logger.warning("refusing new connections (503): server.%s reached (%d open, this "
                               "one from %s)%s", why, self.open, ip, more)
        return reason

    def stats(self) -> dict[str, int | dict[str, int]]:
        """Metric name (without ``pypubsub_``) → value, read at scrape time."""
        return {"connections": self.open, "connections_refused_total": dict(self.refused),
                "header_timeouts_total": self.header_timeouts,
                "accept_errors_total": self.accept_errors}


def fd_of(transport: asyncio.BaseTransport) -> int:
    """The connection's file descriptor (-1 if the transport has none)."""
    sock = transport.get_extra_info("socket")
    return int(sock.fileno()) if sock is not None else -1


class HeadScan:
    """Finds the end of the first request head in a byte stream (a blank line after content;
    blank lines before a request line are skipped, as HTTP parsers do)."""

    __slots__ = ("seen", "tail")

    def __init__(self) -> None:
        self.tail = b""
        self.seen = 0

    def feed(self, data: bytes) -> bool:
        """True once a complete head has arrived."""
        buf = self.tail + data if self.tail else data
        if not self.seen:
            buf = buf.lstrip(b"\r\n")
        self.seen += len(data)
        if b"\r\n\r\n" in buf or self.seen > MAX_HEAD:
            return True
        self.tail = buf[-3:]
        return False


def refusal_bytes(reason: str) -> bytes:
    body = (reason + "\n").encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nServer: PyPubSub/%s\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nRetry-After: %d\r\n"
            b"Connection: close\r\nDate: %s\r\n\r\n%s"
            % (__version__.encode(), len(body), RETRY_AFTER, formatdate(usegmt=True).encode(), body))


#: RFC 6455 section 1.3
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: RFC 6455 section 7.4.1 (IANA registry): "Try Again Later"
WS_TRY_AGAIN_LATER = 1013


def websocket_key(head: bytes) -> bytes | None:
    """The ``Sec-WebSocket-Key`` of a head that is a valid WebSocket opening handshake, else None."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"GET "):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if (headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in headers.get(b"connection", b"").lower()
            or headers.get(b"sec-websocket-version") != b"13"):
        return None
    return headers.get(b"sec-websocket-key") or None


def websocket_refusal_bytes(key: bytes, reason: str) -> bytes:
    """The handshake's answer, then a close frame with 1013 and the reason (a browser sees the
    code; a 503 to the handshake would only be a generic connection error)."""
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    payload = struct.pack("!H", WS_TRY_AGAIN_LATER) + reason.encode()[:123]
    return (b"HTTP/1.1 101 Switching Protocols\r\nServer: PyPubSub/%s\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
            % (__version__.encode(), accept) + bytes([0x88, len(payload)]) + payload)


class Refusal(asyncio.Protocol):
    """A connection over a limit: its first request head is answered with 503 and the reason
    (a WebSocket handshake: closed with 1013 and the reason), then it is closed. It never
    reaches a handler, so connected subscribers are unaffected."""

    __slots__ = ("answered", "buf", "limits", "reason", "timer", "transport", "ws")

    def __init__(self, limits: Limits, reason: str) -> None:
        self.limits = limits
        self.reason = reason
        self.buf = b""
        self.answered = False
        self.ws = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def take(cls, transport: asyncio.BaseTransport, limits: Limits, reason: str,
             data: bytes = b"") -> None:
        """Give ``transport`` (not counted by ``limits``) to a new Refusal."""
        r = cls(limits, reason)
        transport.set_protocol(r)
        r.connection_made(transport)
        if data:
            r.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # a refused connection holds a descriptor: a few seconds at most, however slow it is
        wait = min(self.limits.header_timeout, LINGER)
        self.timer = asyncio.get_running_loop().call_later(wait, self._close)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None:
            return
        if self.answered:  # after the answer: read and drop (see LINGER)
            if self.ws:
                t.close()  # the client's closing frame: the server closes the TCP connection
            return
        self.buf += data
        head = self.buf.lstrip(b"\r\n")
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= MAX_HEAD:
            return
        self.answered = True
        key = websocket_key(head[:end]) if end >= 0 else None
        self.buf = b""
        if key is not None:
            self.ws = True
            t.write(websocket_refusal_bytes(key, self.reason))
        else:
            t.write(refusal_bytes(self.reason))
            if t.can_write_eof():
                t.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(LINGER, self._close)

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def _close(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, _exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None


class AcceptErrorLog:
    """A loop exception handler: accept() failing for lack of a resource is counted and logged
    once per :data:`ACCEPT_LOG_INTERVAL` (asyncio reports every failed accept, hundreds a second
    at the descriptor limit); anything else goes to the loop's default handler."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rate = _Rate()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS
                and "accept" in str(context.get("message", ""))):
            self.limits.accept_errors += 1
            missed = self.rate.due()
            if missed >= 0:
                more = f"; {missed} more failed since the last report" if missed else ""
                logger.error("cannot accept connections: %s; the open connections are served%s",
                             exc.strerror, more)
            return
        loop.default_exception_handler(context)
