#!/usr/bin/env python3
"""CPU per event of the cluster log in process: append through Redis and read back.

    taskset -c 1 .venv/bin/python bench/redis_log_bench.py                 # this checkout
    taskset -c 1 .venv/bin/python bench/redis_log_bench.py --root /tmp/base   # another checkout
    taskset -c 1 .venv/bin/python bench/redis_log_bench.py --nodes 3 --redis-cpu 0  # 3 logs, 1 stream
    .venv/bin/python bench/redis_log_bench.py --fsync everysec --dedup

Starts its own ``redis-server`` (AOF, ``appendfsync always`` unless ``--fsync``) on a free
loopback port, one :class:`plugins.backlog_redis.RedisLog` on it, and publishes ``--events``
events in waves of ``--inflight`` appends (as the fast lane's pipelined publishers do), each
wave awaited, every event read back and handed to the tail (``--nodes 3``: three logs on the
one stream, the appends spread over them, each reading every event back, as three daemons
do). Reports appends/s and the CPU time per event of this process (``time.process_time``) and
of redis-server (``/proc``), the figures to compare between two checkouts on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commandstats(port: int) -> dict[str, int]:
    """Calls per command since Redis started (``INFO commandstats``)."""
    import redis

    with redis.Redis(host=HOST, port=port) as r:
        info: dict[str, dict[str, int]] = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): v["calls"] for name, v in info.items()}


def start_redis(workdir: Path, fsync: str, cpu: int | None) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", HOST, "--dir", str(workdir), "--save", "",
           "--appendonly", "yes", "--appendfsync", fsync, "--daemonize", "no"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)  # polling a starting process, bounded by the deadline
    proc.kill()
    raise SystemExit("redis-server did not answer")


async def run(a: argparse.Namespace, port: int, redis_pid: int) -> dict[str, float]:
    from hub.event import make_event
    from plugins.backlog_redis import RedisLog

    logs: list[Any] = [RedisLog(f"redis://{HOST}:{port}/0", "bench", 0) for _ in range(a.nodes)]
    got = [0] * a.nodes
    done = [asyncio.Event() for _ in range(a.nodes)]

    def tail(i: int) -> Any:
        def count(_event: object) -> None:
            got[i] += 1
            if got[i] >= a.events:
                done[i].set()
        return count

    for i, log in enumerate(logs):
        log.tail(tail(i))
        await log.start()
    body = {"x": "y" * a.size, "n": 1}
    parsed = (("bench", "all"), False)
    if a.latency:
        return await latency(a, logs[0], parsed, body)
    s0 = commandstats(port)
    c0, r0, t0 = time.process_time(), proc_cpu(redis_pid), time.perf_counter()
    sent = 0
    while sent < a.events:
        k = min(a.inflight, a.events - sent)
        futs = []
        for i in range(k):
            ev = make_event("/bench/all", body, parsed=parsed)
            log = logs[(sent + i) % a.nodes]  # the publishers spread over the nodes
            futs.append(log.append(ev, dedup=f"m{sent + i}") if a.dedup else log.append(ev))
        sent += k
        await asyncio.gather(*futs)
    for d in done:
        await asyncio.wait_for(d.wait(), 30)
    t1, c1, r1 = time.perf_counter(), time.process_time(), proc_cpu(redis_pid)
    s1 = commandstats(port)
    for log in logs:
        await log.close()
    n = a.events
    out = {"events/s": n / (t1 - t0), "node us/event": (c1 - c0) / n * 1e6,
           "redis us/event": (r1 - r0) / n * 1e6,
           "events/append call": n / max(s1.get("eval", 0) - s0.get("eval", 0), 1),
           "entries/read": n * a.nodes / max(s1.get("xread", 0) - s0.get("xread", 0), 1)}
    if hasattr(logs[0], "own_reused"):  # entries read back whose event was reused, not decoded
        reused, read = sum(g.own_reused for g in logs), sum(g.entries_read for g in logs)
        out["own reused %"] = 100 * reused / max(read, 1)
    return out


async def latency(a: argparse.Namespace, log: Any, parsed: Any, body: dict[str, Any]) -> dict[str, float]:
    """One append every 10 ms: append → acknowledged, and append → read back, in ms."""
    from hub.event import make_event

    seen: dict[str, float] = {}
    arrived = asyncio.Event()

    def tail(event: Any) -> None:
        seen[event.payload["k"]] = time.perf_counter()
        arrived.set()

    log.tail(tail)
    acked, delivered = [], []
    for k in range(a.latency):
        t0 = time.perf_counter()
        await log.append(make_event("/bench/all", {**body, "k": str(k)}, parsed=parsed))
        acked.append(time.perf_counter() - t0)
        while str(k) not in seen:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)
        delivered.append(seen[str(k)] - t0)
        await asyncio.sleep(0.01)  # the pace of the scenario, not synchronisation
    await log.close()
    acked.sort()
    delivered.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    return {"ack p50 ms": pct(acked, 0.5), "ack p99 ms": pct(acked, 0.99),
            "read back p50 ms": pct(delivered, 0.5), "read back p99 ms": pct(delivered, 0.99)}


def main() -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_DEBUG") else logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                    help="the checkout whose plugins/backlog_redis.py is measured")
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--inflight", type=int, default=32, help="appends per wave")
    ap.add_argument("--nodes", type=int, default=1,
                    help="cluster logs in this process on the one Redis: the appends spread over "
                         "them, each reads every event back (CPU is their sum)")
    ap.add_argument("--size", type=int, default=100, help="bytes of each event's body")
    ap.add_argument("--fsync", choices=("always", "everysec", "no"), default="always")
    ap.add_argument("--dedup", action="store_true", help="every append with a de-duplication id")
    ap.add_argument("--redis-cpu", type=int, help="pin redis-server to this core")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object per round")
    ap.add_argument("--latency", type=int, default=0, metavar="N",
                    help="instead: N appends one at a time, 10 ms apart; append → ack and → read back")
    a = ap.parse_args()
    sys.path.insert(0, a.root)
    with tempfile.TemporaryDirectory(prefix="redis-log-bench-") as tmp:
        proc, port = start_redis(Path(tmp), a.fsync, a.redis_cpu)
        try:
            for _ in range(a.repeat):
                res = asyncio.run(run(a, port, proc.pid))
                if a.json:
                    print(json.dumps({"root": a.root, **res}), flush=True)
                else:
                    print(f"{a.root}: " + "  ".join(f"{k} {v:,.1f}" for k, v in res.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
