"""The persistent backlog through the real daemon: restarts, kill -9, torn tails, 0.7.4 import."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from server.replay import CURSOR_FOUND_HEADER
from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    Subscription,
    auth_header,
    await_until,
    base_config,
    free_port,
    publish,
    subscribe,
)
from tests.test_fastlane_async import pub, read_answer

ALICE = {"alice": {"password": "alice-pw", "acl": {"foo": ["foo"]}}}
#: Rounds of the kill -9 loop and the publishers in each (kept small: the suite stays fast)
KILL_ROUNDS = 4
PUBLISHERS = 16
SEED = int(os.environ.get("PYPUBSUB_KILL_SEED", "0")) or random.randrange(1 << 30)


def durable_daemon(factory: DaemonFactory, storage: str | None = None, start: bool = True,
                   **backlog: Any) -> Daemon:
    port = free_port()
    cfg = base_config(port)
    d = factory(config=cfg, port=port, acl=ALICE, start=False)
    cfg["server"]["backlog"] = {"size": 100_000, "storage": storage or str(d.workdir / "backlog.db"),
                                **backlog}
    d.write_files()
    if start:
        d.start()
    return d


async def read_all(d: Daemon, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Everything the backlog replays to an all-seeing subscriber, up to a live marker."""
    hdrs = {"X-Fetch-Since": "0", **auth_header("alice", "alice-pw"), **(headers or {})}
    marker = uuid.uuid4().hex
    async with subscribe(d.url, "/", headers=hdrs) as sub:
        await publish(d.url, "/marker", {"marker": marker})
        out: list[dict[str, Any]] = []
        while True:
            ev = await sub.next(timeout=20)
            if ev.get("marker") == marker:
                return out
            out.append(ev)


async def test_restart_keeps_exact_events_and_cursors(daemon_factory: DaemonFactory) -> None:
    d = durable_daemon(daemon_factory)
    for path, body in [("/foo/a", {"n": 0}), ("/private/foo/b", {"n": 1, "s": "é"}), ("/bar", {"n": 2})]:
        assert (await publish(d.url, path, body))[0] == 202
    before = [e for e in await read_all(d) if "n" in e]
    assert d.stop() == 0
    d.start()
    after = [e for e in await read_all(d) if "n" in e]
    assert after == before  # every field: path, topics, timestamp, cursor, payload
    assert before[1]["pubsub_path"] == "/private/foo/b" and before[1]["pubsub_topics"] == ["foo", "b"]
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": before[0]["pubsub_cursor"]}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
        assert (await sub.next())["n"] == 2  # the private one is not for anonymous eyes
    assert "4 event(s) retained" in d.log()  # 3 + read_all's marker


async def test_kill9_loop_loses_no_acknowledged_event(daemon_factory: DaemonFactory) -> None:
    rng = random.Random(SEED)
    d = durable_daemon(daemon_factory)
    acked: set[int] = set()
    live: dict[int, tuple[str, float]] = {}  # n -> (cursor, timestamp) as first delivered
    counter = iter(range(1 << 30))
    last_live_cursor = None
    for rnd in range(KILL_ROUNDS):
        kill_after = len(acked) + rng.randrange(30, 400)
        killed = asyncio.Event()

        async def publisher(s: aiohttp.ClientSession, kill_after: int = kill_after,
                            killed: asyncio.Event = killed) -> None:
            while not killed.is_set():
                n = next(counter)
                try:
                    async with s.put(d.url + f"/k/{n % 7}", data=json.dumps({"n": n})) as r:
                        ok = r.status == 202
                except aiohttp.ClientError:
                    return  # the daemon is gone
                if ok:
                    acked.add(n)
                if len(acked) >= kill_after and not killed.is_set():
                    killed.set()
                    d.kill()  # SIGKILL, at whatever point the other publishers are

        async def watcher() -> None:
            nonlocal last_live_cursor
            try:
                async with subscribe(d.url, "/k") as sub:
                    while True:
                        ev = await sub.next(timeout=30)
                        live.setdefault(ev["n"], (ev["pubsub_cursor"], ev["pubsub_timestamp"]))
                        last_live_cursor = ev["pubsub_cursor"]
            except (aiohttp.ClientError, EOFError, ConnectionError):
                return

        watch = asyncio.create_task(watcher())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PUBLISHERS)) as s:
            await asyncio.gather(*[publisher(s) for _ in range(PUBLISHERS)])
        await asyncio.wait_for(watch, 30)
        assert killed.is_set(), f"round {rnd}: never killed (seed {SEED})"
        d.start()
        got = [e for e in await read_all(d) if "n" in e]
        cursors = [e["pubsub_cursor"] for e in got]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors), f"order (seed {SEED})"
        by_n = {e["n"]: e for e in got}
        missing = acked - by_n.keys()
        assert not missing, f"round {rnd}: {len(missing)} acknowledged event(s) lost (seed {SEED})"
        for n, (cur, ts) in live.items():
            if n in by_n:
                assert (by_n[n]["pubsub_cursor"], by_n[n]["pubsub_timestamp"]) == (cur, ts)
            else:
                assert n not in acked
        # a client resuming with the last cursor it saw before the crash
        if last_live_cursor is not None:
            async with subscribe(d.url, "/k", headers={"X-Fetch-Since-Cursor": last_live_cursor}) as sub:
                assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
                i = cursors.index(last_live_cursor)
                if i + 1 < len(got):
                    assert (await sub.next())["pubsub_cursor"] == cursors[i + 1]
    assert len(acked) >= KILL_ROUNDS * 30


