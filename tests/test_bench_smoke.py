"""The user-facing benchmark (bench/pubsub_bench.py) at a tiny scale, against the real daemon.

Correctness only: every subscriber receives every event meant for it, and a subscriber that
never reads is cut off once it owes more than ``server.stream_buffer``. No figure is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import HOST, DaemonFactory, subscribe, wait_subscribers

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "pubsub_bench.py"
EVENT_SIZE = 4096
#: Notes about the machine, not about correctness (a busy or single-core CI runner).
HARMLESS = ("load core saturated", "daemon not pinned", "other processes used")


def run_bench(*args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(BENCH), *args, "--json", "--max-time", "60"],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def problems(result: dict[str, Any]) -> list[str]:
    return [n for n in result["notes"] if not n.startswith(HARMLESS)]


def kernel_send_buffer_max() -> int:
    """The most a socket's send buffer may autotune to: bytes the kernel holds before the daemon."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def test_bench_delivers_everything() -> None:
    results = run_bench("broadcast", "selective", "idle", "-n", "20", "--events", "50")
    assert [r["scenario"] for r in results] == ["broadcast", "selective", "idle"]
    for r in results:
        assert r["published"] == 50, r
        assert r["refused"] == {}, r
        assert r["lost"] == 0, r
        assert r["duplicates"] == 0, r
        assert r["closed_by_server"] == 0, r
        assert problems(r) == [], r
    broadcast, selective, _ = results
    assert broadcast["delivered"] == 20 * 50
    assert selective["delivered"] == 50
    assert broadcast["latency_samples"] > 0


def test_bench_stalled_subscriber_is_cut_off_and_others_lose_nothing() -> None:
    # A buffer large enough that the readers never overflow it on a busy runner (at 1 000 events
    # of 4 KiB a second, 1 MiB is a quarter of a second of lag on top of the kernel's buffers)
    # and enough bytes to fill the stalled one's kernel buffers and then that, with room to spare.
    stream_buffer = 1024 * 1024
    events = (kernel_send_buffer_max() + stream_buffer) * 3 // 2 // EVENT_SIZE
    (r,) = run_bench("stalled", "-n", "10", "--events", str(events), "--size", str(EVENT_SIZE),
                     "--rate", "1000", "--stream-buffer", str(stream_buffer))
    assert r["published"] == events, r
    assert r["lost"] == 0, r
    assert r["duplicates"] == 0, r
    assert r["closed_by_server"] == 0, r
    assert r["stalled_disconnected"] is True, r
    assert r["control_p99_ms"] is not None, r  # the round without the stalled subscriber ran
    assert problems(r) == [], r


def test_bench_sse_and_websocket_subscribers_get_everything() -> None:
    results = run_bench("broadcast", "idle", "-n", "20", "--events", "50", "--transport", "sse,ws")
    assert [(r["scenario"], r["transport"]) for r in results] == [
        ("broadcast", "sse"), ("broadcast", "ws"), ("idle", "sse"), ("idle", "ws")]
    for r in results:
        assert r["published"] == 50 and r["lost"] == 0 and r["duplicates"] == 0, r
        assert r["closed_by_server"] == 0, r
        assert problems(r) == [], r
    assert results[0]["delivered"] == results[1]["delivered"] == 20 * 50
    assert results[0]["latency_samples"] > 0 and results[1]["latency_samples"] > 0


def test_backlog_bench_with_any_replay_count() -> None:
    """--replay need not be a multiple of the publishers (the replay waited forever before)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backlog_bench.py"), "--events", "40",
                           "--replay", "37", "--publishers", "16"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["replay_per_s_memory"] > 0 and summary["replay_per_s_sqlite"] > 0


def test_backlog_bench_replay_only_slow_reader() -> None:
    """--replay-only: every event after the cursor reaches the (slow) subscriber, from both logs."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "backlog_bench.py"), "--replay-only",
                           "--replay", "3000", "--repeat", "1", "--publishers", "4",
                           "--stream-buffer", "65536", "--slow-reader"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    for log in ("memory", "sqlite"):
        assert len(summary[f"replay_per_s_{log}"]) == 1 and summary[f"replay_per_s_{log}"][0] > 0
        assert summary[f"replay_cpu_s_{log}"][0] > 0


