"""The persistent backlog: an :class:`~server.eventlog.EventLog` kept in SQLite (WAL).

Owns the database file, the single writer thread, group commit, on-disk eviction and the
one-time import of a PyPubSub 0.7.4 JSON-lines backlog file. Reads are served from an
in-memory mirror (:class:`~server.eventlog.MemoryLog`) of what was committed: replays never
touch the disk and see exactly the committed events, in order.

Durability: an append resolves only after its transaction is committed (and, with ``fsync``,
synced: ``synchronous=FULL``). Appends that arrive while a commit is in progress wait for the
next one, which takes them all: concurrent publishers share one fsync (group commit). A kill -9
at any moment loses no acknowledged event; SQLite's WAL discards a torn last transaction on the
next open. 0.7.4 rewrote its whole file every 10 s instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from hub.cursor import advance_past, is_uuid7, new_cursor
from hub.event import Event, EventError, restore_event
from hub.topics import TopicError, parse_publish_path
from server.errors import ConfigError, ServiceUnavailable
from server.eventlog import Appended, Located, MemoryLog, TailConsumer, place
from server.tasks import cancel_and_wait

__all__ = ["SCHEMA_VERSION", "SqliteLog", "import_074"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\0"
#: Most events one transaction takes: bounds a commit's latency and memory under a flood.
MAX_BATCH = 8192
#: How often events older than max_age are deleted from disk when nothing is published
#: (bounded so a short max_age is honoured promptly and a long one costs nothing).
MIN_EVICT_INTERVAL = 1.0
MAX_EVICT_INTERVAL = 60.0
#: Suffix of the copy kept of an imported 0.7.4 backlog file.
IMPORT_BACKUP_SUFFIX = ".0.7.4-backup"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    cursor TEXT NOT NULL,
    ts REAL NOT NULL,
    path TEXT NOT NULL,
    json BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@functools.lru_cache(maxsize=4096)
def _topics(path: str) -> tuple[tuple[str, ...], bool, frozenset[str]]:
    topics, private = parse_publish_path(path)
    return topics, private, frozenset(topics)


def _row_event(seq: int, cursor: str, ts: float, path: str, data: bytes) -> Event:
    """Rebuild a stored event exactly: same path, topics, private flag, timestamp, cursor, bytes;
    its log position is its row's ``seq``."""
    topics, private, topicset = _topics(path)
    payload = orjson.loads(data)
    if not isinstance(payload, dict):
        raise EventError("stored event is not a JSON object")
    return Event(topics=topics, private=private, path=path, timestamp=ts, cursor=cursor,
                 payload=payload, json=bytes(data), topicset=topicset, position=seq)


def _connect(path: Path, fsync: bool) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is synced at each commit (power-loss safe); NORMAL: survives a process
    # crash (kill -9) but may lose the last commits on power loss.
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    db.executescript(_SCHEMA)
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    return db


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unwrap_074(obj: dict[str, Any]) -> dict[str, Any]:
    """The stamped event of one line as 0.7.4's ``write_backlog_storage`` writes it.

    0.7.4 writes ``{"timestamp": ..., "topics": [...], "json": {the event as sent}, "private":
    bool}``; the event keeps the cursor 0.7.4 handed out (``json.pubsub_cursor``). Its stored
    ``pubsub_path`` is used when it agrees with the line's topics and privacy (0.7.4's own
    restores dropped its leading '/'); otherwise the path is rebuilt from them. When anything
    says the event was private, it stays private.
    """
    payload, topics, private = obj["json"], obj["topics"], obj.get("private")
    if not isinstance(payload, dict) or not isinstance(topics, list) \
            or not all(isinstance(t, str) for t in topics):
        raise EventError("a 0.7.4 backlog line needs a 'json' object and a 'topics' list")
    event = dict(payload)
    if not isinstance(private, bool):
        logger.warning("0.7.4 backlog: a line without a true/false 'private': kept as private")
        private = True
    ts = obj.get("timestamp")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        event["pubsub_timestamp"] = ts
    stored = event.get("pubsub_path")
    path: str | None = None
    if isinstance(stored, str):
        stored = stored if stored.startswith("/") else "/" + stored
        try:
            stored_topics, stored_private = parse_publish_path(stored)
        except TopicError:  # rebuilt from the line's topics below
            stored_topics, stored_private = (), False
        if list(stored_topics) == topics and stored_private == private:
            path = stored
        private = private or stored_private
    if path is None:
        path = ("/private/" if private else "/") + "/".join(topics)
    event["pubsub_path"] = path
    return event