async def test_kill9_right_after_a_pipelined_burst_loses_no_202(daemon_factory: DaemonFactory) -> None:
    """Publishers pipelining many publishes each (the fast lane's asynchronous answers, group
    commits shared by all of them); SIGKILL as soon as half of them are answered 202: after a
    restart every event answered 202 is replayed, each connection's in its request order."""
    d = durable_daemon(daemon_factory)
    conns, per_conn = 8, 60
    acked: dict[int, int] = {}  # connection -> how many of its publishes were answered 202
    killed = asyncio.Event()

    async def publisher(c: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, d.port)
        try:
            writer.write(b"".join(pub(b"/burst/%d" % c, c * 1000 + i) for i in range(per_conn)))
            await writer.drain()
            for i in range(per_conn):
                status, _, _ = await read_answer(reader, 20)
                assert status == b"HTTP/1.1 202 Accepted", status
                acked[c] = i + 1  # answers come in request order
                if sum(acked.values()) >= conns * per_conn // 2 and not killed.is_set():
                    killed.set()
                    d.kill()  # SIGKILL, with the other answers still being written
        except (asyncio.IncompleteReadError, ConnectionError):
            assert killed.is_set()  # the daemon is gone
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    await asyncio.gather(*[publisher(c) for c in range(conns)])
    assert killed.is_set()
    d.start()
    got = [e["i"] for e in await read_all(d) if "i" in e]
    for c in range(conns):
        mine = [i - c * 1000 for i in got if i // 1000 == c]
        assert mine == list(range(len(mine))), f"connection {c}: replayed out of order or with gaps"
        assert len(mine) >= acked.get(c, 0), f"connection {c}: {acked[c]} answered 202, {len(mine)} kept"


async def test_torn_wal_tail_is_recovered(daemon_factory: DaemonFactory) -> None:
    d = durable_daemon(daemon_factory)
    for n in range(20):
        assert (await publish(d.url, "/t", {"n": n}))[0] == 202
    d.kill()
    wal = d.workdir / "backlog.db-wal"
    assert wal.exists()
    # a half-written frame, as a crash mid-write leaves it
    wal.write_bytes(wal.read_bytes() + os.urandom(3000))
    d.start()
    got = [e["n"] for e in await read_all(d) if "n" in e]
    assert got == list(range(20))
    # a WAL cut inside its last frame (power lost mid-sync of a not yet acknowledged commit):
    # that transaction is discarded, the daemon starts with the intact prefix
    assert (await publish(d.url, "/t", {"n": 20}))[0] == 202
    d.kill()
    data = wal.read_bytes()
    wal.write_bytes(data[:-100])
    d.start()
    got = [e["n"] for e in await read_all(d) if "n" in e]
    assert got in (list(range(20)), list(range(21)))


def _v7(ms: int) -> str:
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | random.getrandbits(62)))