def test_parse_bench_runs() -> None:
    """bench/parse_bench.py at a tiny scale: every request answered (it checks), JSON out."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "parse_bench.py"), "-n", "2000",
                           "--repeat", "1", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["parser"] == "httptools" and res["requests"] == 2000 and res["publish_us"] > 0


def test_bench_cluster_delivers_everything() -> None:
    """``--nodes 3``: three daemons on one redis-server; subscribers on every node get it all."""
    (r,) = run_bench("broadcast", "-n", "21", "--events", "50", "--nodes", "3")
    assert (r["nodes"], r["log"], r["published"], r["expected"]) == (3, "redis (always)", 50, 21 * 50)
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["delivered"] == 21 * 50
    assert not problems(r), r["notes"]


def test_acl_bench_delivers_exactly() -> None:
    """bench/acl_bench.py at a tiny scale: every sink gets exactly what its ACL allows (it checks)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "acl_bench.py"), "-n", "60",
                           "--repeat", "2", "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["ok"] and res["subscribers"] == 60 and len(res["cases"]) == 5

async def _publisher(port: int, path: bytes, first: int, count: int, in_flight: int) -> int:
    """``count`` publishes on one keep-alive connection, ``in_flight`` at a time; the 202s seen."""
    reader, writer = await asyncio.open_connection(HOST, port)
    accepted = 0
    try:
        for start in range(first, first + count, in_flight):
            batch = range(start, min(start + in_flight, first + count))
            for i in batch:
                body = b'{"seq": %d, "pad": "%s"}' % (i, b"x" * 200)
                writer.write(b"PUT %s HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body))
            for _ in batch:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                accepted += head.startswith(b"HTTP/1.1 202 ")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return accepted


async def test_ingest_loses_nothing_and_logs_every_publish(daemon_factory: DaemonFactory) -> None:
    """The harness's ingest shape at a tiny scale (16 keep-alive publishers, access log on, one
    subscriber): every publish is answered 202, delivered once, and has its access line when the
    daemon stops. Correctness only: no figure is asserted."""
    d = daemon_factory()
    conns, each = 16, 150
    async with subscribe(d.url, "/bench/ingest") as sub:
        await wait_subscribers(d.url, 1)
        accepted = await asyncio.gather(*(_publisher(d.port, b"/bench/ingest", c * each, each, 1 + c % 3)
                                          for c in range(conns)))
        assert accepted == [each] * conns
        seqs = [(await sub.next(10))["seq"] for _ in range(conns * each)]
        await sub.expect_none(0.2)  # no duplicates
    assert sorted(seqs) == list(range(conns * each))
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert d.stop() == 0
    log = d.log()
    assert log.count('"PUT /bench/ingest HTTP/1.1" 202 ') == conns * each
    assert log.count('"GET /bench/ingest HTTP/1.1" 200 - ') == 1  # the stream's end line


@pytest.mark.parametrize("nodes", [1, 3])
def test_redis_log_bench_reads_back_every_append(nodes: int) -> None:
    """bench/redis_log_bench.py at a tiny scale: every append acknowledged and read back (by
    every log, with ``--nodes 3``)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "redis_log_bench.py"), "--events", "300",
                           "--dedup", "--nodes", str(nodes), "--json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["events/s"] > 0 and res["node us/event"] > 0
    assert 0 <= res["own reused %"] <= 100 / nodes + 1e-9 and res["entries/read"] > 0


def test_price_probe_reports_every_second_per_cpu() -> None:
    """bench/price_probe.py for 2 s on one CPU, another kept busy: a sample each second per CPU,
    the busy one flagged, and the spinner gone when it returns."""
    cpus = sorted(os.sched_getaffinity(0))
    probed, busy = cpus[0], cpus[-1]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "price_probe.py"), "--seconds", "2",
                           "--cpus", f"{probed},{busy}", "--keep-busy", str(busy), "--json"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    for cpu in {probed, busy}:
        mine = [r for r in rows if r["cpu"] == cpu]
        assert len(mine) >= 2, rows
        assert all(r["unit_us"] > 0 and r["samples"] > 0 for r in mine)
        assert all(r["busy"] is (cpu == busy) for r in mine)
    assert "kept busy" in proc.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "price_probe.py"), "--cpus", "4096"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 2 and "CPU 4096 is not available" in bad.stderr