def _parse_074_lines(lines: Iterable[bytes], fallback_ts: float) -> tuple[list[Event], int]:
    """Events from 0.7.4 backlog lines; returns (events, lines skipped).

    Each line is 0.7.4's wrapper (see :func:`_unwrap_074`); a line that is a bare stamped event
    is read as one too.
    """
    out: list[Event] = []
    skipped = 0
    seen: set[str] = set()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            obj = orjson.loads(line)
            if not isinstance(obj, dict):
                raise EventError("not a JSON object")
            if "json" in obj and "topics" in obj:
                obj = _unwrap_074(obj)
            if not isinstance(obj.get("pubsub_timestamp"), (int, float)):
                obj["pubsub_timestamp"] = fallback_ts
            if not isinstance(obj.get("pubsub_cursor"), str) or obj["pubsub_cursor"] in seen:
                obj["pubsub_cursor"] = new_cursor(float(obj["pubsub_timestamp"]))
            if not isinstance(obj.get("pubsub_path"), str):
                obj["pubsub_path"] = "/" + "/".join(str(t) for t in obj.get("pubsub_topics") or ())
            ev = restore_event(obj)  # re-adds the '/' 0.7.4 lost on its own restores
        except (orjson.JSONDecodeError, EventError, TopicError, TypeError) as e:
            skipped += 1  # a torn last line, or damage: keep the rest
            logger.warning("0.7.4 backlog: skipping an unreadable line (%s)", e)
            continue
        seen.add(ev.cursor)
        out.append(ev)
    return out, skipped


def import_074(path: Path, fsync: bool = True) -> int:
    """Convert a 0.7.4 JSON-lines backlog at ``path`` into our database, atomically, in place.

    The original is kept next to it (``<path>.0.7.4-backup``). A crash at any point leaves
    either the old file (imported again on the next start) or the finished database.
    Returns the number of events imported.
    """
    data = path.read_bytes()
    events, skipped = _parse_074_lines(data.splitlines(), path.stat().st_mtime)
    tmp = path.with_name(path.name + ".importing")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm"), Path(str(tmp) + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    db = sqlite3.connect(str(tmp), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute("BEGIN")
        db.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        db.execute("INSERT INTO meta(key, value) VALUES ('imported_from_0.7.4', ?)", (str(path),))
        db.executemany("INSERT INTO events(cursor, ts, path, json) VALUES (?, ?, ?, ?)",
                       [(e.cursor, e.timestamp, e.path, e.json) for e in events])
        db.execute("COMMIT")
    finally:
        db.close()
    backup = path.with_name(path.name + IMPORT_BACKUP_SUFFIX)
    backup.write_bytes(data)
    if fsync:
        with open(backup, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)
    logger.info("imported %d event(s) from the 0.7.4 backlog %s (%d unreadable line(s) skipped); "
                "the original is kept as %s", len(events), path, skipped, backup)
    return len(events)


