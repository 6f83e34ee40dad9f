#!/usr/bin/env python3
"""How fast is PyPubSub on this machine? Starts the daemon, loads it, measures, cleans up.

    .venv/bin/python bench/pubsub_bench.py                       # every scenario, defaults
    .venv/bin/python bench/pubsub_bench.py broadcast -n 2000     # one scenario, 2000 subscribers
    .venv/bin/python bench/pubsub_bench.py stalled --json        # one JSON object per scenario
    .venv/bin/python bench/pubsub_bench.py broadcast --transport ndjson,sse,ws --repeat 3
                                                  # the transports interleaved, medians, ratios

Each scenario starts its own ``pypubsub.py`` (a generated config on a free loopback port, no
backlog) pinned to one core (``taskset -c 0``), subscriber processes and a publisher
(``bench/workers.py``, uvloop) pinned to another core, measures, and stops everything it started.

Scenarios:

* ``broadcast``: N subscribers on one topic, events as fast as the daemon accepts them (or
  ``--rate``): deliveries/s and latency;
* ``selective``: N subscribers on N distinct topics, each event for one of them: routing cost;
* ``stalled``: broadcast at a fixed rate plus one subscriber that never reads: do the others'
  latencies suffer, and is the stalled one disconnected once it owes more than
  ``server.stream_buffer``?
* ``idle``: N connected subscribers, nothing published but one probe event: RSS per connection.

Every scenario runs with subscribers on any transport of the same URL (``--transport``): chunked
NDJSON (plain GET), Server-Sent Events (``Accept: text/event-stream``) or WebSocket.

Cluster mode: ``--nodes 3`` starts a ``redis-server`` (AOF, ``appendfsync always``) and three
daemons sharing one stream (``server.backlog.storage: redis://…``), all pinned to the daemon
core; subscribers are spread evenly over the nodes (the latency probes on the first), and the
publisher's connections over every node. ``--redis`` does the same with ``--nodes 1`` (one node
on Redis, to separate the cost of Redis from the cost of more nodes). Figures are summed over
the nodes (deliveries/s) or taken from the probes (latency).

Reported: deliveries/s, latency p50/p99/max (probe subscribers, see workers.py), lost deliveries
(expected minus received, per subscriber), the daemon's RSS per connection and CPU use, and how
busy the load core was (if it was saturated, the figure measures the load generator, not the
daemon). Only 127.0.0.0/8 is ever a target; every wait is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("pubsub_bench")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("broadcast", "selective", "stalled", "idle")
TRANSPORTS = ("ndjson", "sse", "ws")
#: Total deliveries a default broadcast run aims at (a few seconds at ~100k/s).
BROADCAST_DELIVERIES = 1_000_000
#: Subscribers per bulk worker process (one process is one event loop on the load core).
SUBS_PER_PROC = 2500
#: Latency probes: a few subscribers in a process of their own (see workers.py).
DEFAULT_PROBES = 10
#: The stalled subscriber's receive buffer: small, so that little of what the daemon sends it
#: waits on this side (the kernel doubles it). The daemon's side still has its send buffer.
STALLED_RCVBUF = 4096
#: A run gives up after this many seconds without a new delivery once publishing is over.
QUIET_SECONDS = 3.0
#: How long a worker may take to stop when asked, then when sent SIGTERM.
STOP_GRACE = 2.0


@dataclass(frozen=True)
class Params:
    """One scenario run; ``None`` fields take the scenario's default (see ``with_defaults``)."""

    scenario: str
    transport: str = "ndjson"
    n: int | None = None
    events: int | None = None
    rate: float | None = None
    size: int | None = None
    stream_buffer: int | None = None
    procs: int | None = None
    probes: int = DEFAULT_PROBES
    pub_conns: int = 16
    window: int = 2
    server_cpu: int = 0
    load_cpus: tuple[int, ...] = (1,)
    python: str = sys.executable
    max_time: float = 180.0
    #: daemons (more than one: a cluster on one Redis)
    nodes: int = 1
    #: the daemons' log is a Redis stream (implied by nodes > 1)
    redis: bool = False
    #: publish through aiohttp's handler rather than the fast lane
    via_aiohttp: bool = False
    #: Redis' appendfsync for cluster runs (always: no acknowledged event lost)
    redis_fsync: str = "always"
    #: core redis-server is pinned to in cluster runs (None: the daemons' core)
    redis_cpu: int | None = None
    #: one daemon whose log is SQLite with fsync on (a persistent backlog of ``events`` events)
    sqlite: bool = False

    @property
    def cluster(self) -> bool:
        return self.redis or self.nodes > 1

    def with_defaults(self) -> Params:
        d: dict[str, Any] = {
            "broadcast": {"n": 1000, "rate": 0.0, "size": 256},
            "selective": {"n": 1000, "events": 10_000, "rate": 0.0, "size": 256},
            "stalled": {"n": 100, "events": 1500, "rate": 200.0, "size": 4096,
                        "stream_buffer": 256 * 1024},
            "idle": {"n": 5000, "events": 1, "rate": 0.0, "size": 256},
        }[self.scenario]
        p = replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})
        n = p.n or 0
        if p.events is None:  # broadcast: about BROADCAST_DELIVERIES deliveries in all
            p = replace(p, events=max(50, min(5000, BROADCAST_DELIVERIES // max(1, n))))
        if p.procs is None:
            p = replace(p, procs=max(1, math.ceil(n / SUBS_PER_PROC)))
        return replace(p, probes=min(p.probes, n))


@dataclass
class Result:
    scenario: str
    transport: str
    n: int
    events: int
    size: int
    rate: float
    stream_buffer: int
    published: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    closed_by_server: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    deliveries_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    latency_samples: int = 0
    rss_base_mb: float = 0.0
    rss_per_conn_kb: float = 0.0
    server_cpu_pct: float = 0.0
    #: CPU time per published event (µs) of every daemon, and of Redis in cluster runs
    server_cpu_us: float | None = None
    load_cpu_pct: float = 0.0
    load_cores: int = 1
    server_core_busy_pct: float | None = None
    load_core_busy_pct: float | None = None
    stalled_disconnected: bool | None = None
    stalled_after_s: float | None = None
    stalled_read_bytes: int | None = None
    #: stalled: the same round first published without the stalled subscriber
    control_p50_ms: float | None = None
    control_p99_ms: float | None = None
    control_max_ms: float | None = None
    nodes: int = 1
    #: the log: memory, sqlite, or "redis (APPENDFSYNC)" (Redis' appendfsync setting in the run)
    log: str = "memory"
    lane: str = "fast"
    #: cluster runs, over the measured window: Redis' own CPU per event (µs, from /proc), events
    #: per append call (EVAL), entries per XREAD (all nodes' reads), Redis' command time per
    #: event (µs, INFO commandstats)
    redis_cpu_us: float | None = None
    events_per_append: float | None = None
    entries_per_read: float | None = None
    redis_cmd_us: float | None = None
    notes: list[str] = field(default_factory=list)


# -- /proc ----------------------------------------------------------------------------------
def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of ``pid`` (threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def core_busy(cpus: tuple[int, ...]) -> tuple[int, int]:
    """(busy, total) jiffies of some cores together, from /proc/stat."""
    names = {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in names:
                v = [int(x) for x in fields[1:9]]
                busy += sum(v) - v[3] - v[4]  # all but idle and iowait
                total += sum(v)
    return busy, total


def percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return round(sorted_values[i] / 1000.0, 2)


# -- the daemon -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_config(rundir: Path, port: int, p: Params, redis_url: str | None = None) -> tuple[Path, Path]:
    cfg, acl = rundir / "pypubsub.yaml", rundir / "pypubsub_acl.yaml"
    lines = [
        "# written by bench/pubsub_bench.py",
        "server:",
        f"  port: {port}",
        f"  bind: {HOST}",
        f"  max_payload_size: {max(102_400, 2 * (p.size or 0))}",
        "  backlog:",
        "    size: 0",
        "    max_age: 0",
    ]
    if redis_url is not None:  # live events only, as the memory runs (no replay backlog)
        lines += [f"    storage: {redis_url}", "    stream: bench"]
    elif p.sqlite:  # a persistent backlog needs a size: every event of the run is kept
        lines[-2] = f"    size: {max(p.events or 0, 1000)}"
        lines += [f"    storage: {rundir / 'backlog.db'}", "    fsync: true"]
    if p.stream_buffer:
        lines.append(f"  stream_buffer: {p.stream_buffer}")
    lines += ["clients:", "  payloaders:", "    - 127.0.0.0/8", "  oldschoolers: []", ""]
    cfg.write_text("\n".join(lines))
    acl.write_text("{}\n")
    return cfg, acl


class Daemon:
    """``pypubsub.py`` in its own session, pinned to one core, logging to a file."""

    def __init__(self, p: Params, rundir: Path, redis_url: str | None = None) -> None:
        self.port = free_port()
        rundir.mkdir(parents=True, exist_ok=True)
        self.log_path = rundir / "daemon.log"
        cfg, acl = write_config(rundir, self.port, p, redis_url)
        cmd = [p.python, str(ROOT / "pypubsub.py"), "--config", str(cfg), "--acl", str(acl),
               "--log-level", "warning"]  # info would log every PUT: the access log
        self.pinned = shutil.which("taskset") is not None and p.server_cpu in os.sched_getaffinity(0)
        if self.pinned:
            cmd = ["taskset", "-c", str(p.server_cpu), *cmd]
        if shutil.which("setpriv"):  # the daemon ends with us, even if we are killed outright
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=rundir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = self.proc.pid  # setpriv and taskset exec the interpreter: same pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, within: float = 20.0) -> None:
        end = time.monotonic() + within
        for _ in range(100_000):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()[-2000:]}")
            if await subscriber_count(self.port) is not None:
                return
            if time.monotonic() > end:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {within}s:\n{self.log()[-2000:]}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class RedisServer:
    """``redis-server`` for cluster runs: AOF (``appendfsync always`` unless told), pinned as a
    daemon (to the daemons' core unless ``--redis-cpu`` says another)."""

    def __init__(self, p: Params, rundir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("cluster runs need redis-server (scripts/install.sh --dev)")
        self.port = free_port()
        rundir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", str(self.port), "--bind", HOST, "--dir", str(rundir), "--save", "",
               "--appendonly", "yes", "--appendfsync", p.redis_fsync, "--daemonize", "no",
               "--logfile", str(rundir / "redis.log")]
        cpu = p.server_cpu if p.redis_cpu is None else p.redis_cpu
        if shutil.which("taskset") is not None and cpu in os.sched_getaffinity(0):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def wait_ready(self, within: float = 10.0) -> None:
        end = time.monotonic() + within
        for _ in range(100_000):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                writer.write(b"PING\r\n")
                pong = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                await writer.wait_closed()
                if pong.startswith(b"+PONG"):
                    return
            if time.monotonic() > end:
                break
            await asyncio.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {within}s")

    async def command(self, *args: str) -> bytes:
        """One command's raw answer (RESP), on a connection of its own."""
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            parts = [b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args]
            writer.write(b"*%d\r\n" % len(args) + b"".join(parts))
            head = await asyncio.wait_for(reader.readline(), 5)
            if head.startswith(b"$"):
                return await asyncio.wait_for(reader.readexactly(int(head[1:]) + 2), 5)
            return head
        finally:
            writer.close()
            await writer.wait_closed()

    async def commandstats(self) -> dict[str, tuple[int, int]]:
        """``INFO commandstats`` as command: (calls, µs)."""
        out: dict[str, tuple[int, int]] = {}
        for line in (await self.command("INFO", "commandstats")).decode().splitlines():
            name, _, rest = line.partition(":")
            if name.startswith("cmdstat_"):
                kv = dict(x.split("=", 1) for x in rest.split(","))
                out[name[8:]] = (int(kv["calls"]), int(kv["usec"]))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def subscriber_count(port: int) -> int | None:
    """``X-Subscribers`` from ``HEAD /``, or None if the daemon does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"HEAD / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-subscribers":
            return int(value)
    return -1  # answered, but without the header


# -- load workers ---------------------------------------------------------------------------
class Worker:
    """A ``workers.py`` process: JSON lines out, one command per line in."""

    def __init__(self, mode: str, cfg: dict[str, Any]) -> None:
        self.mode = mode
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, python: str, within: float) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            python, str(HERE / "workers.py"), self.mode,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024)  # the latency list comes back as one line
        self.send(json.dumps(self.cfg))
        return await self.read(within)

    async def read(self, within: float) -> dict[str, Any]:
        """The worker's next message; TimeoutError after ``within`` seconds."""
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"{self.mode} worker exited ({self.proc.returncode})")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def ask(self, command: str, within: float = 30.0) -> dict[str, Any]:
        self.send(command)
        return await self.read(within)

    async def stop(self) -> None:
        """Ask it to stop; SIGTERM after STOP_GRACE seconds (a publisher mid-run does not read
        its commands), SIGKILL after as long again."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self.send("stop")
            assert proc.stdin is not None
            proc.stdin.close()
        for end in (proc.terminate, proc.kill):
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
                return
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    end()
        await proc.wait()


class StalledClient:
    """A subscriber that sends its GET and never reads, until ``finish``.

    Its own socket cannot tell when the daemon gives up on it: the daemon closes its end, but
    the kernel still holds the unsent bytes and sends the FIN only after them, so this side
    stays ESTABLISHED. ``watch`` therefore takes the daemon's word (``X-Subscribers`` drops),
    and ``finish`` reads what was queued to confirm that the stream does end.
    """

    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        self.sock.settimeout(5)
        self.sock.connect((HOST, port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: stalled\r\n\r\n".encode())
        self.dropped_at: float | None = None

    async def watch(self, subscribers: int, deadline: float) -> None:
        """Note when the daemon's subscriber count falls below ``subscribers``."""
        for _ in range(1_000_000):
            if time.monotonic() > deadline:
                return
            count = await subscriber_count(self.port)
            if count is not None and 0 <= count < subscribers:
                self.dropped_at = time.time()
                return
            await asyncio.sleep(0.1)

    def finish(self, within: float = 10.0) -> tuple[int, bool]:
        """Read what the daemon queued; (bytes read, whether the stream ended in time)."""
        end = time.monotonic() + within
        got = 0
        for _ in range(10_000_000):
            left = end - time.monotonic()
            if left <= 0:
                return got, False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return got, False
            except ConnectionError:
                return got, True
            if not data:
                return got, True
            got += len(data)
        return got, False

    def close(self) -> None:
        self.sock.close()


# -- one scenario ---------------------------------------------------------------------------
def plan(p: Params) -> tuple[list[str], list[int], list[str]]:
    """(subscriber paths, events each should receive, publisher paths in rotation)."""
    n, events = p.n or 0, p.events or 0
    if p.scenario == "selective":
        paths = [f"/bench/t{i}" for i in range(n)]
        expected = [events // n + (1 if i < events % n else 0) for i in range(n)]
        return paths, expected, paths
    return ["/bench/all"] * n, [events] * n, ["/bench/all"]


def split(seq: list[Any], parts: int) -> list[list[Any]]:
    size = math.ceil(len(seq) / parts) if seq else 0
    return [seq[i:i + size] for i in range(0, len(seq), size)] if size else []


async def start_subscribers(p: Params, port: int, paths: list[str], expected: list[int],
                            res: Result) -> tuple[list[Worker], int]:
    """The probes in a process of their own, the rest spread over ``p.procs``; (workers, connected)."""
    cfg = {"host": HOST, "port": port, "cpus": p.load_cpus, "max_time": p.max_time,
           "transport": p.transport}
    k = p.probes
    groups = [(True, paths[:k], expected[:k])] if k else []
    parts = p.procs or 1
    groups += [(False, a, b) for a, b in zip(split(paths[k:], parts), split(expected[k:], parts),
                                             strict=True)]
    workers = [Worker("sub", dict(cfg, paths=ps, expected=want, probe=probe))
               for probe, ps, want in groups]
    readies = await asyncio.gather(*(w.start(p.python, 120) for w in workers))
    for r in readies:
        if r["n_errors"]:
            res.notes.append(f"{r['n_errors']} subscriber(s) failed: {r['errors'][:2]}")
    return workers, sum(r["ready"] for r in readies)


async def wait_registered(port: int, count: int, deadline: float) -> bool:
    """Wait until the daemon counts ``count`` subscribers: registered in the hub, not just answered."""
    for _ in range(100_000):
        if await subscriber_count(port) == count:
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return False


class CpuClock:
    """CPU time of the daemon and the load processes, and how busy each core was, over a window."""

    def __init__(self, daemon_pids: list[int], load_pids: list[int],
                 cores: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        self.daemon_pids, self.load_pids, self.cores = daemon_pids, load_pids, cores
        self.start = self.read()

    def read(self) -> tuple[int, int, list[tuple[int, int]]]:
        return (sum(map(cpu_ticks, self.daemon_pids)), sum(map(cpu_ticks, self.load_pids)),
                [core_busy(c) for c in self.cores])

    def fill(self, res: Result) -> None:
        (d0, l0, cores0), (d1, l1, cores1) = self.start, self.read()
        if res.seconds > 0:
            res.server_cpu_pct = round(100.0 * (d1 - d0) / CLK_TCK / res.seconds, 1)
        if res.published > 0:
            res.server_cpu_us = round((d1 - d0) / CLK_TCK * 1e6 / res.published, 1)
            res.load_cpu_pct = round(100.0 * (l1 - l0) / CLK_TCK / res.seconds, 1)
        busy = [round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None
                for (b0, t0), (b1, t1) in zip(cores0, cores1, strict=True)]
        res.server_core_busy_pct, res.load_core_busy_pct = busy


def fill_counts(res: Result, reports: list[dict[str, Any]], done: dict[str, Any]) -> None:
    res.delivered = sum(r["delivered"] for r in reports)
    res.lost = sum(r["lost"] for r in reports)
    res.duplicates = sum(r["extra"] for r in reports)
    res.closed_by_server = sum(r["closed"] for r in reports)
    t_end = max([r["last_rx"] for r in reports] + [done["t_end"]])
    res.seconds = round(t_end - done["t_start"], 3)
    if res.seconds > 0:
        res.events_per_s = round(res.published / res.seconds, 1)
        res.deliveries_per_s = round(res.delivered / res.seconds, 1)


def fill_redis(res: Result, ticks: int, stats: dict[str, tuple[int, int]], nodes: int) -> None:
    """What Redis did per event over the measured window (cluster runs)."""
    appends = stats.get("xadd", (0, 0))[0]
    if not appends:
        return
    res.redis_cpu_us = round(ticks / CLK_TCK * 1e6 / appends, 1)
    calls = stats.get("eval", (0, 0))[0] + stats.get("evalsha", (0, 0))[0] + stats.get("fcall", (0, 0))[0]
    if calls:
        res.events_per_append = round(appends / calls, 1)
    reads = stats.get("xread", (0, 0))[0]
    if reads:
        res.entries_per_read = round(appends * nodes / reads, 1)
    top = ("eval", "evalsha", "fcall", "xread", "xtrim", "xinfo|stream", "time")
    res.redis_cmd_us = round(sum(stats.get(c, (0, 0))[1] for c in top) / appends, 1)


async def fill_latency(res: Result, probes: Worker) -> None:
    lat = sorted((await probes.ask("latencies"))["latencies_us"])
    res.latency_samples = len(lat)
    res.p50_ms, res.p99_ms, res.max_ms = (percentile(lat, q) for q in (0.50, 0.99, 1.0))


async def control_round(p: Params, port: int, paths: list[str], subs: list[Worker], res: Result,
                        deadline: float) -> int:
    """The stalled scenario's baseline: the same events to the same subscribers, no stalled one.

    Returns how many subscribers the daemon disconnected meanwhile (they were too slow)."""
    pub = Worker("pub", publisher_config(p, port, paths))
    try:
        await pub.start(p.python, 30)
        pub.send("go")
        await pub.read(max(1.0, deadline - time.monotonic()))
        reports = await drain(subs, deadline)
    finally:
        await pub.stop()
    lost, closed = sum(r["lost"] for r in reports), sum(r["closed"] for r in reports)
    if lost or closed:
        res.notes.append(f"control round: {lost} deliveries lost, {closed} subscriber(s) disconnected")
    if p.probes:
        lat = sorted((await subs[0].ask("latencies"))["latencies_us"])
        res.control_p50_ms, res.control_p99_ms, res.control_max_ms = (
            percentile(lat, q) for q in (0.50, 0.99, 1.0))
    await asyncio.gather(*(w.ask("reset") for w in subs))
    return int(closed)


def publisher_config(p: Params, port: int, paths: list[str],
                     ports: list[int] | None = None) -> dict[str, Any]:
    return {"host": HOST, "port": port, "cpus": p.load_cpus, "max_time": p.max_time, "paths": paths,
            "events": p.events, "rate": p.rate, "size": p.size, "conns": p.pub_conns,
            "window": p.window, "ports": ports or [port], "via_aiohttp": p.via_aiohttp}


async def fill_stalled(res: Result, stalled: StalledClient, watch: asyncio.Task[None],
                       t_start: float, daemon: Daemon) -> None:
    with contextlib.suppress(TimeoutError):  # the daemon may drop it just after the last event
        await asyncio.wait_for(asyncio.shield(watch), 2.0)
    if stalled.dropped_at is not None:
        res.stalled_after_s = round(stalled.dropped_at - t_start, 3)
    res.stalled_read_bytes, ended = await asyncio.to_thread(stalled.finish)
    res.stalled_disconnected = ended and stalled.dropped_at is not None
    if "disconnecting slow subscriber" not in daemon.log():
        res.notes.append("the daemon logged no slow-subscriber disconnect")


async def run_scenario(p: Params) -> Result:
    """Start a daemon, load it as ``p`` says, measure, stop everything; never raises for a
    figure, only when the daemon or a worker cannot start."""
    p = p.with_defaults()
    assert p.n is not None and p.events is not None and p.rate is not None and p.size is not None
    res = Result(p.scenario, p.transport, p.n, p.events, p.size, p.rate, p.stream_buffer or 0,
                 load_cores=len(p.load_cpus))
    deadline = time.monotonic() + p.max_time
    rundir = Path(tempfile.mkdtemp(prefix="pubsub-bench-run-"))
    res.nodes = p.nodes
    res.log = f"redis ({p.redis_fsync})" if p.cluster else "sqlite" if p.sqlite else "memory"
    res.lane = "aiohttp" if p.via_aiohttp else "fast"
    redis = RedisServer(p, rundir / "redis") if p.cluster else None
    daemons: list[Daemon] = []
    workers: list[Worker] = []
    stalled: StalledClient | None = None
    watch: asyncio.Task[None] | None = None
    try:
        if redis is not None:
            await redis.wait_ready()
        daemons = [Daemon(p, rundir / f"node{i}", redis.url if redis else None) for i in range(p.nodes)]
        daemon = daemons[0]
        await asyncio.gather(*(d.wait_ready() for d in daemons))
        if not daemon.pinned:
            res.notes.append("daemon not pinned (no taskset or no such core)")
        res.rss_base_mb = round(rss_kb(daemon.pid) / 1024, 1)
        sub_paths, expected, pub_paths = plan(p)
        res.expected = sum(expected)
        # subscribers spread over the nodes; the probes (the first ones) on the first node
        connected_per: list[int] = []
        for i, d in enumerate(daemons):
            if p.nodes == 1:
                paths_i, want_i, p_i = sub_paths, expected, p
            else:
                k = p.probes
                rest = list(range(k, len(sub_paths)))
                idx = (list(range(k)) if i == 0 else []) + rest[i::p.nodes]
                paths_i = [sub_paths[j] for j in idx]
                want_i = [expected[j] for j in idx]
                p_i = p if i == 0 else replace(p, probes=0)
                p_i = replace(p_i, procs=max(1, math.ceil((p.procs or 1) / p.nodes)))
            ws, connected = await start_subscribers(p_i, d.port, paths_i, want_i, res)
            workers += ws
            connected_per.append(connected)
        for d, connected in zip(daemons, connected_per, strict=True):
            if not await wait_registered(d.port, connected, deadline):
                res.notes.append(f"node {d.port} never counted all {connected} subscribers")
        connected = connected_per[0]
        if connected:
            res.rss_per_conn_kb = round((rss_kb(daemon.pid) - res.rss_base_mb * 1024) / connected, 2)
        if p.scenario == "stalled":
            connected -= await control_round(p, daemon.port, pub_paths, workers, res, deadline)
            stalled = StalledClient(daemon.port, "/bench/all")
            connected += 1
            if not await wait_registered(daemon.port, connected, deadline):
                res.notes.append(f"the daemon never counted all {connected} subscribers")

        pub = Worker("pub", publisher_config(p, daemon.port, pub_paths, [d.port for d in daemons]))
        workers.append(pub)
        await pub.start(p.python, 30)
        server_pids = [d.pid for d in daemons] + ([redis.pid] if redis else [])
        if redis is not None:
            await redis.command("CONFIG", "RESETSTAT")
            redis_ticks = cpu_ticks(redis.pid)
        clock = CpuClock(server_pids, [w.pid for w in workers], ((p.server_cpu,), p.load_cpus))
        if stalled is not None:
            watch = asyncio.get_running_loop().create_task(stalled.watch(connected, deadline))
        pub.send("go")
        done = await pub.read(max(1.0, deadline - time.monotonic()))
        res.published, res.refused = done["accepted"], done["refused"]
        if done["sent"] < p.events:
            res.notes.append(f"publisher sent only {done['sent']} of {p.events} events")

        fill_counts(res, await drain([w for w in workers if w.mode == "sub"], deadline), done)
        clock.fill(res)
        if redis is not None:
            fill_redis(res, cpu_ticks(redis.pid) - redis_ticks, await redis.commandstats(), p.nodes)
        if p.probes:
            await fill_latency(res, workers[0])
        if stalled is not None and watch is not None:
            await fill_stalled(res, stalled, watch, done["t_start"], daemon)
        res.notes += machine_notes(res)
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await asyncio.gather(*(w.stop() for w in workers))
        if stalled is not None:
            stalled.close()
        keep = False
        for d in daemons:
            rc = d.stop()
            if rc != 0:
                res.notes.append(f"daemon exited with {rc}")
            if "Traceback" in d.log():
                res.notes.append(f"traceback in the daemon log ({d.log_path})")
                keep = True
        if redis is not None:
            redis.stop()
        if not keep:
            shutil.rmtree(rundir, ignore_errors=True)
    return res


def machine_notes(res: Result) -> list[str]:
    """Warnings about the measurement itself: a saturated load core, a noisy neighbour."""
    if res.seconds < 1:  # CPU ticks are too coarse to judge a shorter run
        return []
    notes = []
    load_per_core = res.load_cpu_pct / max(1, res.load_cores)
    if load_per_core > 90:
        notes.append(f"load core saturated ({load_per_core:.0f}% load generator): "
                     "the figures may measure the load generator")
    for core, busy, ours in (("daemon", res.server_core_busy_pct, res.server_cpu_pct),
                             ("load", res.load_core_busy_pct, load_per_core)):
        if busy is not None and busy - ours > 20:
            notes.append(f"other processes used {busy - ours:.0f}% of the {core} core(s): noisy figures")
    return notes


async def drain(subs: list[Worker], deadline: float) -> list[dict[str, Any]]:
    """Ask for reports until nothing is missing, or nothing new came for QUIET_SECONDS."""
    reports: list[dict[str, Any]] = []
    last, quiet_since = -1, time.monotonic()
    for _ in range(100_000):
        reports = list(await asyncio.gather(*(w.ask("report") for w in subs)))
        got = sum(r["delivered"] for r in reports)
        now = time.monotonic()
        if got != last:
            last, quiet_since = got, now
        if sum(r["lost"] for r in reports) == 0 or now - quiet_since > QUIET_SECONDS or now > deadline:
            break
        await asyncio.sleep(0.05)
    return reports


# -- output ---------------------------------------------------------------------------------
COLUMNS = [
    ("scenario", "scenario"), ("transport", "transport"), ("n", "N"), ("events", "events"),
    ("rate", "rate/s"),
    ("deliveries_per_s", "deliveries/s"), ("events_per_s", "events/s"), ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("lost", "lost"), ("rss_per_conn_kb", "KB/conn"),
    ("server_cpu_pct", "daemon CPU%"), ("load_cpu_pct", "load CPU%"),
    ("stalled_after_s", "stalled cut s"), ("nodes", "nodes"), ("log", "log"), ("lane", "publish lane"),
]


def cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:g}"
    return str(v)


def table(results: list[Result]) -> str:
    rows = [[h for _, h in COLUMNS]]
    for r in results:
        d = asdict(r)
        rows.append([cell(d[k]) for k, _ in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        if r.control_p99_ms is not None:
            out.append(f"{r.scenario}: p50/p99/max {r.p50_ms}/{r.p99_ms}/{r.max_ms} ms with the stalled "
                       f"subscriber, {r.control_p50_ms}/{r.control_p99_ms}/{r.control_max_ms} ms "
                       "without it (same daemon, same load)")
        out += [f"{r.scenario}: {note}" for note in r.notes]
    return "\n".join(out)


def cpu_list(text: str) -> tuple[int, ...]:
    """``1``, ``1,3`` or ``1-3`` as a tuple of core numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            cpus += range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of cores such as 1,3 or 1-3") from None
    if not cpus:
        raise argparse.ArgumentTypeError("no core given")
    return tuple(cpus)


def transport_list(text: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in out if t not in TRANSPORTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"transports are {', '.join(TRANSPORTS)}, got {text!r}")
    return out


def comparison(results: list[Result]) -> str:
    """Medians per (scenario, transport) and each transport's ratio to NDJSON's."""
    med: dict[tuple[str, str], Result] = {}
    keys = sorted({(r.scenario, r.transport) for r in results}, key=lambda k: (k[0], TRANSPORTS.index(k[1])))
    for k in keys:
        runs = sorted((r for r in results if (r.scenario, r.transport) == k),
                      key=lambda r: r.deliveries_per_s)
        med[k] = runs[len(runs) // 2]
    out = ["median per (scenario, transport), over "
           f"{max(1, len(results) // max(1, len(keys)))} interleaved run(s):"]
    for (scenario, transport), r in med.items():
        line = (f"  {scenario:9} {transport:6} deliveries/s {r.deliveries_per_s:>10.0f}  "
                f"p99 {r.p99_ms} ms  KB/conn {r.rss_per_conn_kb}  lost {r.lost}")
        base = med.get((scenario, "ndjson"))
        if base is not None and transport != "ndjson" and base.deliveries_per_s:
            line += f"  {r.deliveries_per_s / base.deliveries_per_s:.2f}x ndjson"
        out.append(line)
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", metavar="scenario",
                    help=f"any of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("-n", "--subscribers", type=int, dest="n", help="subscribers (default per scenario)")
    ap.add_argument("--events", type=int, help="events to publish")
    ap.add_argument("--rate", type=float, help="events per second; 0 = as fast as accepted")
    ap.add_argument("--size", type=int, help="bytes of each published body")
    ap.add_argument("--stream-buffer", type=int, help="server.stream_buffer in bytes")
    ap.add_argument("--procs", type=int, help=f"subscriber processes (default: one per {SUBS_PER_PROC})")
    ap.add_argument("--probes", type=int, default=DEFAULT_PROBES, help="latency probe subscribers")
    ap.add_argument("--pub-conns", type=int, default=16, help="publisher connections")
    ap.add_argument("--server-cpu", type=int, default=0, help="core the daemon is pinned to")
    ap.add_argument("--load-cpus", type=cpu_list, default=(1,), metavar="LIST",
                    help="cores the load generators are pinned to, e.g. 1 or 1-3 or 1,3 (default: 1)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the daemon and workers")
    ap.add_argument("--max-time", type=float, default=180.0, help="seconds one scenario may take")
    ap.add_argument("--transport", type=transport_list, default=("ndjson",), metavar="LIST",
                    help=f"subscribers' transport(s), comma-separated: {', '.join(TRANSPORTS)} "
                         "(default: ndjson); several are run interleaved")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every (scenario, transport) this many times, interleaved; medians")
    ap.add_argument("--json", action="store_true", help="print one JSON object per scenario")
    ap.add_argument("--nodes", type=int, default=1, help="daemons; more than 1: a cluster on one Redis")
    ap.add_argument("--redis", action="store_true",
                    help="the daemons' log on Redis Streams (implied by --nodes > 1)")
    ap.add_argument("--redis-fsync", choices=("always", "everysec", "no"), default="always",
                    help="Redis' appendfsync in cluster runs (default: always)")
    ap.add_argument("--redis-cpu", type=int, default=None,
                    help="core redis-server is pinned to in cluster runs (default: the daemons')")
    ap.add_argument("--sqlite", action="store_true",
                    help="one daemon with a persistent backlog in SQLite, fsync on (not with --redis)")
    ap.add_argument("--via-aiohttp", action="store_true",
                    help="publish through aiohttp's handler, not the fast lane (what the lane saves)")
    return ap


async def interruptible(coro: Coroutine[Any, Any, Result]) -> Result:
    """Run ``coro``; SIGINT or SIGTERM cancels it, so that its clean-up still runs."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    ap = build_parser()
    a = ap.parse_args(argv)
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")
    if a.sqlite and (a.redis or a.nodes > 1):
        ap.error("--sqlite is one daemon without Redis")
    if os.cpu_count() == 1:
        logger.warning("one CPU: daemon and load share it, figures will be low")
    results = []
    runs = [(scenario, transport) for _ in range(max(1, a.repeat))
            for scenario in a.scenarios or SCENARIOS for transport in a.transport]
    for scenario, transport in runs:
        p = Params(scenario, transport=transport, n=a.n, events=a.events, rate=a.rate, size=a.size,
                   stream_buffer=a.stream_buffer, procs=a.procs, probes=a.probes,
                   pub_conns=a.pub_conns, server_cpu=a.server_cpu, load_cpus=a.load_cpus,
                   python=a.python, max_time=a.max_time, nodes=max(1, a.nodes), redis=a.redis,
                   via_aiohttp=a.via_aiohttp, redis_fsync=a.redis_fsync, sqlite=a.sqlite,
                   redis_cpu=a.redis_cpu)
        logger.info("running %s over %s", scenario, transport)
        try:
            res = asyncio.run(interruptible(run_scenario(p)))
        except asyncio.CancelledError:
            logger.warning("interrupted: everything started was stopped")
            return 130
        results.append(res)
        if a.json:
            print(json.dumps(asdict(res)), flush=True)
    if not a.json:
        print(table(results))
        if len(runs) > 1:
            print(comparison(results))
    return 1 if any(r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