async def test_imports_074_backlog_on_first_start(daemon_factory: DaemonFactory) -> None:
    d = durable_daemon(daemon_factory, storage="placeholder", start=False)
    storage = d.workdir / "backlog.json"
    d.config["server"]["backlog"]["storage"] = str(storage)
    d.write_files()
    now = time.time()
    future = _v7(int((now + 3600) * 1000))  # the clock stepped back an hour since it was written
    lines = [
        # 0.7.4 restored events without their leading '/', and used random UUID4 cursors
        {"n": 0, "pubsub_topics": ["old", "a"], "pubsub_path": "old/a", "pubsub_timestamp": now - 50,
         "pubsub_cursor": "f3b0c442-98fc-4c14-9afb-f4c8996fb924"},
        {"n": 1, "pubsub_topics": ["foo", "p"], "pubsub_path": "/private/foo/p",
         "pubsub_timestamp": now - 40, "pubsub_cursor": "0b5e2d6a-4c1f-4e0a-8a7e-2f3d4c5b6a79"},
        {"n": 2, "pubsub_topics": ["old", "b"], "pubsub_path": "/old/b", "pubsub_timestamp": now - 30,
         "pubsub_cursor": future},
    ]
    storage.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"n": 3, "pubsub_to')
    d.start()
    assert (await publish(d.url, "/new", {"n": 4}))[0] == 202
    got = [e for e in await read_all(d) if "n" in e]
    assert [e["n"] for e in got] == [0, 1, 2, 4]
    assert got[0]["pubsub_path"] == "/old/a" and got[0]["pubsub_cursor"] == lines[0]["pubsub_cursor"]
    assert got[1]["pubsub_topics"] == ["foo", "p"] and got[1]["pubsub_path"] == "/private/foo/p"
    assert got[3]["pubsub_cursor"] > future  # new cursors sort after every stored one
    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": str(lines[0]["pubsub_cursor"])}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
        assert [(await sub.next())["n"] for _ in range(2)] == [2, 4]  # 1 is private
    assert d.stop() == 0
    d.start()  # imported once: a second start opens the database
    assert [e["n"] for e in await read_all(d) if "n" in e] == [0, 1, 2, 4]
    assert d.log().count("imported 3 event(s)") == 1
    assert Path(str(storage) + ".0.7.4-backup").exists()  # noqa: ASYNC240


class Payload074:
    """0.7.4's ``Payload`` (pypubsub.py), reproduced: how it stamps an event it accepted."""

    def __init__(self, path: str, data: dict[str, Any], timestamp: float | None = None) -> None:
        self.json = data
        self.timestamp = timestamp or time.time()
        self.topics = [x for x in path.split("/") if x]
        self.private = False
        self.cursor = str(uuid.uuid4())
        if self.topics and self.topics[0] == "private":
            self.private = True
            del self.topics[0]
        self.json["pubsub_timestamp"] = self.timestamp
        self.json["pubsub_topics"] = self.topics
        self.json["pubsub_path"] = path
        self.json["pubsub_cursor"] = self.cursor


def write_backlog_storage_074(path: Path, backlog: list[Payload074]) -> None:
    """0.7.4's ``write_backlog_storage``: one ``json.dumps`` of its four-key wrapper per line."""
    with open(path, "w+") as f:
        for item in backlog:
            f.write(json.dumps({
                "timestamp": item.timestamp,
                "topics": item.topics,
                "json": item.json,
                "private": item.private,
            }) + "\n")


