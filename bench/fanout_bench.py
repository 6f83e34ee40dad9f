#!/usr/bin/env python3
"""The router's own CPU per event: route + flush into in-process sinks, no socket.

    .venv/bin/python bench/fanout_bench.py            # selective (10 000 topics) and broadcast (100)
    .venv/bin/python bench/fanout_bench.py --json
    .venv/bin/python bench/fanout_bench.py --root OTHER     # another checkout (e.g. an older one)

``selective``: N subscribers on ``/git/repo0`` … ``/git/repoN-1`` (one per topic), each event for
one of them, flushed every ``--per-flush`` events (1: the idle case; 8: what one loop iteration
reads from 8 publisher connections). ``broadcast``: 100 subscribers on one path. The sinks only
count, so the figure is what the router adds per event on top of the socket writes. The events'
framed bytes are built before timing (the publish path does that once per event). Pure CPU,
``time.process_time()``, best of ``--repeat``, gc off while timing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.fanout")


class CountingSink:
    __slots__ = ("deliveries",)

    def __init__(self) -> None:
        self.deliveries = 0

    def send(self, _data: bytes, events: Sized | None) -> None:
        if events is not None:
            self.deliveries += len(events)


async def case(kind: str, n: int, events: int, per_flush: int, repeat: int) -> dict[str, Any]:
    from hub.event import make_event  # from --root's checkout
    from hub.router import TopicRouter
    from hub.topics import parse_subscription
    from server.formats import NDJSON

    router = TopicRouter()
    # older checkouts named it _flush_now
    flush_now: Callable[[], None] = (getattr(router, "flush_now", None)
                                     or getattr(router, "_flush_now"))  # noqa: B009
    sinks = [CountingSink() for _ in range(n)]
    paths = [f"/git/repo{i}" for i in range(n)] if kind == "selective" else ["/bench/all"]
    for i, s in enumerate(sinks):
        router.subscribe(s, parse_subscription(paths[i % len(paths)]), NDJSON)
    evs = [make_event(paths[i % len(paths)], {"i": i}) for i in range(events)]
    for e in evs:
        e.wire(NDJSON)
    best = float("inf")
    for _ in range(repeat):
        for s in sinks:
            s.deliveries = 0
        gc.disable()
        try:
            t0 = time.process_time()
            for k in range(0, events, per_flush):
                for e in evs[k:k + per_flush]:
                    router.route(e)
                flush_now()
            best = min(best, time.process_time() - t0)
        finally:
            gc.enable()
        want = events if kind == "selective" else events * n
        got = sum(s.deliveries for s in sinks)
        if got != want:
            raise RuntimeError(f"{kind}: delivered {got}, expected {want}")
    return {"scenario": kind, "subscribers": n, "events": events, "per_flush": per_flush,
            "us_per_event": round(best / events * 1e6, 3)}


async def main_async(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for per in a.per_flush:
        rows.append(await case("selective", a.subscribers, a.events, per, a.repeat))
    for per in a.per_flush:
        rows.append(await case("broadcast", 100, a.events // 10, per, a.repeat))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose hub/ is measured (default: this one)")
    ap.add_argument("-n", "--subscribers", type=int, default=10_000, help="selective: distinct topics")
    ap.add_argument("--events", type=int, default=80_000)
    ap.add_argument("--per-flush", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(a.root.resolve()))
    rows = asyncio.run(main_async(a))
    for r in rows:
        r["root"] = str(a.root)
        if a.json:
            sys.stdout.write(json.dumps(r) + "\n")
        else:
            sys.stdout.write(f"{a.root}: {r['scenario']:10} {r['subscribers']:>6} subscribers, "
                             f"{r['per_flush']} event(s) per flush: {r['us_per_event']:7.3f} µs per event\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
