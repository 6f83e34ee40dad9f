#!/usr/bin/env python3
"""The SQLite backlog alone, in process: CPU per append and appends/s at a given concurrency.

    taskset -c 1 .venv/bin/python bench/sqlite_append_bench.py [--events 4000] [--inflight 1,4,14,32]

``--inflight`` appends are kept in flight (so about that many share each commit and fsync);
the database is a fresh file in a temporary directory of ``--dir`` (default: the system's), on a
real disk unless told otherwise. CPU is this process's (``time.process_time``: the event loop and
the writer thread); a sync done by Linux AIO runs in the kernel's worker and is not counted (about
25 µs per ``fdatasync`` on the VM of docs/benchmarks.md). ``--thread`` syncs in the writer thread
instead of by AIO. Prints one line per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.event import make_event
from plugins.backlog_sqlite import SqliteLog

PAD = "x" * 100


async def run(events: int, inflight: int, where: Path, aio: bool) -> str:
    log = SqliteLog(where / "b.db", max(events, 1000), aio=aio)
    await log.start()
    left = events

    async def publisher() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await log.append(make_event("/t/x", {"n": left, "pad": PAD}))

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*[publisher() for _ in range(inflight)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per_commit = log.written / max(log.commits, 1)
    finally:
        await log.close()
    return (f"in flight {inflight:3d}: {events / wall:8.0f} appends/s, {cpu / events * 1e6:6.1f} µs CPU "
            f"per append, {per_commit:5.1f} appends per commit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--inflight", default="1,4,14,32", help="comma-separated concurrencies")
    ap.add_argument("--dir", default=None, help="where the temporary database goes")
    ap.add_argument("--thread", action="store_true", help="sync in the writer thread, not by AIO")
    a = ap.parse_args()
    for n in (int(x) for x in a.inflight.split(",")):
        with tempfile.TemporaryDirectory(dir=a.dir, prefix="sqlite-append-bench-") as d:
            sys.stdout.write(asyncio.run(run(a.events, n, Path(d), not a.thread)) + "\n")


if __name__ == "__main__":
    main()
