"""The gate in front of aiohttp's connections: limits and the request-head deadline.

Owns :class:`Gate`, a thin protocol between a transport and aiohttp's ``RequestHandler`` that
counts the connection in :class:`server.limits.Limits` (at connection made and lost, as the fast
lane does), hands a connection over a limit to :class:`~server.limits.Refusal`, and closes a
connection whose first request head is not complete within ``server.header_timeout`` (a total,
not re-armed by each byte: aiohttp has no such deadline of its own). Every connection aiohttp
serves passes through one: TLS sites, sites without the fast lane, and the connections the fast
lane hands over. Also owns :class:`GateSite`, the site that puts a Gate in front of each
connection. It knows nothing of requests beyond the end of the first head.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web

from server.limits import HeadScan, Limits, Refusal, fd_of

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

__all__ = ["Gate", "GateSite", "ListenerSite"]


class Gate(asyncio.Protocol):
    """Forwards everything to its aiohttp handler; counts the connection while it is open."""

    __slots__ = ("factory", "handler", "limits", "peer", "resumed", "scan", "timer", "transport")

    def __init__(self, limits: Limits, factory: Callable[[], RequestHandler]) -> None:
        self.limits = limits
        self.factory = factory
        self.handler: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: None once the first head is complete (nothing more is timed)
        self.scan: HeadScan | None = HeadScan()
        self.timer: asyncio.TimerHandle | None = None
        #: what a replay waits on while writing is paused (:meth:`write_resumed`)
        self.resumed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        reason = self.limits.admit(self.peer, fd_of(transport))
        if reason is not None:
            Refusal.take(transport, self.limits, reason)
            return
        self._start(transport, asyncio.get_running_loop().time() + self.limits.header_timeout)

    @classmethod
    def adopt(cls, transport: asyncio.Transport, limits: Limits, factory: Callable[[], RequestHandler],
              peer: str, data: bytes, deadline: float, *, paused: bool = False) -> None:
        """Take a connection ``limits`` already counts (the fast lane's), with the bytes it has
        not answered; the first head must be complete by ``deadline`` (loop time). ``paused``:
        the transport has writing paused now (its next call is ``resume_writing()``)."""
        gate = cls(limits, factory)
        gate.peer = peer
        transport.set_protocol(gate)
        gate._start(transport, deadline)
        if paused:
            gate.pause_writing()
        if data:
            gate.data_received(data)

    def _start(self, transport: asyncio.BaseTransport, deadline: float) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_at(deadline, self._head_timeout)
        handler = self.handler = self.factory()
        handler.connection_made(transport)

    def _head_timeout(self) -> None:
        self.timer = None
        if self.scan is not None and self.transport is not None:
            self.limits.header_timeouts += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        scan = self.scan
        if scan is not None and scan.feed(data):
            self.scan = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self) -> None:
        if self.handler is not None:
            self.handler.eof_received()  # aiohttp's keeps the connection half-open as it decides

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()
        self._wake_writer()

    def write_resumed(self) -> asyncio.Future[None] | None:
        """A replay's wait while writing is paused (:class:`server.stream.WritePacing`).

        Paused is aiohttp's own flow-control state (``writing_paused``, set by the
        ``pause_writing()`` forwarded above, the state ``StreamWriter.drain()`` waits on); the
        wait is a Future rather than aiohttp's ``drain()`` coroutine so that a replay can wait
        on it and on the end of its stream at once without a task per pause. Resolved with
        aiohttp's: by ``resume_writing()`` or ``connection_lost()``.
        """
        handler = self.handler
        if handler is None or not handler.writing_paused or self.transport is None:
            return None
        fut = self.resumed
        if fut is None:
            fut = self.resumed = asyncio.get_running_loop().create_future()
        return fut

    def _wake_writer(self) -> None:
        fut, self.resumed = self.resumed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport = None
            self.limits.release(self.peer)
        handler = self.handler
        self.handler = None
        if handler is not None:
            handler.connection_lost(exc)
        self._wake_writer()


class ListenerSite(web.BaseSite):
    """A site on one host and port that opens its own listener (``_listener``), built on
    aiohttp's public ``BaseSite``; names the port actually bound."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 reuse_address: bool = True) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._reuse_address = reuse_address
        self._listener: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port once started (``port: 0`` picks a free one), else the one asked for."""
        if self._listener is not None:
            for sock in self._listener.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = self._host or "0.0.0.0"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"


class GateSite(ListenerSite):
    """A TCP (optionally TLS) site whose connections are served by aiohttp behind a :class:`Gate`.

    Built on aiohttp's public ``BaseSite``, as :class:`server.fastlane.FastLaneSite` is.
    """

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, limits: Limits, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 reuse_address: bool = True) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog,
                         reuse_address=reuse_address)
        self._limits = limits

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("runner not set up")
        limits = self._limits
        loop = asyncio.get_running_loop()
        self._server = self._listener = await loop.create_server(
            lambda: Gate(limits, server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=self._reuse_address)
