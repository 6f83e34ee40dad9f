"""The persistent backlog: an :class:`~server.eventlog.EventLog` kept in SQLite (WAL).

Owns the database file, the single writer thread, group commit, on-disk eviction and the
one-time import of a PyPubSub 0.7.4 JSON-lines backlog file. Reads are served from an
in-memory mirror (:class:`~server.eventlog.MemoryLog`) of what was committed: replays never
touch the disk and see exactly the committed events, in order.

Durability: an append resolves only after its transaction is committed and, with ``fsync``,
the WAL synced to disk (``fdatasync``, in a thread, once per batch). Appends that arrive while a
sync is in progress wait for the next batch, which takes them all: concurrent publishers share
one commit and one fsync (group commit). A kill -9 at any moment loses no acknowledged event,
nor does a power loss with ``fsync`` on; SQLite's WAL discards a torn last transaction on the
next open. 0.7.4 rewrote its whole file every 10 s instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from hub.cursor import advance_past, is_uuid7, new_cursor
from hub.event import Event, EventError, restore_event
from hub.topics import TopicError, parse_publish_path
from plugins.aiosync import AioSync
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
#: WAL bytes (an estimate) after which the thread copies the WAL into the database (a
#: checkpoint): SQLite's own default (1000 pages). The WAL is then written again from its start,
#: over blocks the file already has: syncing a WAL that does not grow is cheaper.
CHECKPOINT_BYTES = 1000 * 4096
#: What a row adds to the WAL besides its JSON (cursor, timestamp, path, cell), roughly
_ROW_OVERHEAD = 96
#: What a commit adds to the WAL besides its rows: the pages it rewrites whole (the last leaf,
#: its parents, the first leaf when trimming), roughly
_COMMIT_OVERHEAD = 3 * 4096
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


_INSERT = "INSERT INTO events(seq, cursor, ts, path, json) VALUES (?, ?, ?, ?, ?)"
#: fdatasync where the platform has it (the WAL's data and size; what SQLite itself uses)
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

_T = TypeVar("_T")
#: a job for the writer thread: what to run, and what to call on the loop when it ended
_Job = tuple[Callable[[], object], Callable[[BaseException | None], None]]


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


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit writes the WAL without syncing it (it survives a process crash, kill -9);
    # with fsync on, SqliteLog syncs the WAL itself before it answers (what FULL would do at
    # each commit, in a thread, once per batch). Checkpoints sync the WAL and the database.
    db.execute("PRAGMA synchronous=NORMAL")
    # checkpoints run in the writer thread (SqliteLog._sync), never inside a commit on the loop
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.executescript(_SCHEMA)
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    return db


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def _wal_path(path: Path) -> str:
    return str(path) + "-wal"


def _fail(futs: list[asyncio.Future[Appended | None]], why: str) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(ServiceUnavailable(why))


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


class _Worker:
    """One long-lived thread that runs jobs in order, each completion called on the event loop.

    Cheaper than an executor round trip per job: a job is a queue entry; its result comes back
    with one ``call_soon_threadsafe``. The log owns it: :meth:`stop` ends and joins the thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], done: Callable[[BaseException | None], None]) -> None:
        """Run ``fn`` in the thread, then ``done(error or None)`` on the loop."""
        self._jobs.put((fn, done))

    def call(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``fn`` in the thread; the future has its result."""
        fut: asyncio.Future[_T] = self._loop.create_future()
        box: list[_T] = []

        def job() -> None:
            box.append(fn())

        def done(err: BaseException | None) -> None:
            if fut.done():
                return
            if err is None:
                fut.set_result(box[0])
            else:
                fut.set_exception(err)

        self.submit(job, done)
        return fut

    async def stop(self) -> None:
        """Run what is queued, then end the thread and wait for it."""
        last = self.call(lambda: None)
        self._jobs.put(None)
        await last
        self._thread.join()  # it has nothing left to do but return

    def _run(self) -> None:
        jobs = self._jobs
        loop = self._loop
        while (item := jobs.get()) is not None:
            fn, done = item
            err: BaseException | None = None
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - thread boundary: handed to the loop, which reports it
                err = e
            try:
                loop.call_soon_threadsafe(done, err)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return


class SqliteLog:
    """A durable event log: SQLite on disk, a :class:`MemoryLog` mirror for reads.

    Writing, on the event loop's thread: the events appended during one loop turn are inserted
    and committed together (``synchronous=NORMAL``: the commit only writes the WAL, no fsync);
    then the WAL is synced (``fdatasync``: by Linux AIO, :mod:`plugins.aiosync`, else in the
    writer thread), and every :data:`CHECKPOINT_BYTES` the writer thread copies it into the
    database (a checkpoint). Only when the sync is done are the batch's appends resolved and its
    events routed: a 2xx is never sent for an event that is not on disk. Events appended while a
    sync runs wait for the next batch, committed as soon as the sync ends: concurrent publishers
    share one commit and one fsync (group commit), and no executor round trip is paid per batch.
    The loop never touches the database while the thread does, so they share one connection.
    """

    synchronous = False

    def __init__(self, path: Path, size: int, max_age: float = 0.0, *, fsync: bool = True,
                 clock: Callable[[], float] = time.time, config_file: str = "?",
                 aio: bool = True) -> None:
        """``aio=False``: sync in the writer thread even where Linux AIO could do it."""
        if size <= 0:
            raise ValueError("a persistent backlog needs size > 0")
        self.path = path
        self.size = size
        self.max_age = max_age
        self.fsync = fsync
        self.config_file = config_file
        self.use_aio = aio
        self.mirror = MemoryLog(size, max_age, clock=clock)
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        #: syncs the WAL without the thread (Linux AIO), when the system can
        self._aio: AioSync | None = None
        self._wal_fd = -1
        #: appended, not yet committed: events and their futures (parallel lists)
        self._events: list[Event] = []
        self._futs: list[asyncio.Future[Appended | None]] = []
        #: committed, waiting for the WAL sync (resolved, or failed, when it ends)
        self._held_events: list[Event] = []
        self._held_futs: list[asyncio.Future[Appended | None]] = []
        #: the next row's seq (= log position): assigned here, so the tail knows it at commit
        self._next_seq = 1
        self._consumer: TailConsumer | None = None
        self._trim = 0
        #: the next batch's commit, scheduled for the end of this loop turn
        self._flush_handle: asyncio.Handle | None = None
        #: a sync or checkpoint is running in the thread: the loop keeps off the database
        self._busy = False
        #: bytes written to the WAL since its last checkpoint (roughly: the events' JSON)
        self._wal_bytes = 0
        self._evictor: asyncio.Task[None] | None = None
        self._closing = False
        #: why publishing is refused until restart (the WAL could not be synced)
        self._failed: str | None = None
        self._drained: asyncio.Future[None] | None = None
        #: transactions committed, events written and WAL syncs done (benchmark, tests)
        self.commits = 0
        self.written = 0
        self.syncs = 0

    def __repr__(self) -> str:
        return f"<SqliteLog {self.path} {len(self.mirror)}/{self.size} fsync={self.fsync}>"

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        worker = _Worker(loop, "pypubsub-sqlite")
        try:
            events, self._next_seq = await worker.call(self._open)
        except BaseException:
            await worker.stop()
            raise
        self._worker = worker
        if self._aio is not None:
            self._aio.attach(loop)
        for ev in events:
            self.mirror.keep(ev)
        newest = self.mirror.newest()
        for ev in reversed(events):  # the newest UUIDv7 stored: new cursors must sort after it
            if is_uuid7(ev.cursor):
                advance_past(ev.cursor)
                break
        self._trim = self.mirror.take_dropped()
        self._schedule()
        logger.info("backlog %s: %d event(s) retained (newest %s); %s", self.path, len(self.mirror),
                    newest.cursor if newest else "none",
                    "no fsync" if not self.fsync else
                    "fsync by Linux AIO" if self._aio is not None else "fsync in a thread")
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
            db = self._db = _connect(p)
            rows = db.execute("SELECT seq, cursor, ts, path, json FROM events ORDER BY seq DESC LIMIT ?",
                              (self.size,)).fetchall()
            # positions order one process's reads: the next after the newest row is enough
            next_seq = (rows[0][0] if rows else 0) + 1
            if self.fsync:  # what SQLite's own first WAL sync would do: the WAL's name is durable
                _fsync_dir(p.parent)
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
        if self.fsync:  # the deletes above are synced by AioSync's probe, or here
            try:
                self._wal_fd = os.open(_wal_path(p), os.O_RDONLY | os.O_CLOEXEC)
                self._aio = AioSync.open(self._wal_fd) if self.use_aio else None
                if self._aio is None:
                    _datasync(self._wal_fd)
            except OSError as e:
                raise ConfigError(self.config_file, "server.backlog.storage",
                                  f"cannot sync {_wal_path(p)!r}: {e}") from e
        return events, next_seq

    async def close(self) -> None:
        """Commit and sync what is queued, stop the thread, close the database."""
        self._closing = True
        await cancel_and_wait(self._evictor)
        loop = asyncio.get_running_loop()
        if self._worker is not None and self._failed is None and not self._idle():
            self._drained = loop.create_future()
            self._schedule()
            await self._drained  # resolved by _flush/_synced once nothing is left
        worker, self._worker = self._worker, None
        if self._aio is not None:
            self._aio.close()
            self._aio = None
        if worker is not None:
            db = self._db
            if db is not None:
                try:
                    await worker.call(db.close)  # the last connection: checkpoints the WAL
                except sqlite3.Error as e:
                    logger.error("backlog %s: cannot close the database cleanly: %s", self.path, e)
            await worker.stop()
        self._db = None
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1
        logger.info("backlog %s closed: %d event(s) written in %d commit(s) since start",
                    self.path, self.written, self.commits)

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {**self.mirror.stats(), "log_appends_total": self.written, "log_commits_total": self.commits}

    def unready(self) -> str | None:
        """Why a publish cannot be accepted now (None: it can)."""
        if self._failed is not None:
            return self._failed
        return f"backlog {self.path} is not accepting events" if self._closing else None

    # -- writing ------------------------------------------------------------------------
    def tail(self, consumer: TailConsumer) -> None:
        self._consumer = consumer

    def append(self, event: Event, *,
               dedup: str | None = None) -> asyncio.Future[Appended | None]:  # noqa: ARG002
        """Queue ``event`` for this loop turn's commit; resolves once it is on disk (and routed).

        ``dedup`` is ignored: one process has one SQS consumer per queue, which de-duplicates.
        """
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
        fut: asyncio.Future[Appended | None] = loop.create_future()
        if self._closing or self._worker is None or self._failed is not None:
            fut.set_exception(ServiceUnavailable("the backlog is closed: event not stored"))
            return fut
        self._events.append(event)
        self._futs.append(fut)
        self._schedule()
        return fut

    def _idle(self) -> bool:
        return not (self._events or self._trim or self._busy)

    def _schedule(self) -> None:
        """Commit what is queued at the end of this loop turn (unless the thread is busy: then
        right after it)."""
        if self._flush_handle is None and not self._busy and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Commit one batch (what this loop turn appended), then sync it in the thread."""
        self._flush_handle = None
        worker = self._worker
        if self._busy or worker is None or self._failed is not None:
            return
        events, futs = self._events, self._futs
        if len(events) > MAX_BATCH:
            self._events, self._futs = events[MAX_BATCH:], futs[MAX_BATCH:]
            events, futs = events[:MAX_BATCH], futs[:MAX_BATCH]
        else:
            self._events, self._futs = [], []
        trim, self._trim = self._trim, 0
        if events or trim:
            seq = self._next_seq
            try:
                size = self._commit(seq, events, trim)
            except (sqlite3.Error, OSError) as e:
                logger.error("backlog %s: cannot commit %d event(s): %s", self.path, len(events), e)
                self._trim += trim  # retried with the next commit
                _fail(futs, "the event could not be stored")
                if self._events:  # a trim alone waits for the next append (no busy loop)
                    self._schedule()
                elif self._drained is not None and not self._drained.done():
                    self._drained.set_result(None)  # closing: the trim is retried at the next start
                return
            self._next_seq = seq + len(events)
            self._wal_bytes += size
        checkpoint = self._wal_bytes >= CHECKPOINT_BYTES
        if checkpoint:
            self._wal_bytes = 0
        if self.fsync and events and not checkpoint and self._aio is not None:
            self._busy = True
            self._held_events, self._held_futs = events, futs
            self._aio.submit(self._aio_synced)
            return
        if (self.fsync and events) or checkpoint:
            self._busy = True
            if self.fsync:
                self._held_events, self._held_futs = events, futs
            else:
                self._deliver(events, futs)
            worker.submit(functools.partial(self._sync, self.fsync and bool(events), checkpoint),
                          self._synced)
            return
        self._deliver(events, futs)
        self._next()

    def _next(self) -> None:
        """After a batch: the next one (unless one is being synced), or the end of a drain."""
        if self._events or self._trim:
            self._schedule()
        elif self._drained is not None and not self._busy and not self._drained.done():
            self._drained.set_result(None)

    def _commit(self, seq: int, events: list[Event], trim: int) -> int:
        """(event loop) One transaction: insert ``events`` from row ``seq`` on, delete the
        ``trim`` oldest rows. Returns about how many bytes it added to the WAL."""
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("database is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            if events:
                rows = []
                for s, e in enumerate(events, seq):
                    place(e, s)  # nobody sees it before it is delivered
                    rows.append((s, e.cursor, e.timestamp, e.path, e.json))
                db.executemany(_INSERT, rows)
            if trim:
                db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                           (trim,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.written += len(events)
        return sum(len(e.json) for e in events) + _ROW_OVERHEAD * len(events) + _COMMIT_OVERHEAD

    def _sync(self, sync: bool, checkpoint: bool) -> None:
        """(thread) Make the committed WAL durable; copy it into the database when it is long."""
        if sync:
            _datasync(self._wal_fd)
        if checkpoint and self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as e:  # not fatal: the WAL grows until the next one works
                logger.warning("backlog %s: WAL checkpoint failed: %s", self.path, e)

    def _aio_synced(self, err: int) -> None:
        self._synced(OSError(err, os.strerror(err)) if err else None)

    def _synced(self, err: BaseException | None) -> None:
        """(event loop) The thread's sync ended: resolve and route the held batch, or refuse."""
        self._busy = False
        events, futs = self._held_events, self._held_futs
        self._held_events, self._held_futs = [], []
        if err is not None:
            # committed but perhaps not on disk: nothing can be promised any more (an fsync
            # error may have dropped the dirty pages), so nothing more is accepted
            self._failed = f"backlog {self.path} cannot be synced to disk: {err}"
            logger.error("backlog %s: cannot sync the WAL (%s); publishing is refused until restart",
                         self.path, err)
            _fail(futs + self._futs, "the event could not be stored")
            self._events, self._futs = [], []
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        if self._events or self._trim:
            # what arrived during the sync: committed and its sync started first, so that the
            # disk works while this batch is routed
            self._flush()
        if events:
            self.syncs += 1
            self._deliver(events, futs)
        self._next()

    def _deliver(self, events: list[Event], futs: list[asyncio.Future[Appended | None]]) -> None:
        """``events`` (placed at commit) are on disk: mirror and route them in position order,
        then answer their appends."""
        mirror = self.mirror
        consumer = self._consumer
        for ev, fut in zip(events, futs, strict=True):
            mirror.keep(ev)
            if consumer is not None:
                try:
                    consumer(ev)  # routed in commit (= position) order
                except Exception:  # batch boundary: routing one event must not stop the rest
                    logger.exception("backlog %s: %r committed but not routed", self.path, ev)
            if not fut.done():
                fut.set_result(Appended(ev.position, ev.cursor))
        self._trim += mirror.take_dropped()

    async def _evict_loop(self) -> None:
        """Delete events older than max_age from disk even when nothing is published."""
        interval = min(max(self.max_age / 10, MIN_EVICT_INTERVAL), MAX_EVICT_INTERVAL)
        for _ in iter(int, 1):  # until cancelled
            await asyncio.sleep(interval)
            self.mirror.evict()
            n = self.mirror.take_dropped()  # includes what reads evicted meanwhile
            if n:
                self._trim += n
                self._schedule()

    # -- reading (from the mirror of what is committed) ----------------------------------
    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        return self.mirror.locate_now(cursor=cursor, since=since)

    async def read(self, after: int, limit: int) -> list[Event]:
        return self.mirror.read_now(after, limit)
