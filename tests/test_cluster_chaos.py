"""Cluster mode under faults while publishers keep publishing (real redis-server, three daemons).

Three publishers publish without pause, round-robin over the nodes, while Redis is killed and
restarted (AOF, ``appendfsync always``), hung and woken, and has every client connection cut.
Afterwards every node's subscriber must hold each acknowledged event exactly once, all in the
stream's one order; no event refused as "not stored" may be there; and no node may have taken
the faults for a reset of the stream. A failover to a replica that lacks the newest events,
while publishing, must be reported by every node that delivered one of them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from server.replay import CURSOR_FOUND_HEADER, CURSOR_HEADER
from tests.redis_fixture import RedisServer, redis_server, stream_entries
from tests.support import HOST, Daemon, DaemonFactory, await_until, put, subscribe, wait_subscribers
from tests.test_cluster import (
    EVENT_TIMEOUT,
    SENTINEL,
    STREAM,
    CuttingProxy,
    cursors,
    start_nodes,
    stored_event,
    subscribers,
    until_sentinel,
)

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

PUBLISHERS = 3
ROUNDS = 2
#: publishes acknowledged after a fault before the next: service is back, under load
AFTER_FAULT = 200
#: how long Redis stays hung: longer than a publish's timeout (1 s)
HUNG = 1.5

Key = tuple[int, int]


class Publishers:
    """``PUBLISHERS`` tasks publishing ``{"p": publisher, "n": count}`` without pause,
    round-robin over ``targets`` (a list the test may change meanwhile), each answer sorted by
    what it says of the event."""

    def __init__(self, targets: list[Daemon]) -> None:
        self.targets = targets
        self.acked: set[Key] = set()
        self.not_stored: set[Key] = set()  # 503 "event not stored"
        self.in_doubt: set[Key] = set()  # 503 "it may be stored", or no answer at all
        #: answers neither 202 nor 503
        self.unexpected: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._publish(p)) for p in range(PUBLISHERS)]

    async def _publish(self, p: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            n = 0
            while not self._stop.is_set():
                key = (p, n)
                try:
                    async with s.put(f"{self.targets[(p + n) % len(self.targets)].url}/t/chaos",
                                     json={"p": p, "n": n}) as r:
                        body = await r.read()
                except (aiohttp.ClientError, TimeoutError):
                    self.in_doubt.add(key)  # (a killed node, or a lost answer)
                else:
                    if r.status == 202:
                        self.acked.add(key)
                    elif r.status == 503:
                        (self.in_doubt if b"may be stored" in body else self.not_stored).add(key)
                        await asyncio.sleep(0.02)  # Retry-After, shortened (a pause, not synchronisation)
                    else:
                        self.unexpected.append(f"{r.status}: {body[:200]!r}")
                n += 1

    async def more(self, count: int = AFTER_FAULT) -> None:
        """Wait until ``count`` more publishes are acknowledged: service is back, under load."""
        target = len(self.acked) + count
        end = time.monotonic() + EVENT_TIMEOUT
        while len(self.acked) < target:
            assert time.monotonic() < end, "publishes not acknowledged"
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_faults_while_publishing_lose_and_duplicate_nothing_acknowledged(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)

    def kill_clients() -> None:
        r = redis_server.client()
        try:
            r.client_kill_filter(_type="normal", skipme=True)
        finally:
            r.close()

    async with subscribers(nodes) as subs:
        pubs = Publishers(nodes)
        try:
            await pubs.more()
            for _round in range(ROUNDS):
                redis_server.kill()
                redis_server.start()  # same port and files: the AOF is replayed
                await pubs.more()
                redis_server.pause()
                await asyncio.sleep(HUNG)  # the fault itself: Redis hung this long
                redis_server.resume()
                await pubs.more()
                kill_clients()
                await pubs.more()
        finally:
            await pubs.stop()
        await put(nodes[0], SENTINEL, {})
        got = [await until_sentinel(sub) for sub in subs]
    acked, not_stored, in_doubt = pubs.acked, pubs.not_stored, pubs.in_doubt
    assert not pubs.unexpected, f"publishes answered {pubs.unexpected[:5]}"

    order = [(e["p"], e["n"]) for e in got[0]]
    for g in got:
        assert [(e["p"], e["n"]) for e in g] == order, "every node delivers the same events, in one order"
        assert [e["pubsub_cursor"] for e in g] == [e["pubsub_cursor"] for e in got[0]]
    delivered = set(order)
    assert len(delivered) == len(order), "no event delivered twice"
    assert acked <= delivered, f"acknowledged, not delivered: {sorted(acked - delivered)[:10]}"
    wrong = not_stored & delivered
    assert not wrong, f"refused as not stored, delivered: {sorted(wrong)[:10]}"
    assert delivered <= acked | in_doubt
    client = redis_server.client()
    try:  # every entry ever added (the stream keeps the newest ``size``): one delivered, or the sentinel
        assert client.xinfo_stream(STREAM)["entries-added"] == len(order) + 1
    finally:
        client.close()
    for d in nodes:
        assert "acknowledged events may be lost" not in d.log(), "a fault taken for a reset of the stream"


async def test_a_node_killed_and_restarted_while_publishing_its_clients_resume_without_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """Publishers keep publishing to every live node while one node is killed (SIGKILL) and
    started again. Its subscriber resumes on another node by cursor, and a subscriber of the
    restarted node resumes there: each holds exactly what a node that stayed up delivered."""
    nodes = start_nodes(daemon_factory, redis_server.url, backlog={"size": 100_000})
    victim_node = nodes[0]
    live = list(nodes)

    async with subscribe(nodes[1].url, "/") as reference, subscribe(victim_node.url, "/") as victim:
        await wait_subscribers(nodes[1].url, 1)
        await wait_subscribers(victim_node.url, 1)
        pubs = Publishers(live)
        try:
            await pubs.more()
            seen: list[dict[str, Any]] = []
            while len(seen) < AFTER_FAULT:
                seen.append(await victim.next(EVENT_TIMEOUT))
            live.remove(victim_node)
            victim_node.kill()
            await pubs.more()
            headers = {CURSOR_HEADER: seen[-1]["pubsub_cursor"]}
            async with subscribe(nodes[2].url, "/", headers) as resumed:
                assert resumed.resp.headers[CURSOR_FOUND_HEADER] == "true"
                victim_node.start()
                live.append(victim_node)
                await pubs.more()
                back_headers = {CURSOR_HEADER: seen[0]["pubsub_cursor"]}
                async with subscribe(victim_node.url, "/", back_headers) as back:
                    assert back.resp.headers[CURSOR_FOUND_HEADER] == "true"
                    await pubs.more()
                    await pubs.stop()
                    await put(nodes[1], SENTINEL, {})
                    after_kill = await until_sentinel(resumed)
                    after_restart = await until_sentinel(back)
        finally:
            await pubs.stop()
        everything = await until_sentinel(reference)

    assert len(set(cursors(everything))) == len(everything), "no event delivered twice"
    assert pubs.acked <= {(e["p"], e["n"]) for e in everything}
    start = cursors(everything).index(seen[0]["pubsub_cursor"])
    assert cursors(seen + after_kill) == cursors(everything)[start:], "the victim resumed without gap"
    assert cursors(after_restart) == cursors(everything)[start + 1:], "the restarted node replays without gap"


async def test_failover_to_a_lagging_replica_while_publishing_reports_what_it_lost(
        redis_server: RedisServer, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Publishers keep publishing while Redis fails over to a replica that stopped following a
    moment before (replication is asynchronous: the newest acknowledged events are not on it).
    Every node that delivered an event the new primary lacks says so (its replay history is
    dropped, a resume from a lost event is told "not found"); after the failover every node
    delivers the new primary's events, all of them, once, in its order."""
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port).start()
    rr = replica.client()
    try:
        async with CuttingProxy(redis_server.port) as proxy:
            # (started from a thread: the proxy runs on this loop while the nodes connect)
            nodes = await asyncio.to_thread(start_nodes, daemon_factory, f"redis://{HOST}:{proxy.port}/0",
                                            backlog={"size": 100_000})
            async with subscribers(nodes) as subs:
                pubs = Publishers(nodes)
                try:
                    await pubs.more()
                    await await_until(lambda: rr.info("replication")["master_link_status"] == "up"
                                      and rr.xlen(STREAM) > AFTER_FAULT, EVENT_TIMEOUT, "the replica's copy")
                    rr.replicaof("NO", "ONE")  # what is acknowledged from now on is not on it
                    await pubs.more()
                    kept = len(stream_entries(rr, STREAM))
                    proxy.switch(replica.port)  # the failover
                    await pubs.more()
                finally:
                    await pubs.stop()
                await put(nodes[0], SENTINEL, {})
                got = [await until_sentinel(sub) for sub in subs]
                in_log = [stored_event(i, f) for i, f in stream_entries(rr, STREAM)]
                keys = {(e.get("p"), e.get("n")) for e in in_log}
                after = [e["pubsub_cursor"] for e in in_log[kept:-1]]  # (the last: the sentinel)
                assert len(after) >= AFTER_FAULT
                for d, g in zip(nodes, got, strict=True):
                    lost = [e for e in g if (e["p"], e["n"]) not in keys]
                    assert lost, "every node delivered events the new primary lacks"
                    log = await asyncio.to_thread(d.log)
                    assert "acknowledged events may be lost" in log, "a loss not reported"
                    assert cursors(g)[-len(after):] == after, "after the failover: its events, in its order"
                    async with subscribe(d.url, "/", {CURSOR_HEADER: lost[-1]["pubsub_cursor"]}) as s:
                        assert s.resp.headers[CURSOR_FOUND_HEADER] == "false"
    finally:
        rr.close()
        replica.stop()
