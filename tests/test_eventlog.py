"""The event log backends without sockets: the memory ring and the SQLite log (real SQLite files)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from hub.cursor import cursor_time
from hub.event import Event, make_event
from hub.hub import Hub
from hub.topics import parse_subscription
from plugins.backlog_sqlite import IMPORT_BACKUP_SUFFIX, SqliteLog
from server.errors import ServiceUnavailable
from server.eventlog import COMPACT_MIN, Appended, MemoryLog
from server.formats import NDJSON
from server.ingest import Ingest
from server.replay import CURSOR_FOUND_HEADER, TRUNCATED_HEADER, Replayer
from tests.support import await_until


class Clock:
    """A settable clock for age eviction (time is an input of the ring, not a component)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def events(n: int, start: float = 1_000_000.0, path: str = "/a/b") -> list[Event]:
    return [make_event(path, {"n": i}, timestamp=start + i) for i in range(n)]


def ns(evs: list[Event]) -> list[int]:
    return [e.payload["n"] for e in evs]


async def test_memory_ring_trims_by_size_and_finds_cursors() -> None:
    log = MemoryLog(5)
    evs = events(12)
    for e in evs:
        log.append(e)  # synchronous: nothing to await
    assert len(log) == 5
    assert await log.locate(cursor=evs[3].cursor) is None  # evicted
    loc = await log.locate(cursor=evs[8].cursor)
    assert loc is not None and loc.pending == 3
    assert ns(await log.read(loc.position, 0)) == [9, 10, 11]
    assert ns(await log.read(loc.position, 2)) == [10, 11]  # the newest when capped
    assert await log.locate(cursor="no-such-cursor") is None


async def test_memory_ring_disabled_keeps_nothing() -> None:
    log = MemoryLog(0)
    e = events(1)[0]
    log.append(e)
    assert len(log) == 0
    assert await log.locate(cursor=e.cursor) is None
    loc = await log.locate(since=0)
    assert loc is not None and await log.read(loc.position, 0) == []


async def test_memory_ring_evicts_by_age() -> None:
    clock = Clock(1_000_000.0)
    log = MemoryLog(100, max_age=10, clock=clock)
    evs = events(20, start=1_000_000.0 - 19)  # ages 19..0 s
    for e in evs:
        log.append(e)
    assert len(log) == 11  # ages 10..0 survive (older than 10 s evicted on append)
    clock.now += 5
    assert await log.locate(cursor=evs[10].cursor) is None
    loc = await log.locate(since=0)
    assert loc is not None
    assert ns(await log.read(loc.position, 0)) == list(range(14, 20))
    assert log.take_dropped() == 14


async def test_memory_ring_since_time_survives_clock_steps() -> None:
    log = MemoryLog(100)
    stamps = [10.0, 11.0, 12.0, 5.0, 13.0, 14.0]  # the clock stepped back once
    for i, ts in enumerate(stamps):
        log.append(make_event("/t", {"n": i}, timestamp=ts))
    loc = await log.locate(since=11.5)
    assert loc is not None
    got = [e for e in await log.read(loc.position, 0) if e.timestamp > 11.5]
    assert ns(got) == [2, 4, 5]


async def test_memory_ring_compacts_without_losing_positions() -> None:
    log = MemoryLog(10)
    evs = events(COMPACT_MIN * 5 + 7)
    for e in evs:
        log.append(e)
    assert len(log._events) < COMPACT_MIN * 3  # the evicted prefix was dropped
    for back in (1, 5, 10):
        loc = await log.locate(cursor=evs[-back].cursor)
        assert loc is not None and loc.pending == back - 1
        assert ns(await log.read(loc.position, 0)) == ns(evs[len(evs) - back + 1:])


async def test_replayer_plans_and_bounds() -> None:
    log = MemoryLog(1000)
    evs = events(50)
    for e in evs:
        log.append(e)
    rp = Replayer(log, max_replay=10)
    assert await rp.plan({}) is None
    p = await rp.plan({"X-Fetch-Since-Cursor": "nope"})
    assert p is not None and not p.needed and p.headers == {CURSOR_FOUND_HEADER: "false"}
    p = await rp.plan({"X-Fetch-Since-Cursor": evs[45].cursor})
    assert p is not None and p.needed and p.headers == {CURSOR_FOUND_HEADER: "true"}
    p = await rp.plan({"X-Fetch-Since": "0"})
    assert p is not None and p.headers == {TRUNCATED_HEADER: "true"} and p.limit == 10
    p = await rp.plan({"X-Fetch-Since": str(evs[44].timestamp)})
    assert p is not None and TRUNCATED_HEADER not in p.headers
    with pytest.raises(Exception, match="epoch"):
        await rp.plan({"X-Fetch-Since": "yesterday"})


