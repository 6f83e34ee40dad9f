"""A re-chunking TCP relay for client tests: a real proxy between a client and the daemon.

Requests pass through untouched. The response headers pass through as one write; the body
(HTTP/1.1 chunked, one ``JSON\\n`` record per chunk, each ending ``\\n\\r\\n``) is re-cut so the
client's reads see what a real network under load does:

- ``pass``: as received;
- ``merge``: held until at least two whole records are buffered, then sent in one write;
- ``split``: sent in pieces of ``piece`` bytes, paced so they arrive as separate reads (cuts
  fall inside chunk-size lines, JSON and the CRLFs);
- ``straddle``: held until two records are buffered, then one write of the first record and
  half of the second; the rest goes with the next write (every read both ends a split record
  and starts another).

``block()`` makes new connections close at once (the client sees the server gone and backs off);
``stall()`` silences the open connections without closing them (a dead path: only the client's
silence timeout notices). The relay never interprets events beyond finding record ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

__all__ = ["MODES", "Relay"]

logger = logging.getLogger(__name__)

MODES = ("pass", "merge", "split", "straddle")
RECORD_END = b"\n\r\n"
HEAD_END = b"\r\n\r\n"
#: split mode's pause between pieces: lets each piece reach the client as its own read. It
#: paces the simulated network; no test result depends on it (merged pieces would still pass).
SPLIT_PACE = 0.002


@dataclass
class RelayStats:
    connections: int = 0
    refused: int = 0
    #: body writes holding two or more record ends (merged reads)
    merged_writes: int = 0
    #: body writes that end inside a record (split reads)
    split_writes: int = 0
    body_writes: int = 0
    stalled_bytes: int = 0


@dataclass(eq=False)
class _Conn:
    stalled: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Relay:
    def __init__(self, upstream_port: int, mode: str = "pass", host: str = "127.0.0.1",
                 piece: int = 5) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown relay mode {mode!r}")
        self.upstream = (host, upstream_port)
        self.host = host
        self.mode = mode
        self.piece = piece
        self.port = 0
        self.stats = RelayStats()
        self.blocked = False
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._handlers):
            t.cancel()
        for t in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def block(self) -> None:
        """New connections are closed at once (open ones go on)."""
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def stall(self) -> None:
        """Open connections stop delivering anything, but stay open."""
        for c in self._conns:
            c.stalled = True

    # -- internals --
    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.connections += 1
        uwriter: asyncio.StreamWriter | None = None
        conn = _Conn()
        try:
            if self.blocked:
                self.stats.refused += 1
                return
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.stats.refused += 1
                return
            sock = cwriter.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.add(conn)
            up = asyncio.create_task(self._pump_up(creader, uwriter))
            down = asyncio.create_task(self._pump_down(ureader, cwriter, conn))
            conn.tasks = [up, down]
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                for t in (up, down):
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await t
        finally:
            self._conns.discard(conn)
            for w in (cwriter, uwriter):
                if w is not None:
                    w.close()
            self._handlers.discard(task)

    async def _pump_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _pump_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: _Conn) -> None:
        head = bytearray()
        body = bytearray()
        in_body = False
        while data := await reader.read(65536):
            if conn.stalled:
                self.stats.stalled_bytes += len(data)
                continue
            if not in_body:
                head += data
                end = head.find(HEAD_END)
                if end < 0:
                    continue
                in_body = True
                body += head[end + len(HEAD_END):]
                writer.write(bytes(head[:end + len(HEAD_END)]))
                await writer.drain()
            else:
                body += data
            await self._flush(body, writer)

    async def _write(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        self.stats.body_writes += 1
        if data.count(RECORD_END) >= 2:
            self.stats.merged_writes += 1
        if not data.endswith(RECORD_END):
            self.stats.split_writes += 1
        writer.write(data)
        await writer.drain()

    async def _flush(self, body: bytearray, writer: asyncio.StreamWriter) -> None:
        if not body:
            return
        if self.mode == "pass":
            await self._write(bytes(body), writer)
            body.clear()
        elif self.mode == "split":
            for i in range(0, len(body), self.piece):
                await self._write(bytes(body[i:i + self.piece]), writer)
                await asyncio.sleep(SPLIT_PACE)
            body.clear()
        elif body.count(RECORD_END) >= 2:
            if self.mode == "merge":
                cut = body.rfind(RECORD_END) + len(RECORD_END)
            else:  # straddle: the first record end, then half-way into the next record
                first = body.find(RECORD_END) + len(RECORD_END)
                second = body.find(RECORD_END, first) + len(RECORD_END)
                cut = first + max(1, (second - first) // 2)
            await self._write(bytes(body[:cut]), writer)
            del body[:cut]
