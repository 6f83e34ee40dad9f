#!/usr/bin/env python3
"""Load-generating worker processes for ``bench/pubsub_bench.py`` (uvloop, raw asyncio Protocols).

Not meant to be run by hand: the orchestrator starts them, pinned to the load core.

    workers.py sub   hold subscriber connections (NDJSON, SSE or WebSocket) and count what they receive
    workers.py pub   publish events, as fast as they are accepted or at a fixed rate

Talking to the orchestrator: the first line on stdin is the JSON configuration (it can be
larger than a command line may be); then one JSON object per line on stdout, and one command
per line on stdin (``report``, ``latencies``, ``reset``, ``go``, ``stop``). A worker also exits by itself
when ``max_time`` runs out, so a crashed orchestrator never leaves load running.

What is measured and how:

* every published event carries ``"bench_ts":<send time, ns since the epoch>``; the daemon
  serialises it with orjson, so the marker bytes ``"bench_ts":`` appear exactly once per
  delivered event. A bulk subscriber counts deliveries by counting those bytes in what it reads
  (``bytes.count``: no JSON or chunk parsing on the hot path); a marker split across two reads
  is found by looking at the seam.
* latency is taken only by *probe* subscribers, a handful of ordinary subscribers living in
  their own process, so that their event loop is not busy with thousands of other sockets when
  the bytes arrive: latency = receive time - ``bench_ts``, both from the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

try:
    import uvloop
except ImportError:  # still works on the default loop, just with less headroom
    run = asyncio.run
else:
    run = uvloop.run

MARK = b'"bench_ts":'
SEAM = len(MARK) - 1  # a marker split by a read boundary has at most this many bytes each side
TS_RE = re.compile(rb'"bench_ts":(\d+)')
CONTENT_LENGTH_RE = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
#: How many connections are opened at once (the daemon's listen backlog is finite).
CONNECT_BATCH = 200
#: A hard cap on anything a worker loops over, besides its time limit.
MAX_STEPS = 100_000_000


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pin_to(cpus: list[int] | None) -> None:
    """Run on ``cpus`` only (those of them this process may use at all)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        allowed = os.sched_getaffinity(0).intersection(cpus)
        if allowed:
            os.sched_setaffinity(0, allowed)


def check_loopback(host: str) -> None:
    if not host.startswith("127."):
        raise SystemExit(f"workers.py: refusing non-loopback target {host}")


#: Longest line read from stdin: the configuration lists every subscriber's path.
MAX_CONFIG_LINE = 64 * 1024 * 1024


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_CONFIG_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# -- subscribers ----------------------------------------------------------------------------
@dataclass
class SubTotals:
    """What one subscriber process has seen, summed over its connections."""

    delivered: int = 0
    first_rx: float = 0.0
    last_rx: float = 0.0
    closed: int = 0
    latencies_us: list[int] = field(default_factory=list)


#: The request each transport's subscriber sends (the same URL: only the headers differ).
TRANSPORT_HEADERS = {
    "ndjson": "",
    "sse": "Accept: text/event-stream\r\n",
    "ws": ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: cHlwdWJzdWItYmVuY2gtMQ==\r\n"),
}
#: The status a transport's stream opens with.
TRANSPORT_STATUS = {"ndjson": b"200", "sse": b"200", "ws": b"101"}
#: A server's empty WebSocket ping (aiohttp's heartbeat) and the masked empty pong answering it.
WS_PING = b"\x89\x00"
WS_PONG = b"\x8a\x80\x00\x00\x00\x00"


#: One receive buffer for every connection of a process (reads happen one at a time): the
#: event loop reads straight into it and the markers are counted in place, no copy per read.
RECV_BUFFER = bytearray(256 * 1024)
RECV_VIEW = memoryview(RECV_BUFFER)