# -- SQLite ----------------------------------------------------------------------------------
async def test_sqlite_log_restores_events_exactly(tmp_path: Path) -> None:
    path = tmp_path / "backlog.db"
    log = SqliteLog(path, 100)
    await log.start()
    evs = [make_event("/private/a/b", {"x": "é", "big": 2**70}), make_event("/c/d", {"y": [1, 2]})]
    await asyncio.gather(*[log.append(e) for e in evs])
    await log.close()

    log2 = SqliteLog(path, 100)
    await log2.start()
    loc = await log2.locate(since=0)
    assert loc is not None
    got = await log2.read(loc.position, 0)
    await log2.close()
    assert [(e.path, e.topics, e.private, e.timestamp, e.cursor, e.json) for e in got] == \
        [(e.path, e.topics, e.private, e.timestamp, e.cursor, e.json) for e in evs]
    assert got[0].path == "/private/a/b" and got[0].topics == ("a", "b") and got[0].private


async def test_sqlite_group_commit_shares_transactions(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "b.db", 10_000)
    await log.start()
    evs = events(400)
    await asyncio.gather(*[log.append(e) for e in evs])
    commits, written = log.commits, log.written
    await log.close()
    assert written == 400
    assert commits < 400 / 4, f"{commits} commits for 400 concurrent appends"


