"""Cluster mode under faults while publishers keep publishing (real redis-server, three daemons).

Three publishers publish without pause, round-robin over the nodes, while Redis is killed and
restarted (AOF, ``appendfsync always``), hung and woken, and has every client connection cut.
Afterwards every node's subscriber must hold each acknowledged event exactly once, all in the
stream's one order; no event refused as "not stored" may be there; and no node may have taken
the faults for a reset of the stream.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from server.replay import CURSOR_FOUND_HEADER, CURSOR_HEADER
from tests.redis_fixture import RedisServer, redis_server
from tests.support import DaemonFactory, free_port, subscribe, wait_subscribers
from tests.test_cluster import (
    EVENT_TIMEOUT,
    SENTINEL,
    STREAM,
    node_config,
    start_nodes,
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


async def test_faults_while_publishing_lose_and_duplicate_nothing_acknowledged(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    nodes = start_nodes(daemon_factory, redis_server.url)
    acked: set[Key] = set()
    not_stored: set[Key] = set()  # 503 "event not stored"
    in_doubt: set[Key] = set()  # 503 "it may be stored", or no answer at all
    stop = asyncio.Event()

    async def publisher(p: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            n = 0
            while not stop.is_set():
                key = (p, n)
                try:
                    async with s.put(f"{nodes[(p + n) % len(nodes)].url}/t/chaos",
                                     json={"p": p, "n": n}) as r:
                        body = await r.read()
                except (aiohttp.ClientError, TimeoutError):
                    in_doubt.add(key)
                else:
                    if r.status == 202:
                        acked.add(key)
                    elif r.status == 503:
                        (in_doubt if b"may be stored" in body else not_stored).add(key)
                        await asyncio.sleep(0.02)  # Retry-After, shortened (a pause, not synchronisation)
                    else:
                        raise AssertionError(f"publish answered {r.status}: {body[:200]!r}")
                n += 1

    def kill_clients() -> None:
        r = redis_server.client()
        try:
            r.client_kill_filter(_type="normal", skipme=True)
        finally:
            r.close()

    async def served() -> None:
        """Wait until publishes are acknowledged again, and go on publishing for a while."""
        target = len(acked) + AFTER_FAULT
        end = time.monotonic() + EVENT_TIMEOUT
        while len(acked) < target:
            assert time.monotonic() < end, "publishes not acknowledged after the fault"
            await asyncio.sleep(0.01)

    async with subscribers(nodes) as subs:
        pubs = [asyncio.create_task(publisher(p)) for p in range(PUBLISHERS)]
        try:
            await served()
            for _round in range(ROUNDS):
                redis_server.kill()
                redis_server.start()  # same port and files: the AOF is replayed
                await served()
                redis_server.pause()
                await asyncio.sleep(HUNG)  # the fault itself: Redis hung this long
                redis_server.resume()
                await served()
                kill_clients()
                await served()
        finally:
            stop.set()
            await asyncio.gather(*pubs)
        async with aiohttp.ClientSession() as s, s.put(nodes[0].url + SENTINEL, json={}) as resp:
            assert resp.status == 202
        got = [await until_sentinel(sub) for sub in subs]

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
        assert "the stream was reset" not in d.log(), "a fault taken for a reset of the stream"


async def test_a_node_killed_and_restarted_while_publishing_its_clients_resume_without_gap(
        redis_server: RedisServer, daemon_factory: DaemonFactory) -> None:
    """Publishers keep publishing to every live node while one node is killed (SIGKILL) and
    started again. Its subscriber resumes on another node by cursor, and a subscriber of the
    restarted node resumes there: each holds exactly what a node that stayed up delivered."""
    nodes = []
    for i in range(3):
        port = free_port()
        nodes.append(daemon_factory(config=node_config(port, redis_server.url, size=100_000), port=port,
                                    start=False, name=f"node{i}"))
    for d in nodes:
        d.start(wait=False)
    for d in nodes:
        d.wait_ready()
    victim_node = nodes[0]
    live = list(nodes)
    acked: set[Key] = set()
    stop = asyncio.Event()

    async def publisher(p: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            n = 0
            while not stop.is_set():
                d = live[(p + n) % len(live)]
                try:
                    async with s.put(f"{d.url}/t/chaos", json={"p": p, "n": n}) as r:
                        await r.read()
                        if r.status == 202:
                            acked.add((p, n))
                except (aiohttp.ClientError, TimeoutError):
                    pass  # the killed node: its publish's fate is unknown
                n += 1

    async def more(count: int) -> None:
        target = len(acked) + count
        end = time.monotonic() + EVENT_TIMEOUT
        while len(acked) < target:
            assert time.monotonic() < end, "publishes not acknowledged"
            await asyncio.sleep(0.01)

    async with subscribe(nodes[1].url, "/") as reference, subscribe(victim_node.url, "/") as victim:
        await wait_subscribers(nodes[1].url, 1)
        await wait_subscribers(victim_node.url, 1)
        pubs = [asyncio.create_task(publisher(p)) for p in range(PUBLISHERS)]
        try:
            await more(AFTER_FAULT)
            seen: list[dict[str, Any]] = []
            while len(seen) < AFTER_FAULT:
                seen.append(await victim.next(EVENT_TIMEOUT))
            live.remove(victim_node)
            victim_node.kill()
            await more(AFTER_FAULT)
            headers = {CURSOR_HEADER: seen[-1]["pubsub_cursor"]}
            async with subscribe(nodes[2].url, "/", headers) as resumed:
                assert resumed.resp.headers[CURSOR_FOUND_HEADER] == "true"
                victim_node.start()
                live.append(victim_node)
                await more(AFTER_FAULT)
                back_headers = {CURSOR_HEADER: seen[0]["pubsub_cursor"]}
                async with subscribe(victim_node.url, "/", back_headers) as back:
                    assert back.resp.headers[CURSOR_FOUND_HEADER] == "true"
                    await more(AFTER_FAULT)
                    stop.set()
                    await asyncio.gather(*pubs)
                    async with aiohttp.ClientSession() as s, s.put(nodes[1].url + SENTINEL, json={}) as resp:
                        assert resp.status == 202
                    after_kill = await until_sentinel(resumed)
                    after_restart = await until_sentinel(back)
        finally:
            stop.set()
            await asyncio.gather(*pubs)
        everything = await until_sentinel(reference)

    def cursors(events: list[dict[str, Any]]) -> list[str]:
        return [e["pubsub_cursor"] for e in events]

    assert len(set(cursors(everything))) == len(everything), "no event delivered twice"
    assert acked <= {(e["p"], e["n"]) for e in everything}
    start = cursors(everything).index(seen[0]["pubsub_cursor"])
    assert cursors(seen + after_kill) == cursors(everything)[start:], "the victim resumed without gap"
    assert cursors(after_restart) == cursors(everything)[start + 1:], "the restarted node replays without gap"
