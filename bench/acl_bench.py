#!/usr/bin/env python3
"""Private events against public ones: the cost of routing through the ACL-segment index.

    .venv/bin/python bench/acl_bench.py                 # 10 000 subscribers, 10 000 distinct ACLs
    .venv/bin/python bench/acl_bench.py -n 1000 --json

N counting sinks subscribe to ``/bench`` in the router of the hub (``hub.router.TopicRouter``);
each timed step routes one event and flushes it (what the daemon does once per loop iteration),
in-process, gc off, best of ``--repeat``. Cases:

* ``public-1-group``: every sink without an ACL (one group): the floor of a fan-out;
* ``public-distinct-acls``: every sink with its own ACL {bench} | {uI}: N groups;
* ``private-all-see``: the same sinks, a private event on /bench/fanout: every ACL allows it;
* ``private-one-sees``: sinks with ACL {uI} only; a private event on /bench/u7: one sees it;
* ``mixed-batch``: public and private events in one flush, each sink must get exactly the public
  ones and the private ones its ACL allows.

Every case checks what each sink received against :func:`hub.router.acl_allows` evaluated per
sink; a wrong delivery exits 1 (and ``ok`` is false in the JSON). Speed is reported, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.event import Event, make_event
from hub.router import NO_ACL, Acl, TopicRouter, acl_allows
from hub.topics import parse_subscription
from server.formats import NDJSON

logger = logging.getLogger("bench.acl")


class CountingSink:
    """Counts the events it is sent, by event id (checks exactness)."""

    __slots__ = ("got",)

    def __init__(self) -> None:
        self.got: dict[int, int] = {}

    def send(self, data: bytes, events: Sequence[Event] | None) -> None:  # noqa: ARG002
        if events is None:
            return
        got = self.got
        for e in events:
            got[id(e)] = got.get(id(e), 0) + 1


def _expected(acl: Acl, events: Sequence[Event]) -> dict[int, int]:
    return {id(e): 1 for e in events if not e.private or (acl and acl_allows(acl, e))}


async def _case(n: int, acls: list[Acl], batch: list[Event], repeat: int) -> tuple[float, bool]:
    router = TopicRouter()
    spec = parse_subscription("/bench")
    sinks = [CountingSink() for _ in range(n)]
    for sink, acl in zip(sinks, acls, strict=True):
        router.subscribe(sink, spec, NDJSON, acl)
    ok = True
    best = float("inf")
    for _ in range(repeat):
        for s in sinks:
            s.got.clear()
        t0 = time.perf_counter()
        for ev in batch:
            router.route(ev)
        router.flush_now()
        best = min(best, time.perf_counter() - t0)
        for sink, acl in zip(sinks, acls, strict=True):
            if sink.got != _expected(acl, batch):
                ok = False
    return best / len(batch), ok


async def run(n: int, repeat: int) -> dict[str, Any]:
    distinct: list[Acl] = [frozenset({frozenset({"bench"}), frozenset({f"u{i}"})}) for i in range(n)]
    own: list[Acl] = [frozenset({frozenset({f"u{i}"})}) for i in range(n)]
    pub = make_event("/bench/fanout", {"x": 1})
    priv = make_event("/private/bench/fanout", {"x": 2})
    one = make_event("/private/bench/u7", {"x": 3})
    mixed_acls: list[Acl] = [[NO_ACL, distinct[i], own[i]][i % 3] for i in range(n)]
    mixed = [make_event("/bench/a", {"i": 0}), make_event("/private/bench/u1", {"i": 1}),
             make_event("/private/bench/x", {"i": 2}), make_event("/bench/b", {"i": 3}),
             make_event("/private/bench/u4/u5", {"i": 4})]
    cases = {
        "public-1-group": ([NO_ACL] * n, [pub]),
        "public-distinct-acls": (distinct, [pub]),
        "private-all-see": (distinct, [priv]),
        "private-one-sees": (own, [one]),
        "mixed-batch": (mixed_acls, mixed),
    }
    out: dict[str, Any] = {"subscribers": n, "repeat": repeat, "ok": True, "cases": {}}
    gc.disable()
    try:
        for name, (acls, batch) in cases.items():
            secs, ok = await _case(n, acls, batch, repeat)
            out["cases"][name] = {"us_per_event": round(secs * 1e6, 2), "ok": ok}
            out["ok"] = out["ok"] and ok
    finally:
        gc.enable()
    c = out["cases"]
    floor = c["public-1-group"]["us_per_event"] or 1e-9
    out["private_all_see_over_public"] = round(c["private-all-see"]["us_per_event"] / floor, 2)
    out["private_one_sees_over_public"] = round(c["private-one-sees"]["us_per_event"] / floor, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--subscribers", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(run(args.subscribers, args.repeat))
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for name, r in result["cases"].items():
            logger.info("%-22s %10.1f µs/event  %s", name, r["us_per_event"],
                        "ok" if r["ok"] else "WRONG DELIVERIES")
        logger.info("private (all see) / public (1 group) = %.2fx",
                    result["private_all_see_over_public"])
        logger.info("private (one sees) / public (1 group) = %.3fx",
                    result["private_one_sees_over_public"])
    if not result["ok"]:
        logger.error("wrong deliveries: see the cases marked not ok")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
