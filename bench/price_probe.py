#!/usr/bin/env python3
"""What a fixed piece of work costs on each CPU, second by second: is the machine's price steady?

    python3 bench/price_probe.py --seconds 60                  # CPUs 0 and 1, nothing else running
    python3 bench/price_probe.py --seconds 60 --keep-busy 1    # CPU 1 never idle (see below)
    python3 bench/price_probe.py --seconds 900 --json > p.jsonl &   # beside a benchmark

On each CPU of ``--cpus`` a process pinned to it runs the same unit of Python work (a loop of
``--work`` iterations of integer arithmetic and a small dict store) every ``--interval`` seconds
and times it in its own CPU time (``time.thread_time``: time the probe was preempted is not
counted). The unit takes about 1 % of a CPU. Each second's median is printed (``--json``: one
object per CPU and second), then the spread of those medians per CPU.

On a machine whose price is steady, every second's median is the same within a few per cent.
On a virtual machine whose host shares its physical CPUs, the same unit can cost much more
for seconds at a time, with nothing in the guest to show why; figures from a run that falls in
such a phase measure the host, not the code. ``--keep-busy CPUS`` runs a ``SCHED_IDLE`` spinner
on those CPUs (it takes only what no other process wants), to compare a CPU that never idles.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection

logger = logging.getLogger("price_probe")


def unit(work: int) -> int:
    """The fixed piece of work that is timed."""
    s = 0
    d: dict[int, int] = {}
    for i in range(work):
        s += i * i
        d[i & 63] = s
    return s


def probe(cpu: int, seconds: float, interval: float, work: int, out: Connection) -> None:
    """Pinned to ``cpu``: time ``unit`` every ``interval`` s for ``seconds``; send each second's
    (second, median µs, samples) to ``out``."""
    os.sched_setaffinity(0, {cpu})
    end = time.time() + seconds
    second, costs = int(time.time()), list[float]()
    while time.time() < end:
        c0 = time.thread_time()
        unit(work)
        c1 = time.thread_time()
        now = int(time.time())
        if now != second:
            if costs:
                out.send((second, statistics.median(costs), len(costs)))
            second, costs = now, []
        costs.append((c1 - c0) * 1e6)
        time.sleep(interval)
    if costs:
        out.send((second, statistics.median(costs), len(costs)))
    out.send(None)
    out.close()


def spin(cpu: int, seconds: float) -> None:
    """Keep ``cpu`` from idling, at the lowest priority there is (``SCHED_IDLE``)."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(100_000):
            pass


def cpu_list(text: str) -> list[int]:
    try:
        cpus = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of CPU numbers: {text!r}") from None
    available = os.sched_getaffinity(0)
    for c in cpus:
        if c not in available:
            raise argparse.ArgumentTypeError(f"CPU {c} is not available to this process")
    return cpus


def spread(medians: list[float]) -> dict[str, float]:
    """min, p10, p50, p90, max of per-second medians, and the share of seconds at least 1.4
    times the cheapest second (the "dear" seconds)."""
    s = sorted(medians)
    n = len(s)
    return {"min": s[0], "p10": s[n // 10], "p50": s[n // 2], "p90": s[n * 9 // 10], "max": s[-1],
            "dear_share": sum(1 for m in s if m >= 1.4 * s[0]) / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=cpu_list, default="0,1", help="CPUs to probe (default: 0,1)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long (default 30)")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between units (default 0.01)")
    ap.add_argument("--work", type=int, default=3000, help="iterations per unit (default 3000)")
    ap.add_argument("--keep-busy", type=cpu_list, default=[], metavar="CPUS",
                    help="run a SCHED_IDLE spinner on these CPUs meanwhile")
    ap.add_argument("--json", action="store_true", help="one JSON object per CPU and second")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cpus: list[int] = a.cpus
    if a.seconds <= 0 or a.interval < 0 or a.work <= 0:
        ap.error("--seconds and --work must be positive, --interval not negative")
    ctx = multiprocessing.get_context("fork")
    spinners = [ctx.Process(target=spin, args=(c, a.seconds + 1), daemon=True) for c in a.keep_busy]
    for p in spinners:
        p.start()
    pipes, probes = [], []
    for c in cpus:
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=probe, args=(c, a.seconds, a.interval, a.work, tx), daemon=True)
        p.start()
        tx.close()
        pipes.append((c, rx))
        probes.append(p)
    per_cpu: dict[int, list[tuple[int, float, int]]] = {c: [] for c in cpus}
    try:
        for c, rx in pipes:
            while (item := rx.recv()) is not None:
                per_cpu[c].append(item)
                if a.json:
                    sys.stdout.write(json.dumps({"cpu": c, "second": item[0], "unit_us": round(item[1], 1),
                                                 "samples": item[2], "busy": c in a.keep_busy}) + "\n")
    except BrokenPipeError:  # the reader went away (``| head``): nothing left to report to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for p in (*probes, *spinners):
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
    for c in cpus:
        rows = per_cpu[c]
        if not rows:
            logger.warning("CPU %d: no samples", c)
            continue
        medians = [m for _s, m, _n in rows]
        sp = spread(medians)
        if not a.json:
            sys.stdout.write(f"CPU {c}{' (kept busy)' if c in a.keep_busy else ''}: "
                             + " ".join(f"{m:.0f}" for m in medians) + "\n")
        sys.stdout.flush()
        logger.info("CPU %d%s: unit µs per second's median: min %.0f p10 %.0f p50 %.0f p90 %.0f max %.0f; "
                    "%.0f %% of seconds at 1.4 times the cheapest or more", c,
                    " (kept busy)" if c in a.keep_busy else "",
                    sp["min"], sp["p10"], sp["p50"], sp["p90"], sp["max"], 100 * sp["dear_share"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