async def test_imports_074_wrapper_lines_with_paths_privacy_and_cursors(
        daemon_factory: DaemonFactory) -> None:
    d = durable_daemon(daemon_factory, storage="placeholder", start=False)
    storage = d.workdir / "backlog.json"
    d.config["server"]["backlog"]["storage"] = str(storage)
    d.write_files()
    now = time.time()
    backlog = [
        Payload074("/foo/a", {"n": 0}, now - 50),
        Payload074("/private/foo/secret", {"n": 1, "s": "é"}, now - 40),
        Payload074("/bar", {"n": 2}, now - 30),
        Payload074("/private/foo", {"n": 3}, now - 20),
        # an event 0.7.4 itself had read back from its file: its path lost the leading '/'
        Payload074("foo/restored", {"n": 4}, now - 10),
    ]
    write_backlog_storage_074(storage, backlog)
    d.start()
    assert "imported 5 event(s)" in d.log()

    got = [e for e in await read_all(d) if "n" in e]  # alice may read the foo segment
    assert [e["n"] for e in got] == [0, 1, 2, 3, 4]
    for e, p in zip(got, backlog, strict=True):
        assert e["pubsub_cursor"] == p.cursor  # the cursor 0.7.4 handed out
        assert e["pubsub_timestamp"] == p.timestamp
        assert e["pubsub_topics"] == p.topics
        assert not {"json", "timestamp", "topics", "private"} & set(e)  # no wrapper fields inside
    assert [e["pubsub_path"] for e in got] == ["/foo/a", "/private/foo/secret", "/bar", "/private/foo",
                                               "/foo/restored"]
    assert got[1]["s"] == "é"

    # anonymous: never the private events, from the start or resuming by a 0.7.4 cursor
    anon = await read_all(d, headers={"Authorization": ""})
    assert [e["n"] for e in anon if "n" in e] == [0, 2, 4]

    async def numbered(sub: Subscription, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            e = await sub.next()
            if "n" in e:  # read_all's markers are in the backlog too
                out.append(e["n"])
        return out

    async with subscribe(d.url, "/", headers={"X-Fetch-Since-Cursor": backlog[0].cursor}) as sub:
        assert sub.resp.headers[CURSOR_FOUND_HEADER] == "true"
        assert await numbered(sub, 2) == [2, 4]
        await publish(d.url, "/private/foo", {"n": 5})
        await publish(d.url, "/live", {"n": 6})
        assert await numbered(sub, 1) == [6]  # then live, still without private events
    async with subscribe(d.url, "/foo", headers={"X-Fetch-Since-Cursor": backlog[1].cursor,
                                                 **auth_header("alice", "alice-pw")}) as sub:
        assert await numbered(sub, 3) == [3, 4, 5]


async def test_max_age_deletes_from_disk_without_new_publishes(daemon_factory: DaemonFactory) -> None:
    """Privacy: an expired event leaves the file too, even when nothing else is published."""
    d = durable_daemon(daemon_factory, max_age="1s")
    assert (await publish(d.url, "/secret", {"n": 0}))[0] == 202
    db = d.workdir / "backlog.db"

    def rows() -> int:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            con.close()

    assert rows() == 1
    await await_until(lambda: rows() == 0, timeout=10, what="the expired row to be deleted")
    async with subscribe(d.url, "/", headers={"X-Fetch-Since": "0"}) as sub:
        await publish(d.url, "/after", {"n": 1})
        assert (await sub.next())["n"] == 1


def test_unusable_storage_is_a_configuration_error(daemon_factory: DaemonFactory) -> None:
    d = durable_daemon(daemon_factory, storage="placeholder", start=False)
    d.config["server"]["backlog"]["storage"] = str(d.workdir)  # a directory
    d.write_files()
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 2
    assert "server.backlog.storage" in d.log() and "Traceback" not in d.log()


async def test_live_events_held_behind_imported_random_cursors(daemon_factory: DaemonFactory) -> None:
    """0.7.4's UUID4 cursors do not sort by time: held live events must still be flushed."""
    d = durable_daemon(daemon_factory, storage="placeholder", start=False)
    storage = d.workdir / "backlog.json"
    d.config["server"]["backlog"]["storage"] = str(storage)
    d.write_files()
    now, blob, n_old = time.time(), "x" * 4000, 3000
    lines = [{"n": i, "blob": blob, "pubsub_topics": ["g"], "pubsub_path": "/g",
              "pubsub_timestamp": now - n_old + i, "pubsub_cursor": str(uuid.uuid4())}
             for i in range(n_old)]
    lines[-1]["pubsub_cursor"] = "ffffffff-ffff-4fff-bfff-ffffffffffff"  # sorts after any UUIDv7
    storage.write_text("".join(json.dumps(x) + "\n" for x in lines))
    d.start()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as s, \
            s.get(d.url + "/g", headers={"X-Fetch-Since": "0"}) as resp:
        for n in range(n_old, n_old + 20):  # while the ~12 MB replay waits for this reader
            assert (await publish(d.url, "/g", {"n": n}))[0] == 202
        seen: list[int] = []
        try:
            async with asyncio.timeout(30):
                while len(seen) < n_old + 20:
                    line = await resp.content.readline()
                    assert line, f"stream ended after {len(seen)} events"
                    obj = json.loads(line)
                    if "n" in obj:
                        seen.append(obj["n"])
        except TimeoutError:
            pass  # reported below
    assert seen == list(range(n_old + 20))