class Subscriber(asyncio.BufferedProtocol):
    """One streaming GET. Counts markers; a probe also records each event's latency."""

    def __init__(self, totals: SubTotals, request: bytes, probe: bool, transport: str = "ndjson") -> None:
        self.totals = totals
        self.request = request
        self.probe = probe
        self.ws = transport == "ws"
        self.status = TRANSPORT_STATUS[transport]
        # where a probe cuts what it has read into complete events: NDJSON and SSE records end
        # with a newline, a WebSocket text frame with the JSON object's closing brace
        self.eol = b"}" if self.ws else b"\n"
        self.ping_split = False
        self.got = 0
        self.head = b""  # response header bytes, until the blank line
        self.in_body = False
        self.seam = b""  # the last SEAM bytes of the previous read
        self.line = b""  # probes: the unfinished last line
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def get_buffer(self, _sizehint: int) -> memoryview:
        return RECV_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        if self.in_body:
            self._body(RECV_BUFFER, nbytes)
            return
        self.head += RECV_BUFFER[:nbytes]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        status = self.head[9:12]
        rest, self.head = self.head[end + 4:], b""
        self.in_body = True
        if status != self.status:
            self._fail(f"HTTP status {status.decode(errors='replace')}")
            return
        self.ready.set_result(None)
        if rest:
            self._body(rest, len(rest))

    def _body(self, buf: bytes | bytearray, nbytes: int) -> None:
        # Each marker is counted in the read where it ends: wholly inside this read, or begun
        # in the last SEAM bytes seen before it (shorter than a marker, so never one alone).
        n = buf.count(MARK, 0, nbytes)
        if self.ws:
            self._pong(buf, nbytes)
        if self.seam:
            n += (self.seam + buf[:min(SEAM, nbytes)]).count(MARK)
        if nbytes >= SEAM:
            self.seam = bytes(buf[nbytes - SEAM:nbytes])
        else:
            self.seam = (self.seam + buf[:nbytes])[-SEAM:]
        if n:
            now = time.time()
            t = self.totals
            t.delivered += n
            self.got += n
            if not t.first_rx:
                t.first_rx = now
            t.last_rx = now
        if self.probe:
            self._sample(bytes(buf[:nbytes]), time.time_ns())

    def _pong(self, buf: bytes | bytearray, nbytes: int) -> None:
        """Answer the daemon's protocol pings (it drops a WebSocket peer that does not).

        A one-byte ``find`` is a memchr: a two-byte ``count`` would cost the load core more
        than the daemon spends writing (JSON text never holds the byte 0x89)."""
        pings = 1 if self.ping_split and nbytes and buf[0] == 0 else 0
        self.ping_split = False
        i = buf.find(WS_PING[0], 0, nbytes)
        for _ in range(MAX_STEPS):
            if i < 0:
                break
            if i + 1 == nbytes:
                self.ping_split = True  # its second byte comes with the next read
            elif buf[i + 1] == 0:
                pings += 1
            i = buf.find(WS_PING[0], i + 1, nbytes)
        if pings and self.transport is not None:
            self.transport.write(WS_PONG * pings)

    def _sample(self, data: bytes, now_ns: int) -> None:
        buf = self.line + data
        cut = buf.rfind(self.eol) + 1
        self.line = buf[cut:]
        lat = self.totals.latencies_us
        for m in TS_RE.finditer(buf, 0, cut):
            lat.append((now_ns - int(m.group(1))) // 1000)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the response: {exc}"))
        elif self.ready.exception() is None:  # the server ended a stream that was open
            self.totals.closed += 1


async def connect_all(host: str, port: int, paths: list[str], probe: bool, totals: SubTotals,
                      deadline: float, transport: str = "ndjson") -> tuple[list[Subscriber], int, list[str]]:
    """Open one subscriber per path, CONNECT_BATCH at a time; returns (all, connected, errors)."""
    loop = asyncio.get_running_loop()
    subs: list[Subscriber] = []
    errors: list[str] = []
    for start in range(0, len(paths), CONNECT_BATCH):
        batch = []
        for path in paths[start:start + CONNECT_BATCH]:
            req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   f"User-Agent: pypubsub-bench\r\n{TRANSPORT_HEADERS[transport]}\r\n").encode()
            sub = Subscriber(totals, req, probe, transport)
            subs.append(sub)
            batch.append(loop.create_connection(lambda s=sub: s, host, port))  # type: ignore[misc]
        pending = asyncio.gather(*batch, return_exceptions=True)
        results = await asyncio.wait_for(pending, max(0.1, deadline - time.monotonic()))
        errors += [repr(r) for r in results if isinstance(r, BaseException)]
        answered = asyncio.gather(*(s.ready for s in subs[start:] if s.transport is not None),
                                  return_exceptions=True)
        replies = await asyncio.wait_for(answered, max(0.1, deadline - time.monotonic()))
        errors += [repr(r) for r in replies if isinstance(r, BaseException)]
    ok = sum(1 for s in subs if s.ready.done() and s.ready.exception() is None)
    return subs, ok, errors


async def run_subscribers(cfg: dict[str, Any], commands: asyncio.StreamReader) -> None:
    """Hold ``cfg["paths"]`` open; answer ``report`` with totals until ``stop`` or max_time."""
    deadline = time.monotonic() + float(cfg["max_time"])
    expected: list[int] = cfg["expected"]
    totals = SubTotals()
    subs, ok, errors = await connect_all(cfg["host"], int(cfg["port"]), cfg["paths"],
                                         bool(cfg["probe"]), totals, deadline,
                                         str(cfg.get("transport", "ndjson")))
    emit({"ready": ok, "errors": errors[:5], "n_errors": len(errors)})
    for _ in range(MAX_STEPS):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            line = await asyncio.wait_for(commands.readline(), left)
        except TimeoutError:
            break
        cmd = line.strip().decode()
        if cmd == "report":
            short = extra = 0
            for sub, want in zip(subs, expected, strict=True):
                short += max(0, want - sub.got)
                extra += max(0, sub.got - want)
            emit({"delivered": totals.delivered, "lost": short, "extra": extra,
                  "first_rx": totals.first_rx, "last_rx": totals.last_rx, "closed": totals.closed})
        elif cmd == "latencies":
            emit({"latencies_us": totals.latencies_us})
        elif cmd == "reset":  # between two rounds on the same connections
            totals.delivered = totals.closed = 0
            totals.first_rx = totals.last_rx = 0.0
            totals.latencies_us.clear()
            for sub in subs:
                sub.got = 0
            emit({"reset": True})
        else:  # "stop", or the orchestrator went away (EOF)
            break
    for sub in subs:
        if sub.transport is not None:
            sub.transport.abort()