async def test_sqlite_trims_disk_by_size_and_age(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    clock = Clock(2_000_000.0)
    log = SqliteLog(path, 10, max_age=100, clock=clock)
    await log.start()
    for e in events(30, start=clock.now - 50):
        await log.append(e)
    clock.now += 75  # events 0..24 are now older than 100 s; the size limit keeps 20..29
    await log.append(make_event("/a/b", {"n": 99}, timestamp=clock.now))  # evicts, deletes on disk
    await log.append(make_event("/a/b", {"n": 100}, timestamp=clock.now))
    await log.close()
    db = sqlite3.connect(str(path))
    rows = [json.loads(r[0])["n"] for r in db.execute("SELECT json FROM events ORDER BY seq")]
    db.close()
    assert rows == [25, 26, 27, 28, 29, 99, 100]


async def test_sqlite_imports_074_backlog(tmp_path: Path) -> None:
    path = tmp_path / "backlog.json"
    lines = [
        {"x": 1, "pubsub_topics": ["a"], "pubsub_path": "a", "pubsub_timestamp": 1.5e9,
         "pubsub_cursor": "8e2c0d5e-0b1a-4c55-9c1e-1f0a7b2f3c4d"},
        {"x": 2, "pubsub_topics": ["private", "s"], "pubsub_path": "/private/s",
         "pubsub_timestamp": 1.5e9 + 1, "pubsub_cursor": "2f0d7c70-3a51-4a54-8d3e-0e7b1c0d9a11"},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"x": 3, "pubsub_'  # torn last line
    path.write_text(text)
    log = SqliteLog(path, 100)
    await log.start()
    loc = await log.locate(cursor=lines[0]["pubsub_cursor"])  # type: ignore[arg-type]
    assert loc is not None
    got = await log.read(loc.position - 1, 0)
    await log.close()
    assert [e.payload["x"] for e in got] == [1, 2]
    assert got[0].path == "/a" and got[0].cursor == lines[0]["pubsub_cursor"]
    assert got[1].private and got[1].topics == ("s",)
    assert (tmp_path / ("backlog.json" + IMPORT_BACKUP_SUFFIX)).read_text() == text
    assert path.read_bytes().startswith(b"SQLite format 3\0")


async def test_sqlite_074_import_keeps_anything_private_private(tmp_path: Path) -> None:
    path = tmp_path / "backlog.json"
    cur = "8e2c0d5e-0b1a-4c55-9c1e-1f0a7b2f3c4d"
    lines = [
        # the wrapper says private, the stored path does not: private wins, path rebuilt
        {"timestamp": 1.5e9, "topics": ["s"], "private": True,
         "json": {"x": 1, "pubsub_path": "/s", "pubsub_cursor": cur}},
        # no true/false private at all: kept private
        {"timestamp": 1.5e9 + 1, "topics": ["t"], "json": {"x": 2, "pubsub_path": "/t"}},
        # no stored path: rebuilt from topics and privacy
        {"timestamp": 1.5e9 + 2, "topics": ["u", "v"], "private": False, "json": {"x": 3}},
        # the stored path says private, the wrapper not: private wins
        {"timestamp": 1.5e9 + 3, "topics": ["w"], "private": False,
         "json": {"x": 4, "pubsub_path": "/private/w"}},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = SqliteLog(path, 100)
    await log.start()
    got = await log.read(-1, 0)
    await log.close()
    assert [(e.payload["x"], e.path, e.private, e.timestamp) for e in got] == [
        (1, "/private/s", True, 1.5e9), (2, "/private/t", True, 1.5e9 + 1),
        (3, "/u/v", False, 1.5e9 + 2), (4, "/private/w", True, 1.5e9 + 3)]
    assert got[0].cursor == cur


async def test_sqlite_new_cursors_sort_after_stored_ones(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    log = SqliteLog(path, 100)
    await log.start()
    e = make_event("/a", {})
    await log.append(e)
    await log.close()
    log2 = SqliteLog(path, 100)
    await log2.start()
    e2 = make_event("/a", {})
    await log2.close()
    assert e2.cursor > e.cursor and cursor_time(e2.cursor) is not None


# -- Ingest: the node routes what the log's tail hands back -------------------------------------
class ParkedLog(MemoryLog):
    """A log whose appends complete when the test says (e.g. a remote log's acknowledgements):
    its tail hands events to the node in log order, whatever order the appends resolve in."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__(100)
        self.pending: list[tuple[Event, asyncio.Future[Appended | None]]] = []

    def append(self, event: Event, *, dedup: str | None = None  # type: ignore[override]  # noqa: ARG002
               ) -> asyncio.Future[Appended | None]:
        fut: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
        self.pending.append((event, fut))
        return fut

    def commit(self, i: int) -> None:
        ev, fut = self.pending[i]
        fut.set_result(super().append(ev))


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def send(self, _data: bytes, events: Sequence[Event] | None) -> None:
        self.events.extend(events or ())


async def test_ingest_routes_only_what_the_tail_hands_back() -> None:
    hub = Hub()
    sink = Collect()
    hub.topics.subscribe(sink, parse_subscription("/"), NDJSON)
    log = ParkedLog()
    ingest = Ingest(hub, log)
    assert not ingest.synchronous
    tasks = [asyncio.create_task(ingest.submit("/t", {"n": i})) for i in range(5)]
    await await_until(lambda: len(log.pending) == 5)
    assert sink.events == [] and ingest.pending == 5  # appended, not yet in the log: not routed
    log.pending[2][1].set_exception(ServiceUnavailable("disk full"))
    for i in (3, 1, 4, 0):
        log.commit(i)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], ServiceUnavailable)
    await await_until(lambda: len(sink.events) == 4)
    assert [e.payload["n"] for e in sink.events] == [3, 1, 4, 0]  # the log's order, positions 1..4
    assert [e.position for e in sink.events] == [1, 2, 3, 4]
    assert [r.position for r in results if isinstance(r, Appended)] == [4, 2, 1, 3]
    assert ingest.accepted == 4 and ingest.failed == 1 and ingest.pending == 0 and ingest.routed == 4


async def test_sqlite_routes_after_commit_in_position_order(tmp_path: Path) -> None:
    hub = Hub()
    sink = Collect()
    hub.topics.subscribe(sink, parse_subscription("/"), NDJSON)
    log = SqliteLog(tmp_path / "b.db", 100)
    ingest = Ingest(hub, log)
    await log.start()
    try:
        done = await asyncio.gather(*[ingest.submit("/t", {"n": i}) for i in range(20)])
        await await_until(lambda: len(sink.events) == 20)
        assert [e.payload["n"] for e in sink.events] == list(range(20))
        assert [(e.position, e.cursor) for e in sink.events] == [(d.position, d.cursor) for d in done if d]
    finally:
        await log.close()
    log2 = SqliteLog(tmp_path / "b.db", 100)
    await log2.start()
    loc = await log2.locate(cursor=sink.events[9].cursor)
    assert loc is not None and loc.position == sink.events[9].position and loc.pending == 10
    await log2.close()


async def test_ingest_memory_path_is_synchronous() -> None:
    hub = Hub()
    sink = Collect()
    hub.topics.subscribe(sink, parse_subscription("/"), NDJSON)
    log = MemoryLog(10)
    ingest = Ingest(hub, log)
    assert ingest.synchronous
    done = ingest.submit_now("/t", {"n": 1})
    assert (await log.locate(cursor=done.cursor)) is not None
    await await_until(lambda: [(e.position, e.cursor) for e in sink.events] == [done])


def test_publish_latency_histogram_counts_every_accepted_publish() -> None:
    """In-memory acceptances are counted apart from the histogram (plain numbers) and merged
    into its first bucket when read: every publish counted once, in the right bucket."""
    ingest = Ingest(Hub(), MemoryLog(10))
    for i in range(5):
        ingest.submit_now("/t", {"n": i})
    ingest.latency.observe(0.3)  # a slow one (a durable log's), counted by the histogram itself
    snap = ingest.stats()["publish_latency_seconds"]
    assert not isinstance(snap, (int, float))
    assert snap.count == 6 and sum(snap.counts) == 6
    assert snap.counts[snap.bounds.index(0.5)] >= 1  # 0.3 s: the (0.25, 0.5] bucket
    assert snap.total >= 0.3
