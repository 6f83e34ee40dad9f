#!/usr/bin/env python3
"""In-process pubsub: publishes/s of the Hub's key API against a naive loop over subscriptions.

    .venv/bin/python bench/inprocess.py              # 1 000 exact + 1 000 wildcard subscribers
    .venv/bin/python bench/inprocess.py -n 10000 --json

The naive hub is what aiopubsub 2.0 did on every publish: test the key against every subscribed
key with ``is_subset_of``. Ours looks exact keys up in a dict and wildcard keys in a trie, behind
a bounded key → callbacks cache. Each publish below reaches exactly one subscriber; callbacks are
synchronous and only count, so the figure is the routing cost. Scenarios:

* ``exact``: N subscribers on N distinct exact keys; publishes cycle over those keys;
* ``wildcard``: N subscribers on ``('svc', 'nI', '*')``; publishes cycle over N keys (cache hits);
* ``wildcard-cold``: the same subscribers; every publish uses a key never seen (cache misses);
* ``mixed``: both sets of N (2N subscriptions); each publish reaches one exact and one wildcard;
* and the cost of a wildcard subscribe + unsubscribe while the cache is full (its invalidation).

Nothing here opens a socket or starts a process; pure CPU, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub import Hub, Key

logger = logging.getLogger("bench.inprocess")

#: publishes per timed run: long enough to dwarf timer noise, short enough for a quick run
DEFAULT_PUBLISHES = 200_000


def naive_is_subset(key: tuple[str, ...], sub: tuple[str, ...], sub_is_wildcard: bool) -> bool:
    """aiopubsub 2.0's ``Key.is_subset_of``, with ``is_wildcard`` precomputed as it did."""
    if not sub_is_wildcard:
        return key == sub
    n, m = len(key), len(sub)
    if n < m:
        return False
    if n > m and sub[-1] != "*":
        return False
    for s, a in zip(key, sub, strict=False):  # noqa: SIM110 - aiopubsub's loop, as it was
        if a != "*" and s != a:
            return False
    return True


class NaiveHub:
    """aiopubsub 2.0's publish: every subscription tested on every publish."""

    def __init__(self) -> None:
        self.subs: dict[Key, tuple[bool, list[Callable[[Key, Any], None]]]] = {}

    def add_subscriber(self, key: Key, cb: Callable[[Key, Any], None]) -> None:
        self.subs.setdefault(key, (key.is_wildcard, []))[1].append(cb)

    def publish(self, key: Key, message: Any) -> None:
        for sub_key, (wild, cbs) in self.subs.items():
            if naive_is_subset(key, sub_key, wild):
                for cb in cbs:
                    cb(key, message)


def subscriptions(kind: str, n: int) -> list[Key]:
    exact = [Key("svc", f"n{i}", "state") for i in range(n)]
    wild = [Key("svc", f"n{i}", "*") for i in range(n)]
    return {"exact": exact, "wildcard": wild, "wildcard-cold": wild, "mixed": exact + wild}[kind]


def publish_keys(kind: str, n: int, count: int) -> list[Key]:
    if kind == "wildcard-cold":
        return [Key("svc", f"n{i % n}", f"x{i}") for i in range(count)]
    hot = [Key("svc", f"n{i}", "state") for i in range(n)]
    return [hot[i % n] for i in range(count)]


def run(kind: str, impl: str, n: int, count: int, repeat: int) -> dict[str, Any]:
    delivered = [0]

    def cb(_key: Key, _message: Any) -> None:
        delivered[0] += 1

    best = float("inf")
    expected_per_publish = 2 if kind == "mixed" else 1
    runs = count if impl == "ours" else max(1000, count // 50)  # the naive loop is slow
    for _ in range(repeat):
        hub: Hub | NaiveHub = Hub() if impl == "ours" else NaiveHub()
        for k in subscriptions(kind, n):
            hub.add_subscriber(k, cb)
        keys = publish_keys(kind, n, runs)
        delivered[0] = 0
        pub = hub.publish
        t0 = time.perf_counter()
        for k in keys:
            pub(k, None)
        best = min(best, time.perf_counter() - t0)
        if delivered[0] != runs * expected_per_publish:
            raise RuntimeError(f"{kind}/{impl}: delivered {delivered[0]}, "
                               f"expected {runs * expected_per_publish}")
    return {"scenario": kind, "impl": impl, "subscribers": len(subscriptions(kind, n)),
            "publishes": runs, "publishes_per_s": round(runs / best), "us_per_publish": best / runs * 1e6}


def churn(n: int, repeat: int) -> dict[str, Any]:
    """Cost of a wildcard subscribe + unsubscribe while the cache is full (invalidation)."""
    from hub.keyed import CACHE_MAX

    best = float("inf")
    for _ in range(repeat):
        hub = Hub()
        hub.add_subscriber(Key("other", "*"), lambda _k, _m: None)
        for i in range(CACHE_MAX):
            hub.publish(Key("svc", f"n{i}", "state"), None)

        def cb(_key: Key, _message: Any) -> None:
            return None

        t0 = time.perf_counter()
        for i in range(n):
            k = Key("svc", f"n{i}", "*")
            hub.add_subscriber(k, cb)
            hub.remove_subscriber(k, cb)
        best = min(best, time.perf_counter() - t0)
    return {"scenario": "wildcard-churn", "impl": "ours", "cached_keys": CACHE_MAX,
            "us_per_subscribe_unsubscribe": best / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("-n", type=int, default=1000, help="subscribers per kind (default 1000)")
    p.add_argument("--publishes", type=int, default=DEFAULT_PUBLISHES)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("scenarios", nargs="*", default=["exact", "wildcard", "wildcard-cold", "mixed"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for kind in args.scenarios:
        for impl in ("ours", "naive"):
            r = run(kind, impl, args.n, args.publishes, args.repeat)
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{kind:14} {impl:6} {r['subscribers']:6} subs  {r['publishes_per_s']:>10,} publishes/s"
                      f"  ({r['us_per_publish']:.2f} us each)")
    c = churn(args.n, args.repeat)
    if args.json:
        print(json.dumps(c))
    else:
        print(f"wildcard subscribe+unsubscribe with {c['cached_keys']} cached keys: "
              f"{c['us_per_subscribe_unsubscribe']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
