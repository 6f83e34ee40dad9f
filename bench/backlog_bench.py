#!/usr/bin/env python3
"""Backlog benchmark: publish throughput with storage on vs off, replay speed, RSS per event.

    .venv/bin/python bench/backlog_bench.py [--events 20000] [--replay 100000] [--publishers 16]
    .venv/bin/python bench/backlog_bench.py --replay-only [--stream-buffer 4194304] [--repeat 3]

``--replay-only``: just the replay of ``--replay`` events (memory and SQLite logs) to one
subscriber resuming with ``X-Fetch-Since-Cursor``, with the daemon's CPU seconds per replay
(``--slow-reader``: a subscriber that reads slower than the daemon writes).

Runs the real daemon (a subprocess on a free loopback port) for each measurement and drives it
with minimal raw-socket HTTP clients, so the client is not the bottleneck. Prints one line per
figure and a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import HOST, Daemon, base_config, free_port, wait_until

_CL = re.compile(rb"(?i)content-length:\s*(\d+)")
#: client processes the publishers are spread over
CLIENT_PROCS = 2
#: what a slow replay subscriber (``--slow-reader``) reads at a time, once a millisecond
SLOW_READ = 16 * 1024
#: a replay that sends nothing for this long has stalled
REPLAY_STALL = 10.0


def make_daemon(workdir: Path, storage: bool, size: int, fsync: bool = True,
                stream_buffer: int = 64 * 1024 * 1024) -> Daemon:
    port = free_port()
    cfg = base_config(port)
    cfg["server"]["backlog"] = {"size": size, "max_replay": size}
    if storage:
        cfg["server"]["backlog"]["storage"] = str(workdir / "backlog.db")
        cfg["server"]["backlog"]["fsync"] = fsync
    cfg["server"]["stream_buffer"] = stream_buffer
    d = Daemon(workdir, config=cfg, port=port, args=["--log-level", "warning"]).start(wait=False)
    wait_listening(d)
    return d


def wait_listening(d: Daemon) -> None:
    """The daemon logs at warning level here (no "listening" line): wait for its port."""
    def up() -> bool:
        if d.proc is not None and d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{d.log()}")
        try:
            socket.create_connection((HOST, d.port), timeout=1).close()
        except OSError:
            return False
        return True
    wait_until(up, 30, "daemon to listen")


async def publisher(port: int, n: int, body: bytes) -> None:
    r, w = await asyncio.open_connection(HOST, port)
    req = (b"PUT /bench/topic HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(n):
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 202"):
            raise RuntimeError(f"publish refused: {head[:80]!r}")
        m = _CL.search(head)
        if m:
            await r.readexactly(int(m.group(1)))
    w.close()
    await w.wait_closed()


async def _worker(port: int, counts: list[int], body: bytes) -> None:
    await asyncio.gather(*[publisher(port, n, body) for n in counts if n])


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` counts differing by at most one (they add up to ``total``)."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


async def publish_rate(port: int, total: int, publishers: int, body: bytes) -> float:
    """Publishes/s of exactly ``total`` events from ``publishers`` connections spread over
    CLIENT_PROCS processes (one Python client process cannot saturate the in-memory daemon)."""
    per_conn = split(total, publishers)
    procs = min(CLIENT_PROCS, publishers)
    shares = [per_conn[i::procs] for i in range(procs)]
    t0 = time.perf_counter()
    children = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", str(port), ",".join(map(str, share)), body.decode())
        for share in shares]
    for c in children:
        if await c.wait() != 0:
            raise RuntimeError("a publishing client failed")
    return total / (time.perf_counter() - t0)


async def first_cursor(port: int) -> str:
    """The cursor of the oldest retained event."""
    r, w = await asyncio.open_connection(HOST, port)
    w.write(b"GET /bench HTTP/1.1\r\nHost: bench\r\nX-Fetch-Since: 0\r\n\r\n")
    await r.readuntil(b"\r\n\r\n")
    await r.readline()  # the chunk size
    cursor = str(json.loads(await r.readline())["pubsub_cursor"])
    w.close()
    return cursor


async def replay_rate(port: int, expect: int, cursor: str | None = None, slow: bool = False) -> float:
    """Events/s to one subscriber replaying everything (X-Fetch-Since: 0), or every event after
    ``cursor`` (X-Fetch-Since-Cursor); ``slow``: the subscriber reads at most SLOW_READ bytes
    every millisecond."""
    r, w = await asyncio.open_connection(HOST, port)
    t0 = time.perf_counter()
    since = b"X-Fetch-Since: 0" if cursor is None else b"X-Fetch-Since-Cursor: " + cursor.encode()
    w.write(b"GET /bench HTTP/1.1\r\nHost: bench\r\n%s\r\n\r\n" % since)
    await r.readuntil(b"\r\n\r\n")
    seen = 0
    marker = b'"pubsub_cursor"'
    carry = b""
    progress = time.monotonic()
    while seen < expect:
        data = await asyncio.wait_for(r.read(SLOW_READ if slow else 1 << 20), REPLAY_STALL)
        if slow:
            await asyncio.sleep(0.001)
        if not data:
            raise RuntimeError(f"stream ended after {seen} events")
        buf = carry + data  # a marker may straddle two reads
        found = buf.count(marker)
        seen += found
        carry = buf[-(len(marker) - 1):]
        now = time.monotonic()
        if found:
            progress = now
        elif now - progress > REPLAY_STALL:  # pings keep the stream busy: stalled all the same
            raise RuntimeError(f"replay stalled after {seen} of {expect} events")
    dt = time.perf_counter() - t0
    w.close()
    return expect / dt


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far, all its threads (schedstat: nanoseconds, not ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9


async def replay_only(args: argparse.Namespace) -> dict[str, Any]:
    """Replays of ``args.replay`` events by cursor from memory and SQLite: events/s and CPU."""
    body = json.dumps({"commit": {"id": 1234567, "repository": "bench", "log": "x" * 100,
                                  "changed": {"trunk/a.c": {"flags": "U  "}}}}).encode()
    out: dict[str, Any] = {"events": args.replay, "stream_buffer": args.stream_buffer,
                           "slow_reader": args.slow_reader}
    with tempfile.TemporaryDirectory(prefix="pypubsub-bench-") as tmp:
        for name, storage in (("memory", False), ("sqlite", True)):
            d = make_daemon(Path(tmp) / f"replay-{name}", storage, args.replay, fsync=False,
                            stream_buffer=args.stream_buffer)
            try:
                assert d.proc is not None
                await publish_rate(d.port, args.replay, args.publishers, body)
                cursor = await first_cursor(d.port)
                rates, cpus = [], []
                for _ in range(args.repeat):
                    c0 = cpu_seconds(d.proc.pid)
                    rates.append(await replay_rate(d.port, args.replay - 1, cursor, args.slow_reader))
                    cpus.append(cpu_seconds(d.proc.pid) - c0)
            finally:
                d.stop()
            out[f"replay_per_s_{name}"] = [round(x) for x in rates]
            out[f"replay_cpu_s_{name}"] = [round(x, 3) for x in cpus]
            runs = [f"{r:.0f} events/s ({c:.3f} s daemon CPU)" for r, c in zip(rates, cpus, strict=True)]
            print(f"replay {args.replay - 1} events by cursor, {name:6s}: " + ", ".join(runs))
    return out


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps({"commit": {"id": 1234567, "repository": "bench", "log": "x" * 100,
                                  "changed": {"trunk/a.c": {"flags": "U  "}}}}).encode()
    out: dict[str, Any] = {"payload_bytes": len(body), "publishers": args.publishers}
    with tempfile.TemporaryDirectory(prefix="pypubsub-bench-") as tmp:
        for name, storage, fsync in (("memory", False, True), ("sqlite", True, True),
                                     ("sqlite-nofsync", True, False)):
            d = make_daemon(Path(tmp) / name, storage, args.events * 2, fsync)
            try:
                await publish_rate(d.port, args.publishers * 50, args.publishers, body)  # warm-up
                rate = await publish_rate(d.port, args.events, args.publishers, body)
            finally:
                d.stop()
            out[f"publish_per_s_{name}"] = round(rate)
            print(f"publish, {name:15s}: {rate:10.0f} events/s ({args.publishers} publishers)")
        out["durable_vs_memory"] = round(out["publish_per_s_sqlite"] / out["publish_per_s_memory"], 3)
        print(f"durable / in-memory: {out['durable_vs_memory']:.1%}")

        for name, storage in (("memory", False), ("sqlite", True)):
            d = make_daemon(Path(tmp) / f"replay-{name}", storage, args.replay, fsync=False)
            try:
                assert d.proc is not None
                base = rss(d.proc.pid)
                await publish_rate(d.port, args.replay, args.publishers, body)
                loaded = rss(d.proc.pid)
                per_event = (loaded - base) / args.replay
                rate = await replay_rate(d.port, args.replay)
                if storage:  # the same events restored from disk after a restart
                    d.stop()
                    d.start(wait=False)
                    wait_listening(d)
                    t0 = time.perf_counter()
                    rate_restart = await replay_rate(d.port, args.replay)
                    out["replay_after_restart_s"] = round(time.perf_counter() - t0, 3)
                    out["rss_per_event_restored"] = round((rss(d.proc.pid) - base) / args.replay)
                    print(f"replay after restart: {rate_restart:10.0f} events/s")
            finally:
                d.stop()
            out[f"replay_per_s_{name}"] = round(rate)
            out[f"rss_per_event_{name}"] = round(per_event)
            print(f"replay {args.replay} events, {name:6s}: {rate:10.0f} events/s; "
                  f"RSS {per_event:.0f} bytes/retained event")
    return out


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:  # a publishing client process
        port, counts, body = sys.argv[2:5]
        asyncio.run(_worker(int(port), [int(n) for n in counts.split(",")], body.encode()))
        return 0
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=20_000, help="publishes per throughput run")
    p.add_argument("--replay", type=int, default=100_000, help="events retained and replayed")
    p.add_argument("--publishers", type=int, default=16)
    p.add_argument("--replay-only", action="store_true",
                   help="only the replay by cursor, with the daemon's CPU time")
    p.add_argument("--stream-buffer", type=int, default=64 * 1024 * 1024,
                   help="server.stream_buffer of the replay daemons (--replay-only)")
    p.add_argument("--repeat", type=int, default=3, help="replays per daemon (--replay-only)")
    p.add_argument("--slow-reader", action="store_true",
                   help=f"the replay's subscriber reads {SLOW_READ} bytes a millisecond at most")
    args = p.parse_args()
    print(json.dumps(asyncio.run(replay_only(args) if args.replay_only else run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