class SqliteLog:
    """A durable event log: SQLite on disk, a :class:`MemoryLog` mirror for reads."""

    synchronous = False

    def __init__(self, path: Path, size: int, max_age: float = 0.0, *, fsync: bool = True,
                 clock: Callable[[], float] = time.time, config_file: str = "?") -> None:
        if size <= 0:
            raise ValueError("a persistent backlog needs size > 0")
        self.path = path
        self.size = size
        self.max_age = max_age
        self.fsync = fsync
        self.config_file = config_file
        self.mirror = MemoryLog(size, max_age, clock=clock)
        self._db: sqlite3.Connection | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: list[tuple[Event, asyncio.Future[Appended | None]]] = []
        #: the batch being committed (failed too if the writer dies)
        self._batch: list[tuple[Event, asyncio.Future[Appended | None]]] = []
        #: the next row's seq (= log position): assigned here, so the tail knows it at commit
        self._next_seq = 1
        self._consumer: TailConsumer | None = None
        self._trim = 0
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._evictor: asyncio.Task[None] | None = None
        self._closing = False
        #: transactions committed and events written (for the benchmark and tests)
        self.commits = 0
        self.written = 0

    def __repr__(self) -> str:
        return f"<SqliteLog {self.path} {len(self.mirror)}/{self.size} fsync={self.fsync}>"

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pypubsub-sqlite")
        try:
            events, self._next_seq = await loop.run_in_executor(self._pool, self._open)
        except BaseException:
            self._pool.shutdown(wait=True)
            self._pool = None
            raise
        for ev in events:
            self.mirror.keep(ev)
        newest = self.mirror.newest()
        for ev in reversed(events):  # the newest UUIDv7 stored: new cursors must sort after it
            if is_uuid7(ev.cursor):
                advance_past(ev.cursor)
                break
        trim = self.mirror.take_dropped()
        if trim:
            await loop.run_in_executor(self._pool, self._write, [], trim)
        logger.info("backlog %s: %d event(s) retained (newest %s)", self.path, len(self.mirror),
                    newest.cursor if newest else "none")
        self._wake = asyncio.Event()
        self._writer = loop.create_task(self._write_loop(), name="pypubsub-sqlite-writer")
        self._writer.add_done_callback(self._writer_ended)
        if self.max_age:
            self._evictor = loop.create_task(self._evict_loop(), name="pypubsub-sqlite-evictor")

    def _open(self) -> tuple[list[Event], int]:
        """(writer thread) Import 0.7.4 if needed, open, load the retained tail.

        Returns the retained events and the seq the next row gets."""
        p = self.path
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists() and p.stat().st_size > 0 and not _is_sqlite(p):
                import_074(p, self.fsync)
            db = self._db = _connect(p, self.fsync)
            rows = db.execute("SELECT seq, cursor, ts, path, json FROM events ORDER BY seq DESC LIMIT ?",
                              (self.size,)).fetchall()
            # positions order one process's reads: the next after the newest row is enough
            next_seq = (rows[0][0] if rows else 0) + 1
        except (sqlite3.DatabaseError, OSError) as e:
            raise ConfigError(self.config_file, "server.backlog.storage",
                              f"{str(p)!r} cannot be opened as a backlog: {e}") from e
        rows.reverse()
        if rows:  # what the size limit no longer retains (e.g. size was lowered)
            db.execute("DELETE FROM events WHERE seq < ?", (rows[0][0],))
        events = []
        for seq, cursor, ts, path, data in rows:
            try:
                events.append(_row_event(seq, cursor, ts, path, data))
            except (orjson.JSONDecodeError, EventError, TopicError) as e:
                # deleted, so that the rows on disk stay exactly the mirror's events
                logger.warning("backlog %s: dropping an unreadable stored event %s (%s)", p, cursor, e)
                db.execute("DELETE FROM events WHERE seq = ?", (seq,))
        return events, next_seq

    async def close(self) -> None:
        """Commit what is queued, stop the tasks, close the database."""
        self._closing = True
        await cancel_and_wait(self._evictor)
        if self._writer is not None and self._wake is not None:
            self._wake.set()
            # ends once the queue is empty; a writer that failed was logged when it ended
            await asyncio.wait([self._writer])
        if self._pool is not None:
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._db.close)
            self._pool.shutdown(wait=True)
        self._db = None
        self._pool = None
        logger.info("backlog %s closed: %d event(s) written in %d commit(s) since start",
                    self.path, self.written, self.commits)

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {**self.mirror.stats(), "log_appends_total": self.written, "log_commits_total": self.commits}

    def unready(self) -> str | None:
        """Why a publish cannot be accepted now (None: it can)."""
        return f"backlog {self.path} is not accepting events" if self._closing else None

    # -- writing ------------------------------------------------------------------------
    def tail(self, consumer: TailConsumer) -> None:
        self._consumer = consumer

    def append(self, event: Event, *,
               dedup: str | None = None) -> asyncio.Future[Appended | None]:  # noqa: ARG002
        """Queue ``event`` for the next commit; resolves once it is committed (and routed).

        ``dedup`` is ignored: one process has one SQS consumer per queue, which de-duplicates.
        """
        fut: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
        if self._closing or self._wake is None:
            fut.set_exception(ServiceUnavailable("the backlog is closed: event not stored"))
            return fut
        self._queue.append((event, fut))
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        """Owns the writer thread's work: one transaction per batch, batches taken whole."""
        if self._wake is None or self._pool is None:
            raise RuntimeError("SqliteLog._write_loop runs only after start()")
        loop = asyncio.get_running_loop()
        wake = self._wake
        while True:
            if not self._queue and not self._trim:
                if self._closing:
                    return
                await wake.wait()
                wake.clear()
                continue
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._batch = batch
            trim, self._trim = self._trim, 0
            seq = self._next_seq
            rows = [(seq + i, e.cursor, e.timestamp, e.path, e.json) for i, (e, _) in enumerate(batch)]
            try:
                await loop.run_in_executor(self._pool, self._write, rows, trim)
            except (sqlite3.Error, OSError) as e:
                logger.error("backlog %s: cannot commit %d event(s): %s", self.path, len(batch), e)
                self._trim += trim
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(ServiceUnavailable("the event could not be stored"))
                self._batch = []
                if self._closing:
                    return  # the pending trim is retried at the next start
                if not self._queue:  # retry the trim with the next append, not in a busy loop
                    await wake.wait()
                    wake.clear()
                continue
            self._next_seq = seq + len(batch)
            mirror = self.mirror
            consumer = self._consumer
            for i, (ev, fut) in enumerate(batch):
                place(ev, seq + i)
                mirror.keep(ev)
                if consumer is not None:
                    try:
                        consumer(ev)  # routed in commit (= position) order
                    except Exception:  # task boundary: routing must not stop the writer
                        logger.exception("backlog %s: %r committed but not routed", self.path, ev)
                if not fut.done():
                    fut.set_result(Appended(ev.position, ev.cursor))
            self._trim += mirror.take_dropped()
            self._batch = []

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """If the writer died, refuse appends (503) instead of leaving publishers waiting."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("backlog %s: the writer failed; publishing is refused until restart",
                     self.path, exc_info=task.exception())
        self._closing = True
        queued, self._queue = self._batch + self._queue, []
        self._batch = []
        for _, fut in queued:
            if not fut.done():
                fut.set_exception(ServiceUnavailable("the backlog writer failed: event not stored"))

    def _write(self, rows: list[tuple[int, str, float, str, bytes]], trim: int) -> None:
        """(writer thread) One transaction: insert ``rows``, delete the ``trim`` oldest rows."""
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("database is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                db.executemany("INSERT INTO events(seq, cursor, ts, path, json) VALUES (?, ?, ?, ?, ?)",
                               rows)
            if trim:
                db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                           (trim,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.written += len(rows)

    async def _evict_loop(self) -> None:
        """Delete events older than max_age from disk even when nothing is published."""
        interval = min(max(self.max_age / 10, MIN_EVICT_INTERVAL), MAX_EVICT_INTERVAL)
        for _ in iter(int, 1):  # until cancelled
            await asyncio.sleep(interval)
            self.mirror.evict()
            n = self.mirror.take_dropped()  # includes what reads evicted meanwhile
            if n and self._wake is not None:
                self._trim += n
                self._wake.set()

    # -- reading (from the mirror of what is committed) ----------------------------------
    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        return self.mirror.locate_now(cursor=cursor, since=since)

    async def read(self, after: int, limit: int) -> list[Event]:
        return self.mirror.read_now(after, limit)
