"""Access-control benchmarks.

1. Private fan-out: the hub's routing cost per event with 10 000 subscribers holding distinct
   ACLs, against public fan-out to the same 10 000 (in-process: the router and counting sinks,
   so the figure is the routing cost alone, not socket writes, which are the same either way).
2. LDAP cache: 1 000 concurrent subscriber connects by 50 LDAP users against the real daemon
   and a real slapd; counts the binds slapd logged (target: at most 50).
3. Login timing by user kind: in an ACL file mixing argon2id, bcrypt and plaintext users (each
   at its library's default cost, as an operator would store them), the time one wrong-password
   login takes for a known user of each scheme and for an unknown user (target: all equal, so a
   name's existence cannot be told from the answer time).

    .venv/bin/python bench/auth_bench.py [--subscribers 10000] [--events 200] [--connects 1000]
                                         [--only fanout|ldap|timing] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from hub.event import Event, make_event
from hub.router import NO_ACL, Acl, TopicRouter
from hub.topics import parse_subscription
from server.formats import NDJSON

logger = logging.getLogger("auth_bench")


class CountingSink:
    __slots__ = ("bytes", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def send(self, data: bytes, _events: Sequence[Event] | None) -> None:
        self.writes += 1
        self.bytes += len(data)


async def _per_event(router: TopicRouter, sinks: list[CountingSink], path: str, n: int) -> tuple[float, int]:
    """Mean seconds per event (route + flush) and deliveries per event."""
    before = sum(s.writes for s in sinks)
    events = [make_event(path, {"i": i}) for i in range(n)]
    t = time.perf_counter()
    for ev in events:
        router.route(ev)
        router.flush()  # one event per flush: no coalescing, the worst case
    dt = time.perf_counter() - t
    await asyncio.sleep(0)  # let the scheduled (now empty) flush run
    return dt / n, (sum(s.writes for s in sinks) - before) // n


async def fanout(subscribers: int, n: int) -> None:
    spec = parse_subscription("/commits")
    fmt = NDJSON
    rows = []

    # public fan-out: everyone in one group
    r = TopicRouter()
    sinks = [CountingSink() for _ in range(subscribers)]
    for s in sinks:
        r.subscribe(s, spec, fmt, NO_ACL)
    rows.append(("public event, no ACLs (1 group)", *await _per_event(r, sinks, "/commits/x", n)))

    # distinct ACLs: subscriber i may read segment {commits} and segment {u<i>}
    r = TopicRouter()
    sinks = [CountingSink() for _ in range(subscribers)]
    for i, s in enumerate(sinks):
        acl: Acl = frozenset({frozenset({"commits", "ci"}), frozenset({f"u{i}"})})
        r.subscribe(s, spec, fmt, acl)
    rows.append((f"public event, {subscribers} distinct ACLs", *await _per_event(r, sinks, "/commits/x", n)))
    rows.append(("private event visible to all", *await _per_event(r, sinks, "/private/commits/ci", n)))
    rows.append(("private event visible to one", *await _per_event(r, sinks, "/private/commits/u17", n)))
    rows.append(("private event visible to none", *await _per_event(r, sinks, "/private/commits", n)))

    base = rows[0][1]
    logger.info("fan-out to %d subscribers, %d events each, route + flush per event:", subscribers, n)
    for name, sec, deliveries in rows:
        logger.info("  %-45s %8.3f ms/event  %6d deliveries  (%.1fx public)", name, sec * 1e3,
                    deliveries, sec / base)


async def ldap_storm(connects: int, users: int) -> None:
    from tests.ldap_fixture import Slapd, ldap_config
    from tests.support import Daemon, base_config, free_port, wait_subscribers

    names = [f"user{i:03d}" for i in range(users)]
    slapd = Slapd(extra_users=names).start()
    work = Path(tempfile.mkdtemp(prefix="pypubsub-auth-bench-"))
    try:
        for label, ttl in (("cache on (cache_ttl 300 s)", 300), ("cache off (cache_ttl 0)", 0)):
            port = free_port()
            cfg = base_config(port)
            cfg["clients"]["ldap"] = ldap_config(slapd, cache_ttl=ttl, timeout=10)
            d = Daemon(work / f"d{ttl}", config=cfg, acl={}, port=port).start()
            before = len(slapd.binds())
            for wave in ("first connects", "reconnect wave"):
                dt, ok = await _storm(d.url, names, connects)
                await wait_subscribers(d.url, 0, timeout=60)
                binds = len(slapd.binds()) - before
                before += binds
                logger.info("LDAP, %s, %s: %d connects by %d users in %.2f s (%d answered 200), "
                            "%d binds", label, wave, connects, users, dt, ok, binds)
            logger.info("  fail-closed lines in the daemon log: %d",
                        d.log().count("refusing (fail closed)"))
            d.stop()
    finally:
        slapd.close()


async def _storm(url: str, names: list[str], connects: int) -> tuple[float, int]:
    """``connects`` concurrent authenticated subscribes; returns (seconds until all open, OKs)."""
    from tests.support import auth_header, wait_subscribers

    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        t = time.perf_counter()
        resps = await asyncio.gather(*(
            s.get(url + "/commits", headers=auth_header(names[i % len(names)], f"{names[i % len(names)]}-pw"))
            for i in range(connects)))
        await wait_subscribers(url, connects, timeout=120)
        dt = time.perf_counter() - t
        ok = sum(r.status == 200 for r in resps)
        for r in resps:
            r.close()
    return dt, ok


async def login_timing(rounds: int) -> None:
    from plugins.acl import FileAuthenticator, hash_password, parse_acl

    doc = {
        "argon": {"password": hash_password("argon-pw", "argon2id")},
        "bcrypt": {"password": hash_password("bcrypt-pw", "bcrypt")},
        "plain": {"password": "plain-pw"},
    }
    for i in range(20):  # argon2id is the most common scheme in this file
        doc[f"argon{i}"] = {"password": doc["argon"]["password"]}
    auth = FileAuthenticator(parse_acl(doc, "bench.yaml"))
    kinds = {"known argon2id user": "argon", "known bcrypt user": "bcrypt",
             "known plaintext user": "plain", "unknown user": "nobody"}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):  # interleaved, so that machine noise hits every kind alike
        for kind, user in kinds.items():
            t = time.perf_counter()
            if await auth.authenticate(user, f"wrong-{r}") is not None:
                raise RuntimeError("a wrong password was accepted")
            times[kind].append(time.perf_counter() - t)
    close = getattr(auth, "close", None)  # (lets the same benchmark time older versions)
    if close is not None:
        await close()
    ref = statistics.median(times["unknown user"])
    logger.info("wrong-password login, mixed ACL file (argon2id x21, bcrypt x1, plaintext x1), "
                "median of %d:", rounds)
    for kind, ts in times.items():
        med = statistics.median(ts)
        logger.info("  %-22s %9.2f ms  (min %8.2f, max %8.2f)  %6.2fx the unknown user", kind,
                    med * 1e3, min(ts) * 1e3, max(ts) * 1e3, med / ref)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=10_000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--connects", type=int, default=1000)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7, help="logins per kind for the timing part")
    p.add_argument("--skip-ldap", action="store_true")
    p.add_argument("--only", choices=["fanout", "ldap", "timing"])
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.only in (None, "fanout"):
        asyncio.run(fanout(a.subscribers, a.events))
    if a.only == "ldap" or (a.only is None and not a.skip_ldap):
        asyncio.run(ldap_storm(a.connects, a.users))
    if a.only in (None, "timing"):
        asyncio.run(login_timing(a.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