# -- publisher ------------------------------------------------------------------------------
class Publisher(asyncio.Protocol):
    """One keep-alive publishing connection with up to ``window`` PUTs in flight."""

    def __init__(self, slots: asyncio.Queue[Publisher]) -> None:
        self.slots = slots
        self.buf = b""
        self.in_flight = 0
        self.accepted = 0
        self.refused: dict[str, int] = {}
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def put(self, request: bytes) -> None:
        assert self.transport is not None
        self.in_flight += 1
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for _ in range(MAX_STEPS):  # every complete response in the buffer
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = CONTENT_LENGTH_RE.search(self.buf, 0, end + 2)
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < size:
                return
            status = self.buf[9:12].decode(errors="replace")
            self.buf = self.buf[size:]
            if status == "202":
                self.accepted += 1
            else:
                self.refused[status] = self.refused.get(status, 0) + 1
            self.in_flight -= 1
            self.slots.put_nowait(self)

    def connection_lost(self, _exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


def event_body(seq: int, pad: bytes) -> bytes:
    return b'{"bench_ts":%d,"seq":%d,"pad":"%s"}' % (time.time_ns(), seq, pad)


async def run_publisher(cfg: dict[str, Any], commands: asyncio.StreamReader) -> None:
    """Connect, say ``ready``, wait for ``go``, publish ``events``, report and exit."""
    deadline = time.monotonic() + float(cfg["max_time"])
    host, port = cfg["host"], int(cfg["port"])
    paths: list[str] = cfg["paths"]
    events, rate, window = int(cfg["events"]), float(cfg["rate"]), int(cfg["window"])
    pad = b"x" * max(0, int(cfg["size"]) - len(event_body(0, b"")) - 20)
    loop = asyncio.get_running_loop()
    slots: asyncio.Queue[Publisher] = asyncio.Queue()
    conns: list[Publisher] = []
    ports = [int(x) for x in cfg.get("ports") or [port]]  # several nodes: connections spread
    for i in range(int(cfg["conns"])):
        conn = Publisher(slots)
        await loop.create_connection(lambda c=conn: c, host, ports[i % len(ports)])  # type: ignore[misc]
        conns.append(conn)
        for _ in range(window):
            slots.put_nowait(conn)
    # ``Connection: keep-alive`` (HTTP/1.1's default anyway) sends a publish to aiohttp's handler
    # instead of the daemon's fast lane: measures what the fast lane saves
    extra = "Connection: keep-alive\r\n" if cfg.get("via_aiohttp") else ""
    heads = [(f"PUT {p} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
              "Content-Length: %d\r\n\r\n").encode() for p in paths]
    emit({"ready": len(conns)})
    line = await asyncio.wait_for(commands.readline(), max(0.1, deadline - time.monotonic()))
    if line.strip() != b"go":
        return
    t0 = time.time()
    sent = 0
    for seq in range(events):
        if rate > 0:  # keep to the schedule (when behind it, send at once to catch up)
            ahead = t0 + seq / rate - time.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            conn = await asyncio.wait_for(slots.get(), left)
        except TimeoutError:
            break
        if conn.lost.done():
            break
        body = event_body(seq, pad)
        conn.put(heads[seq % len(heads)] % len(body) + body)
        sent += 1
    for _ in range(MAX_STEPS):  # wait for the last answers
        if all(c.in_flight == 0 or c.lost.done() for c in conns) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    t1 = time.time()
    refused: dict[str, int] = {}
    for c in conns:
        for k, v in c.refused.items():
            refused[k] = refused.get(k, 0) + v
    emit({"sent": sent, "accepted": sum(c.accepted for c in conns), "refused": refused,
          "t_start": t0, "t_end": t1})
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    # stay until told (the orchestrator reads this process's CPU time after the run)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(commands.readline(), max(0.1, deadline - time.monotonic()))


async def worker(mode: str) -> None:
    commands = await stdin_lines()
    cfg = json.loads(await asyncio.wait_for(commands.readline(), 60))
    check_loopback(cfg["host"])
    pin_to(cfg.get("cpus"))
    if mode == "sub":
        await run_subscribers(cfg, commands)
    else:
        await run_publisher(cfg, commands)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("sub", "pub"):
        sys.stderr.write(__doc__ or "")
        return 2
    run(worker(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
