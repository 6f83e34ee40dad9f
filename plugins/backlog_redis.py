"""The cluster log: an :class:`~server.eventlog.EventLog` on one Redis Stream shared by every node.

Owns the stream (``XADD … MAXLEN ~`` through a small Lua script, a periodic ``XTRIM MINID ~``),
the blocking ``XREAD`` that every node runs on its own connection to route what it reads back,
the cluster cursor (derived from the entry id: the same on every node, ordered as the stream),
reset detection, de-duplication of SQS messages across nodes, and the outage state (503 while
Redis is unreachable, one log line when an outage starts and one when it ends). Reads for replay
are served from an in-memory mirror (:class:`~server.eventlog.MemoryLog`) of what this node read
back, so a replay is a prefix of exactly what the node routes: gap-free, no duplicate.

redis-py (``redis.asyncio``) is imported only when ``server.backlog.storage`` is a redis:// URL.
Nothing here knows HTTP; the daemon's wiring builds it from the configuration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson

from hub.event import Event, EventError, make_event
from hub.topics import TopicError, parse_publish_path, remove_dot_segments
from server.errors import ConfigError, ServiceUnavailable
from server.eventlog import Appended, Located, MemoryLog, TailConsumer
from server.tasks import cancel_and_wait

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection

__all__ = ["RedisLog", "cursor_entry", "entry_cursor", "entry_position"]

logger = logging.getLogger(__name__)

#: With ``size: 0`` the stream still carries live events between nodes; it is trimmed to about
#: this many entries (enough for a node that was briefly unreachable to catch up on).
LIVE_BOUND = 1000
#: Entries one XREAD takes: bounds the work of one loop iteration under a flood.
READ_COUNT = 1024
#: A blocking XREAD returns at least this often (ms) when nothing is published.
BLOCK_MS = 2000
#: Reconnect back-off of the reader while Redis is unreachable (seconds, doubling).
RECONNECT_MIN = 0.05
RECONNECT_MAX = 1.0
#: How often a node checks that the stream was not reset (and trims by age when due).
MAINTAIN_INTERVAL = 1.0
#: Trimming by age runs at most this often (``XTRIM MINID ~`` by Redis time).
MIN_TRIM_INTERVAL = 1.0
MAX_TRIM_INTERVAL = 60.0
#: An SQS message id is remembered this long (seconds) by the cluster: a redelivery within it
#: (another node, an expired visibility timeout) does not enter the stream again.
DEDUP_TTL = 3600
#: Paths whose topics the reader keeps parsed (the cache is emptied when it is full).
PATH_CACHE = 4096
#: ``Retry-After`` (seconds) of a publish refused while Redis is unreachable.
RETRY_AFTER = 1
#: Most appends one batch takes: bounds a round trip's size under a flood.
MAX_BATCH = 1024
#: After a read back of at least ``COALESCE_AT`` entries (a flood), the next ``XREAD`` waits
#: ``COALESCE_PAUSE`` seconds (the node keeps serving meanwhile): it then takes more entries in
#: one call, and each subscriber gets them in one write, not two. A smaller read (an idle or
#: lightly used cluster: an entry at a time) continues at once: latency at low rates is unchanged.
COALESCE_AT = 16
COALESCE_PAUSE = 0.001
#: Batches sent on the append connection before the first is answered: an append queued while
#: a batch is on its way goes out at once instead of waiting for that round trip.
MAX_INFLIGHT = 4
#: Entries this node appended and Redis acknowledged, kept until the reader reaches them (it
#: then reuses the event instead of decoding the entry); past this many, or this many bytes of
#: events (a reader far behind, entries trimmed before it read them), they are forgotten and
#: the entries decoded as others' are.
OWN_LIMIT = MAX_BATCH * MAX_INFLIGHT
OWN_BYTES = 16 << 20

#: Stream entry fields. ``p``: the event's JSON up to its ``pubsub_cursor`` value (the stamped
#: event's bytes as every node sends them, but for the cursor, which the entry id gives: a node
#: appends the cursor and ``"}``, no JSON is rebuilt); ``e``: the whole stamped JSON, re-stamped
#: on read (an event whose ``pubsub_cursor`` is not its last member, and entries written by
#: earlier versions); ``g``: the stream's epoch when the entry was written; ``n``, on the last
#: entry of each batch only: ``"N k"``, the batch's ``k`` entries and the count ``N`` of entries
#: the script has written in the epoch so far (under ``<stream>:count``). A batch's entries are
#: consecutive in the stream, so a reader checks that each batch begins where the last ended
#: (``N - k`` is the last batch's ``N``) and that it read all ``k`` entries; otherwise it missed
#: entries (trimmed or deleted before it read them) or reads a stream that went back (a restart
#: from an older copy, failover to a lagging replica), and reports a gap instead of going on
#: silently. Entries of earlier versions carry no count and are not counted.
PREFIX_FIELD = b"p"
EVENT_FIELD = b"e"
EPOCH_FIELD = b"g"
COUNT_FIELD = b"n"

#: One call appends a whole batch. KEYS: stream, epoch key. ARGV: MAXLEN, a new epoch, the
#: batch's deadline (Redis time, ms; 0: none), the de-duplication TTL, then per event its
#: de-duplication id ('' for none), its field name (``p`` or ``e``) and its bytes. Returns one
#: reply per event: the entry id, or nil for a duplicate.
#:
#: * A batch Redis runs after its deadline (it was held by a hung Redis, or queued behind one) is
#:   refused whole and stores nothing: the node has answered, or is about to answer, ``503``.
#: * An append to a stream that does not exist (first use, deleted, FLUSHALL) starts a new
#:   epoch, stamped on every entry: readers see a reset on the entry itself. A batch's last
#:   entry also carries the count of the epoch's entries (``n``): readers see a gap, or a stream
#:   gone back, at the end of the next batch they read.
#: * De-duplication, the epoch and the appends are atomic (one script); a refusal (out of
#:   memory) comes at the first write, so a batch is stored whole or not at all.
#: * A batch stored keeps its answer (the entry ids) under its own key for ``batch_ttl``: the
#:   same batch sent again (its connection was lost before the answer came; its id then starts
#:   with ``=``) gets that answer, also after its deadline, and stores nothing twice.
_APPEND_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local bid = ARGV[5]
local again = string.sub(bid, 1, 1) == '='
if again then bid = string.sub(bid, 2) end
local bkey = KEYS[1] .. ':batch:' .. bid
if again then
  local prior = redis.call('GET', bkey)
  if prior then
    local out = {}
    for id in string.gmatch(prior, '%S+') do
      if id == '-' then out[#out + 1] = false else out[#out + 1] = id end
    end
    return out
  end
end
local deadline = tonumber(ARGV[3])
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return redis.error_reply('PUBSUBLATE batch reached Redis after its deadline: not stored')
  end
end
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[1] .. ':count')
end
local dedup = KEYS[1] .. ':dedup:'
local add, k = {}, 0
for i = 7, #ARGV, 3 do
  if ARGV[i] == '' or redis.call('SET', dedup .. ARGV[i], '1', 'NX', 'EX', ARGV[4]) then
    k = k + 1
    add[i] = k
  end
end
local n = 0
if k > 0 then n = redis.call('INCRBY', KEYS[1] .. ':count', k) end
local out, ids = {}, {}
for i = 7, #ARGV, 3 do
  local id, j = false, add[i]
  if j == k then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[i + 1], ARGV[i + 2], 'g', epoch,
                    'n', string.format('%d %d', n, k))
  elseif j then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[i + 1], ARGV[i + 2], 'g', epoch)
  end
  out[#out + 1] = id
  ids[#ids + 1] = id or '-'
end
redis.call('SET', bkey, table.concat(ids, ' '), 'EX', ARGV[6])
return out
"""

#: an append waiting for the writer: its field name, its bytes, its de-duplication id (b'' for
#: none), the publisher's future, the loop time by which it must be answered, and the event
#: itself when the reader may reuse it (its entry holds the bytes before the cursor: ``p``)
_Queued = tuple[bytes, bytes, bytes, "asyncio.Future[Appended | None]", float, "Event | None"]


class _Batch(list[_Queued]):
    """Appends sent in one script call: its number (the node's batches in the order they were
    made; with the node's id, the key under which Redis keeps its answer); once sent again (its
    connection was lost), not before the loop time ``not_before``."""

    __slots__ = ("not_before", "resent", "seq")

    def __init__(self, items: Iterable[_Queued] = (), seq: int = 0) -> None:
        super().__init__(items)
        self.seq = seq
        self.resent = False
        self.not_before = 0.0


#: an entry this node appended and has not read back yet: its bytes, the event, its position
#: and its cursor (from the id Redis gave it)
_Own = tuple[bytes, Event, int, str]

#: The share of ``timeout`` kept between Redis' deadline for a batch and the node's: a batch Redis
#: stored must be answered before the node gives up on it (fsync, the way back, the node's loop).
DEADLINE_MARGIN = 0.25
#: Seconds Redis keeps a stored batch's answer at least (see :data:`_APPEND_LUA`), and more with
#: a ``timeout`` over 1 s: a batch is sent again only within its appends' timeout.
BATCH_TTL = 3
#: why a publish whose append was on a connection lost before Redis answered, and not sent
#: again in time, is refused: Redis may have stored it (it is then delivered all the same)
IN_DOUBT = "the cluster log (Redis) did not answer in time: event not acknowledged (it may be stored)"
#: errors Redis answers without running the script (a batch sent again stays in doubt)
_NOT_RUN = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")

_MASK48 = (1 << 48) - 1
_MASK62 = (1 << 62) - 1
#: the sequence part of an entry id fits the cursor's 74 free bits
_SEQ_LIMIT = 1 << 74


# -- the cluster cursor -------------------------------------------------------------------------
def _split_id(entry_id: bytes | str) -> tuple[int, int]:
    """``(ms, seq)`` of a stream entry id ``<ms>-<seq>`` (``int()`` reads the digits of either type)."""
    if isinstance(entry_id, bytes):
        m, _, q = entry_id.partition(b"-")
        return int(m), int(q or 0)
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_position(entry_id: bytes | str) -> tuple[int, str]:
    """The log position and the cursor of the stream entry ``entry_id`` (``<ms>-<seq>``)."""
    ms, seq = _split_id(entry_id)
    return ms << 64 | seq, fast_cursor(ms, seq)


def _position(entry_id: bytes | str) -> int:
    """The log position of the stream entry ``entry_id`` (``0-0``: 0, before every entry)."""
    ms, seq = _split_id(entry_id)
    return ms << 64 | seq


def entry_cursor(ms: int, seq: int) -> str:
    """The cursor of entry ``ms-seq``: a UUIDv7 layout (48-bit ms time, version 7) whose variant
    bits are ``11`` and whose 74 remaining bits hold the sequence. Every node derives the same
    cursor; cursors sort as the stream does; the variant tells them apart from the cursors of
    the memory and SQLite logs (variant ``10``) and from 0.7.4's UUID4s."""
    if not 0 <= ms <= _MASK48 or not 0 <= seq < _SEQ_LIMIT:
        raise ValueError(f"stream entry id {ms}-{seq} is out of the cursor's range")
    n = ms << 80 | 0x7 << 76 | (seq >> 62) << 64 | 0b11 << 62 | (seq & _MASK62)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_cursor_head: dict[int, str] = {}
#: the cursor's last 17 characters for the small sequence numbers (entries of one millisecond)
_TAILS = tuple(f"{t[:4]}-{t[4:]}" for t in (f"{0xC << 60 | seq:016x}" for seq in range(1024)))


def fast_cursor(ms: int, seq: int) -> str:
    """:func:`entry_cursor`, with the part that only the millisecond decides formatted once
    per millisecond (the reader's path: one call per entry read back)."""
    if seq < 1024:
        head = _cursor_head.get(ms)
        if head is not None:
            return head + _TAILS[seq]
    if seq >> 62:
        return entry_cursor(ms, seq)
    head = _cursor_head.get(ms)
    if head is None:
        if not 0 <= ms <= _MASK48:
            raise ValueError(f"stream entry id {ms}-{seq} is out of the cursor's range")
        if len(_cursor_head) > 64:
            _cursor_head.clear()
        h = f"{ms:012x}"
        head = _cursor_head[ms] = f"{h[:8]}-{h[8:]}-7000-"
    tail = f"{0xC << 60 | seq:016x}"
    return f"{head}{tail[:4]}-{tail[4:]}"


def cursor_entry(cursor: str) -> str | None:
    """The stream entry id a cluster cursor names; None for any other string (foreign)."""
    if len(cursor) != 36:
        return None
    try:
        n = uuid.UUID(cursor).int
    except ValueError:
        return None
    if (n >> 76) & 0xF != 7 or (n >> 62) & 0b11 != 0b11:
        return None
    ms, seq = n >> 80, ((n >> 64) & 0xFFF) << 62 | (n & _MASK62)
    return f"{ms}-{seq}"


def _redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_T = TypeVar("_T")


class Deadline:
    """One timer for successive deadlines (one per call): what a timer per call does, without
    one. :meth:`set` gives the deadline in force (None: none); the timer is armed once and,
    when it fires before the deadline in force, re-armed for it; at a deadline that passed it
    calls ``expired`` (under steady traffic it fires about once per deadline's length, not
    once per call)."""

    __slots__ = ("_at", "_handle", "_loop", "expired", "when")

    def __init__(self, expired: Callable[[], None]) -> None:
        self.expired = expired
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        self.when: float | None = None

    def set(self, when: float | None) -> None:
        self.when = when
        if when is not None and (self._handle is None or when < self._at):
            if self._handle is not None:
                self._handle.cancel()
            loop = self._loop = self._loop or asyncio.get_running_loop()
            self._at = when
            self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when, loop = self.when, self._loop
        if when is None or loop is None:
            return
        if loop.time() < when:
            self._at = when
            self._handle = loop.call_at(when, self._fire)
            return
        self.when = None
        self.expired()

    def close(self) -> None:
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Watchdog:
    """The deadline of one task's successive calls, on one timer (:class:`Deadline`): what
    ``asyncio.timeout_at`` per call does, without a timer (and a context manager) per call.
    At a deadline that passed it cancels the task, and :meth:`expired` then tells the task's
    ``CancelledError`` from a cancellation by its owner."""

    __slots__ = ("_deadline", "_task", "fired", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self.loop = loop
        self._task = task
        self._deadline = Deadline(self._fire)
        self.fired = False

    @property
    def when(self) -> float | None:
        """The deadline in force (None: no call awaited under a deadline)."""
        return self._deadline.when

    def arm(self, when: float) -> None:
        self._deadline.set(when)

    def disarm(self) -> None:
        self._deadline.set(None)

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    async def call(self, when: float, aw: Awaitable[_T], what: str) -> _T:
        """``await aw`` with the deadline ``when``: ``TimeoutError(what)`` once it passed (a
        cancellation by the task's owner propagates as such)."""
        self.arm(when)
        try:
            return await aw
        except asyncio.CancelledError:
            if not self.expired():
                raise
            raise TimeoutError(what) from None
        finally:
            self.disarm()

    def expired(self) -> bool:
        """After a ``CancelledError``: True (and the cancellation withdrawn) if this watchdog
        cancelled the task and nobody else did; False if the task's owner cancelled it too (as
        ``asyncio.timeout`` does: the error must then propagate)."""
        if not self.fired:
            return False
        self.fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        self._deadline.close()


class Outage:
    """Whether Redis answers; logs one line when an outage starts and one when it ends."""

    def __init__(self, where: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.where = where
        self.clock = clock
        self.since: float | None = None
        #: outages seen since start
        self.count = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException) -> None:
        if self.since is None:
            self.since = self.clock()
            self.count += 1
            logger.error("cluster log %s: Redis is unreachable (%s: %s): publishes are refused "
                         "with 503 until it returns", self.where, type(error).__name__, error)

    def ok(self) -> None:
        if self.since is not None:
            logger.warning("cluster log %s: Redis is reachable again after %.1f s",
                           self.where, self.clock() - self.since)
            self.since = None


#: what a connection taken over calls with each answer, and once when it fails
_Answered = Callable[["_Taken", object], None]
_Failed = Callable[["_Taken", BaseException], None]


class _Taken(asyncio.Protocol):
    """A connection to Redis once redis-py has connected it (TLS, AUTH, SELECT: all redis-py's),
    its protocol from then on: each answer is parsed (hiredis) and handed to ``answered`` in the
    event loop's read callback as it arrives, not by a task awaiting redis-py's reader once per
    answer. ``failed`` is called once, when the connection is lost or its bytes are not RESP."""

    def __init__(self, transport: asyncio.WriteTransport, answered: _Answered, failed: _Failed) -> None:
        import hiredis
        from redis.exceptions import InvalidResponse, ResponseError

        self.transport = transport
        self.answered = answered
        self.failed = failed
        self.parser = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.invalid: type[Exception] = InvalidResponse
        #: answers taken since connected
        self.answers = 0
        self.lost = False
        self.paused = False
        self._drained: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, conn: AbstractConnection, answered: _Answered, failed: _Failed) -> _Taken:
        """Become the protocol of ``conn``'s transport (connected, nothing unread)."""
        writer = getattr(conn, "_writer", None)  # redis-py's StreamWriter (no public accessor)
        if not isinstance(writer, asyncio.StreamWriter) or writer.transport.is_closing():
            raise ConnectionError("the Redis connection is not open")
        transport = writer.transport  # (uvloop's: not an asyncio class, so not checked as one)
        taken = cls(transport, answered, failed)
        transport.set_protocol(taken)
        return taken

    def data_received(self, data: bytes) -> None:
        parser, answered = self.parser, self.answered
        parser.feed(data)
        try:
            out = parser.gets()
            while out is not False and not self.lost:
                self.answers += 1
                answered(self, out)
                out = parser.gets()
        except self.invalid as e:  # not RESP: nothing more on this connection can be trusted
            self.failed(self, ServiceUnavailable(f"invalid answer from Redis: {e}", RETRY_AFTER))
        except Exception as e:  # callback boundary: a bug of ours must not leave the connection hanging
            logger.exception("cluster log: an answer from Redis not taken")
            self.failed(self, ServiceUnavailable(f"an answer from Redis not taken: {e!r:.200}", RETRY_AFTER))

    def eof_received(self) -> bool:
        return False  # Redis closed its end: close ours (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        self.failed(self, exc or ConnectionError("Redis closed the connection"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        d, self._drained = self._drained, None
        if d is not None and not d.done():
            d.set_result(None)

    async def drained(self) -> None:
        """Until Redis reads what was written (or the connection is gone)."""
        if self.paused and not self.lost:
            d = self._drained = asyncio.get_running_loop().create_future()
            await d

    def close(self) -> None:
        self.lost = True
        self._wake()
        self.transport.abort()


class RedisLog:
    """One node's view of the cluster log: appends go to Redis, the node routes what it reads."""

    synchronous = False

    def __init__(self, url: str, stream: str, size: int, max_age: float = 0.0, *,
                 timeout: float = 1.0, config_file: str = "?",
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.stream = stream
        self.size = size
        self.max_age = max_age
        self.timeout = timeout
        self.config_file = config_file
        self.where = f"{_redacted(url)} stream {stream!r}"
        self.mirror = MemoryLog(size, max_age, clock=clock)
        self.maxlen = size or LIVE_BOUND
        self.epoch_key = f"{stream}:epoch"
        self.outage = Outage(self.where)
        self._consumer: TailConsumer | None = None
        self._redis: Redis | None = None
        self._reader: Redis | None = None
        #: the writer's and the reader's own connections (redis-py's, with its parser)
        self._wconn: AbstractConnection | None = None
        self._rconn: AbstractConnection | None = None
        key, epoch_key = _bulk(stream.encode()), _bulk(self.epoch_key.encode())
        #: what every batch's EVAL starts with after its argument count (the script's text, not
        #: its SHA: no NOSCRIPT after a Redis restart, Redis keeps it compiled)
        self._call_head = (b"$4\r\nEVAL\r\n" + _bulk(_APPEND_LUA.encode()) + b"$1\r\n2\r\n" + key
                           + epoch_key + _bulk(str(self.maxlen).encode()))
        self._dedup_ttl = _bulk(str(DEDUP_TTL).encode())
        self._batch_ttl = _bulk(str(max(BATCH_TTL, math.ceil(timeout * 2) + 1)).encode())
        self._batches = 0
        self._xread_head = (b"*8\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n" + _bulk(str(READ_COUNT).encode())
                            + b"$5\r\nBLOCK\r\n" + _bulk(str(BLOCK_MS).encode())
                            + b"$7\r\nSTREAMS\r\n" + key)
        #: appends queued, the batch being sent, the batches sent and not yet answered
        self._queue: list[_Queued] = []
        self._sending: list[_Queued] = []
        self._inflight: collections.deque[_Batch] = collections.deque()
        #: batches whose connection was lost before their answer: sent again first (Redis
        #: answers one it stored with the ids it gave, and stores nothing twice)
        self._resend: collections.deque[_Batch] = collections.deque()
        #: times a batch was sent again after its connection was lost
        self.resent_batches = 0
        #: the append connection's protocol once taken over from redis-py (None: to connect)
        self._replies: _Taken | None = None
        #: the append connection's transport was taken over (redis-py must reconnect it)
        self._taken = False
        #: the oldest batch in flight's deadline, and the one timer that watches it
        self._reply_deadline = Deadline(self._replies_late)
        #: resolved once no batch is in flight (close() waits for the last answers)
        self._answered: asyncio.Future[None] | None = None
        #: the read connection's protocol once taken over (None: to connect), whether its
        #: transport was taken over, the XREAD's deadline (None: none outstanding) and its timer,
        #: the pause after a large read, and what the reading task waits on (the failure)
        self._entries: _Taken | None = None
        self._rtaken = False
        self._read_deadline = Deadline(self._read_late)
        self._read_pause: asyncio.TimerHandle | None = None
        self._read_lost: asyncio.Future[BaseException] | None = None
        self._read_beyond = BLOCK_MS / 1000 + timeout  # a read's deadline: beyond the block
        #: a send of what is queued is due in this turn of the loop
        self._flush_soon = False
        #: wakes the writer (appends queued, a batch answered)
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the id of the last entry read back: the next XREAD continues after it, always
        self.last_id = b"0-0"
        #: the stream's epoch (changes when the stream was deleted or reset)
        self.epoch: bytes | None = None
        #: the count ``N`` of the last batch read back (its last entry's); None: not known (none
        #: read yet, or since a reset); entries read since that batch's end
        self._count: int | None = None
        self._since = 0
        #: entries this node never read: removed (trimmed, deleted) before it read them
        self.missed = 0
        self._node_id = uuid.uuid4().hex.encode()
        self._epochs = 0
        self._closing = False
        #: the writer failed: appends are refused (reading back goes on)
        self._refusing = False
        #: the server was checked and the retained tail loaded (appends wait for it: 503 before)
        self.loaded = False
        #: Redis' clock minus ours (seconds) and how sure we are of it; None: not measured yet
        self.clock_offset: float | None = None
        self.clock_error = 0.0
        #: topics and private flag of the paths read back (bounded)
        self._paths: dict[str, tuple[tuple[str, ...], bool, frozenset[str]]] = {}
        #: this node's acknowledged entries not yet read back, by entry id, and their bytes
        self._own: dict[bytes, _Own] = {}
        self._own_bytes = 0
        #: entries read back whose event this node had appended (reused, not decoded)
        self.own_reused = 0
        #: entries read back, entries that were not events, resets detected
        self.entries_read = 0
        self.unreadable = 0
        self.resets = 0
        #: reads back large enough (a flood) that the next one waited ``COALESCE_PAUSE``
        self.coalesced_reads = 0
        #: batches Redis refused because they reached it after their deadline
        self.late_batches = 0
        #: the stream's newest id when the maintainer last looked (for the read lag)
        self.newest_id = b"0-0"

    def __repr__(self) -> str:
        return f"<RedisLog {self.where} {len(self.mirror)}/{self.size}>"

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {**self.mirror.stats(), "cluster_entries_read_total": self.entries_read,
                "cluster_unreadable_entries_total": self.unreadable,
                "cluster_resets_total": self.resets, "cluster_missed_entries_total": self.missed,
                "cluster_outages_total": self.outage.count,
                "cluster_batches_resent_total": self.resent_batches,
                "cluster_redis_up": 0 if self.outage.down or not self.loaded else 1,
                "cluster_read_lag_seconds": self.read_lag()}

    def read_lag(self) -> float:
        """How far this node's reading is behind the stream: the time between the newest entry
        the maintainer saw (every ``MAINTAIN_INTERVAL``) and the last entry read back."""
        behind = _split_id(self.newest_id)[0] - _split_id(self.last_id)[0]
        return max(behind, 0) / 1000

    def unready(self) -> str | None:
        """Why a publish cannot be accepted now (None: it can)."""
        if self.outage.down or not self.loaded:
            return f"Redis unreachable ({self.where})"
        if self._refusing or self._closing:
            return f"cluster log {self.where} is not accepting events"
        return None

    @property
    def closing(self) -> bool:
        return self._closing

    # -- lifecycle ------------------------------------------------------------------------
    def tail(self, consumer: TailConsumer) -> None:
        self._consumer = consumer

    async def start(self) -> None:
        """Connect, check the server's settings, load the retained tail, start reading.

        Redis unreachable at start is an outage like any other: the node starts, is unready
        (publishes get ``503``) and connects, checks and loads as soon as Redis answers."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.maint_notifications import MaintNotificationsConfig

        # no retries inside redis-py: a publish gets its answer within ``timeout``
        common: dict[str, Any] = {"socket_connect_timeout": self.timeout, "retry": Retry(NoBackoff(), 0),
                                  "decode_responses": False,
                                  "maint_notifications_config": MaintNotificationsConfig(enabled=False)}
        try:
            self._redis = Redis.from_url(self.url, socket_timeout=self.timeout, **common)
            # the appends and the blocking read have a connection each, used only under this
            # class's own deadlines (``asyncio.timeout``): without a socket timeout, redis-py
            # sends without starting a task per command
            self._reader = Redis.from_url(self.url, max_connections=2, socket_timeout=None, **common)
            self._wconn = self._reader.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            self._rconn = self._reader.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        except ValueError as e:
            raise ConfigError(self.config_file, "server.backlog.storage", f"not a Redis URL: {e}") from None
        try:
            await self._prepare()
        except (RedisError, OSError, TimeoutError) as e:
            self.outage.failed(e)
            logger.warning("cluster log %s: starting without Redis; the node is unready and "
                           "refuses publishes until Redis answers", self.where)
        loop = self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._writer = loop.create_task(self._write_loop(), name="pypubsub-redis-writer")
        self._writer.add_done_callback(self._writer_ended)
        self._tasks = [loop.create_task(self._read_loop(), name="pypubsub-redis-reader"),
                       loop.create_task(self._maintain_loop(), name="pypubsub-redis-maintainer")]

    async def _prepare(self) -> None:
        """Check the server, measure its clock, load the retained tail (once, at first contact)."""
        async with asyncio.timeout(self.timeout * 5):
            await self._check_server()
            await self._measure_clock()
            await self._load()
            for conn in (self._wconn, self._rconn):  # connected now: the first append is sent at once
                if conn is not None:
                    await conn.connect()  # type: ignore[no-untyped-call]
        self.loaded = True
        newest = self.mirror.newest()
        logger.info("cluster log %s: %d event(s) retained (newest %s), reading after %s",
                    self.where, len(self.mirror), newest.cursor if newest else "none",
                    self.last_id.decode())

    async def _check_server(self) -> None:
        """Warn about settings under which Redis may lose acknowledged events."""
        if self._redis is None:
            raise RuntimeError("RedisLog not started")
        memory = await self._redis.info("memory")
        policy = str(_text(memory.get("maxmemory_policy", "noeviction")))
        if policy != "noeviction":
            logger.warning("cluster log %s: Redis maxmemory-policy is %r: Redis may evict the "
                           "stream and lose acknowledged events; set maxmemory-policy noeviction",
                           self.where, policy)
        persistence = await self._redis.info("persistence")
        if str(persistence.get("aof_enabled", 0)) != "1":
            logger.warning("cluster log %s: Redis runs without AOF (appendonly no): a restart of "
                           "Redis loses acknowledged events; set appendonly yes and appendfsync "
                           "always", self.where)
            return
        from redis.exceptions import ResponseError

        try:
            fsync = await self._redis.config_get("appendfsync")
        except ResponseError:  # CONFIG is often renamed or refused by managed services
            return
        value = str(_text(_field(fsync, "appendfsync") or "?"))
        if value != "always":
            logger.warning("cluster log %s: Redis appendfsync is %r: a crash of the Redis host "
                           "may lose the last second of acknowledged events; set appendfsync "
                           "always", self.where, value)

    async def _measure_clock(self) -> None:
        """Redis' clock against ours (``TIME``), for the deadline a batch carries to Redis."""
        if self._redis is None:
            raise RuntimeError("RedisLog not started")
        t0 = time.time()
        sec, usec = await self._redis.time()
        t1 = time.time()
        self.clock_offset = int(sec) + int(usec) / 1e6 - (t0 + t1) / 2
        self.clock_error = (t1 - t0) / 2

    async def _load(self) -> None:
        """Fill the mirror with the newest retained entries; the reader continues after them."""
        if self._redis is None:
            raise RuntimeError("RedisLog not started")
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrevrange(
            self.stream, "+", "-", count=max(self.size, 1))  # type: ignore[assignment]
        self._take([(entry_id, [x for kv in fields.items() for x in kv])
                    for entry_id, fields in reversed(entries)], route=False)

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            # the writer ends once what is queued was sent (or timed out); then every batch
            # sent is answered, or fails at its deadline (the reply timer)
            self._wake_writer()
            await cancel_and_wait_after(self._writer, self.timeout * 2)
            if self._inflight and self._loop is not None:
                answered = self._answered = self._loop.create_future()
                await asyncio.wait([answered], timeout=self.timeout * 2)
            self._answered = None
            self._reply_deadline.set(None)
            for b in (*self._inflight, *self._resend):  # sent: Redis may have stored them
                _refuse(b, IN_DOUBT)
            _refuse(self._unsettled(), "shutting down: event not stored")
            self._sending, self._queue = [], []
            self._inflight.clear()
            self._resend.clear()
        for t in self._tasks:
            t.cancel()
        # redis-py may let a cancellation that lands as a blocking XREAD starts go by (the
        # XREAD then blocks its full time): closing the reader's connection ends it at once
        if self._rconn is not None:
            await self._rconn.disconnect(nowait=True)
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []
        self._read_failed(self._entries, ConnectionError("closed"))
        self._read_deadline.close()
        self._reply_deadline.close()
        await self._aclose()
        logger.info("cluster log %s closed: %d entries read since start (%d of them this node's, "
                    "not decoded again)", self.where, self.entries_read, self.own_reused)

    async def _aclose(self) -> None:
        for c in (self._wconn, self._rconn):
            if c is not None:
                await c.disconnect(nowait=True)
        self._wconn = self._rconn = None
        for r in (self._reader, self._redis):
            if r is not None:
                await r.aclose()
        self._reader = self._redis = None

    # -- writing ------------------------------------------------------------------------
    def append(self, event: Event, *, dedup: str | None = None) -> asyncio.Future[Appended | None]:
        """Queue the stamped event for the next batch; resolves once Redis acknowledged it
        (None: a duplicate). The event is routed when this node's reader reads it back: the
        fresh ``event`` itself (the log's from now on), given the entry's cursor and position."""
        loop = self._loop
        if loop is None or self._closing or self._refusing or self._wake is None:
            fut: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ServiceUnavailable("the cluster log is closed: event not stored", RETRY_AFTER))
            return fut
        fut = loop.create_future()
        if not self.loaded:
            fut.set_exception(ServiceUnavailable(f"Redis unreachable ({self.where}): event not stored",
                                                 RETRY_AFTER))
            return fut
        j = event.json
        # the usual shape: the cursor is the last member, so the entry keeps the bytes before it
        if j.endswith(b'"pubsub_cursor":"' + event.cursor.encode() + b'"}') and len(event.cursor) == 36:
            name, data = PREFIX_FIELD, j[:-38]
        else:
            name, data = EVENT_FIELD, j
        self._queue.append((name, data, b"" if dedup is None else dedup.encode(), fut,
                            loop.time() + self.timeout, event if name is PREFIX_FIELD else None))
        if not self._flush_soon:
            self._flush_later(loop)
        return fut

    def _flush_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send what is queued at the end of this turn of the loop (:meth:`_flush`)."""
        self._flush_soon = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what was queued in this turn of the loop, in batches, from the loop's callback
        (the writer task only (re)connects, and waits while Redis does not read)."""
        self._flush_soon = False
        replies, loop, inflight = self._replies, self._loop, self._inflight
        if replies is None or replies.paused or loop is None:
            self._wake_writer()
            return
        while len(inflight) < MAX_INFLIGHT:
            batch = self._next_batch(loop.time())
            if batch is None:
                break
            if batch:
                replies.transport.writelines(self._packed(batch))
                inflight.append(batch)
                self._watch_replies()
        if self._closing and not self._queue:
            self._wake_writer()

    def _next_batch(self, now: float) -> _Batch | None:
        """The next batch: one to send again first (once due), else off the queue; None:
        nothing to send now. Each append is answered within its own ``timeout``, also when it
        waited behind a batch to a hung Redis: one whose time is up is refused unsent (an empty
        batch)."""
        resend = self._resend
        if resend and resend[0].not_before <= now:
            batch = resend.popleft()
            if batch[0][4] > now:  # (its first append's time is the earliest)
                batch.resent = True
                self.resent_batches += 1
                return batch
            self.outage.failed(TimeoutError(f"no answer within {self.timeout:g} s"))
            _refuse(batch, IN_DOUBT)  # sent whole or not at all: its answer is the whole batch's
            return _Batch()
        if not self._queue:
            return None
        items, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if items[0][4] <= now:
            late = [q for q in items if q[4] <= now]
            self.outage.failed(TimeoutError(f"no answer within {self.timeout:g} s"))
            _refuse(late)
            items = [q for q in items if q[4] > now]
        self._batches += 1
        return _Batch(items, self._batches)

    async def _write_loop(self) -> None:
        """Sends the appends that :meth:`_flush` cannot: while the connection is to be opened
        (redis-py connects it, then it is taken over) or Redis is not reading what was written.
        Like :meth:`_flush`, all those queued meanwhile go in one script call (one round trip,
        and one fsync in Redis), in queue order, up to ``MAX_INFLIGHT`` batches on the
        connection before the first is answered (:meth:`_replied` takes the answers as they
        arrive); ends once closing and nothing is left to send."""

        wake, conn, redis, loop = self._wake, self._wconn, self._redis, self._loop
        task = asyncio.current_task()
        if wake is None or conn is None or redis is None or loop is None or task is None:
            raise RuntimeError("RedisLog._write_loop runs only after start()")
        dog = Watchdog(loop, task)
        try:
            await self._write_batches(wake, conn, redis, dog)
        finally:
            dog.close()

    async def _write_batches(self, wake: asyncio.Event, conn: AbstractConnection, redis: Redis,
                             dog: Watchdog) -> None:
        from redis.exceptions import RedisError

        loop = dog.loop
        late_text = f"no answer within {self.timeout:g} s"
        for _ in iter(int, 1):  # until closed
            batch = self._next_batch(loop.time()) if len(self._inflight) < MAX_INFLIGHT else None
            if batch is None:
                if self._closing and not (self._queue or self._resend):
                    return
                await wake.wait()
                wake.clear()
                continue
            if not batch:
                continue
            self._sending = batch
            try:
                await dog.call(batch[0][4], self._send(redis, conn, batch), late_text)
            except (RedisError, OSError, TimeoutError) as e:
                self._sending = []
                if not any(b is batch for b in self._inflight):  # not sent: the connection failed
                    if batch.resent:
                        self._requeue(batch)  # still in doubt: again, within its time
                    else:
                        _refuse(batch)
                self.outage.failed(e)
                self._replies_failed(self._replies, e)  # what was sent: in doubt, or refused
                self._taken = False
                await conn.disconnect(nowait=True)
                if self._resend:  # back-off before connecting again, not synchronisation
                    await asyncio.sleep(RECONNECT_MIN)
                continue
            self._sending = []

    async def _send(self, redis: Redis, conn: AbstractConnection, batch: _Batch) -> None:
        """Write the batch's EVAL; it is in flight from then on (its answer may come any time)."""
        replies = self._replies
        if replies is None:  # (re)connect: redis-py does TLS, AUTH, SELECT; the answers are ours
            if self._taken:  # redis-py's state of the connection taken over before: reset it
                self._taken = False
                await conn.disconnect(nowait=True)
            await redis.connection_pool.ensure_connection(conn)
            replies = self._replies = _Taken.take_over(conn, self._replied, self._replies_failed)
            self._taken = True
        replies.transport.writelines(self._packed(batch))
        self._inflight.append(batch)
        self._watch_replies()
        if replies.paused:  # Redis is not reading: wait (within the batch's deadline)
            await replies.drained()

    def _replied(self, replies: _Taken, out: object) -> None:
        """The answer to the oldest batch in flight (as it arrives: :class:`_Taken`)."""
        from redis.exceptions import ResponseError

        inflight = self._inflight
        if replies is not self._replies:
            return  # a connection already given up: its batches were refused
        if not inflight:
            self._replies_failed(replies, ServiceUnavailable(
                f"an answer from Redis to no request: {out!r:.80}", RETRY_AFTER))
            return
        if isinstance(out, ResponseError):  # Redis refused the batch (out of memory, late)
            batch = inflight.popleft()
            self._batch_answered()
            text = str(out)
            if batch.resent and text.startswith(_NOT_RUN) and self._loop is not None:
                self._resend_later(batch, self._loop)  # not run: still in doubt
                return
            if text.startswith("PUBSUBLATE"):  # (the script found no answer kept: not stored)
                self.late_batches += 1
                self.outage.failed(TimeoutError(f"Redis ran a batch after its deadline ({out})"))
                _refuse(batch)
                return
            self.outage.ok()
            _refuse(batch, IN_DOUBT if batch.resent else f"Redis refused the event: {text[:200]}")
            return
        batch = inflight[0]
        if type(out) is not list or len(out) != len(batch) or not all(
                r is None or type(r) is bytes for r in out):  # never acknowledge on doubt
            self._replies_failed(replies, ServiceUnavailable(
                f"unexpected answer from Redis: {out!r:.80}", RETRY_AFTER))
            return
        inflight.popleft()
        self._batch_answered()
        self.outage.ok()
        own, last = self._own, _position(self.last_id)
        held = self._own_bytes
        try:
            for q, r in zip(batch, out, strict=True):
                fut = q[3]
                if r is None:
                    if not fut.done():
                        fut.set_result(None)
                    continue
                position, cursor = entry_position(r)
                ev = q[5]
                if ev is not None and position > last:  # not read back yet: the reader reuses it
                    held += len(q[1])
                    if len(own) >= OWN_LIMIT or held > OWN_BYTES:
                        own.clear()
                        held = len(q[1])  # (the reader subtracts what it takes)
                    own[r] = (q[1], ev, position, cursor)
                if not fut.done():
                    fut.set_result(Appended(position, cursor))
        except Exception:  # (an entry id out of the cursor's range): no publish of it may hang
            _refuse(batch, "Redis answered with an entry id this node cannot read (the event may be stored)")
            raise
        finally:
            self._own_bytes = held

    def _resend_later(self, batch: _Batch, loop: asyncio.AbstractEventLoop) -> None:
        """Send ``batch`` again after a back-off (within its time: then it is refused)."""
        batch.not_before = min(loop.time() + RECONNECT_MIN, batch[0][4])
        self._requeue(batch)
        loop.call_at(batch.not_before, self._resend_due)

    def _requeue(self, *batches: _Batch) -> None:
        """Batches to send again, among those waiting, in the order they were made (a
        publisher's pipelined publishes keep their order in the stream)."""
        self._resend = collections.deque(sorted((*self._resend, *batches), key=lambda b: b.seq))

    def _resend_due(self) -> None:
        if not self._flush_soon and self._loop is not None:
            self._flush_later(self._loop)

    def _batch_answered(self) -> None:
        """The oldest batch in flight was answered: watch the next one's deadline, let the
        writer send more, tell close() when nothing is left in flight."""
        self._watch_replies()
        if (self._queue or self._resend) and not self._flush_soon and self._loop is not None:
            self._flush_later(self._loop)
        elif self._closing:
            self._wake_writer()
        answered = self._answered
        if answered is not None and not self._inflight and not answered.done():
            answered.set_result(None)

    def _replies_failed(self, replies: _Taken | None, error: BaseException) -> None:
        """The append connection failed (closed, an answer late or not to be trusted) and is
        closed; the writer connects again. Batches in flight on a connection that was lost
        are in doubt (Redis may have stored them): they are sent again first, and Redis answers
        one it stored with the ids it gave. After an answer late or not to be trusted, every
        batch in flight is refused. A connection Redis closed while nothing was in flight is no
        outage (Redis closes idle clients)."""
        if replies is None or replies is not self._replies:
            return
        self._replies = None
        inflight = self._inflight
        lost = isinstance(error, (ConnectionError, OSError)) and not isinstance(error, TimeoutError)
        if inflight or not lost:
            if isinstance(error, ServiceUnavailable):
                logger.error("cluster log %s: %s: %d append(s) refused", self.where,
                             error.reason, sum(len(b) for b in inflight))
            else:
                self.outage.failed(error)
        if lost and not self._closing:
            self._requeue(*inflight)
            inflight.clear()
        while inflight:  # sent: Redis may have stored them
            _refuse(inflight.popleft(), IN_DOUBT)
        self._batch_answered()
        replies.close()

    def _watch_replies(self) -> None:
        """The reply deadline in force: the oldest batch in flight's (None: nothing in flight)."""
        inflight = self._inflight
        self._reply_deadline.set(inflight[0][0][4] if inflight else None)

    def _replies_late(self) -> None:
        self._replies_failed(self._replies, TimeoutError(f"no answer within {self.timeout:g} s"))

    def _wake_writer(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _drop_connection(self, conn: AbstractConnection | None) -> None:
        """Close ``conn`` at once: a reply still on its way must never be read as another's
        (redis-py connects it again on its next use)."""
        if conn is not None:
            await conn.disconnect(nowait=True)

    def _unsettled(self) -> list[_Queued]:
        return [*self._sending, *(q for b in self._inflight for q in b),
                *(q for b in self._resend for q in b), *self._queue]

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """If the writer failed, refuse appends (503) instead of leaving publishers waiting."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("cluster log %s: the writer failed; publishing is refused until restart",
                     self.where, exc_info=task.exception())
        self._refusing = True
        _refuse(self._unsettled(), IN_DOUBT)
        self._sending, self._queue = [], []
        self._inflight.clear()
        self._resend.clear()

    def _deadline(self, batch: _Batch) -> bytes:
        """Redis' time (ms) after which it must not store ``batch``: ahead of the node's own
        deadline by ``DEADLINE_MARGIN`` of the timeout and the clock's uncertainty."""
        if self.clock_offset is None:
            return b"0"
        loop = self._loop or asyncio.get_running_loop()
        left = batch[0][4] - loop.time()
        ahead = left - self.timeout * DEADLINE_MARGIN - self.clock_error
        return str(int((time.time() + self.clock_offset + ahead) * 1000)).encode()

    def _new_epoch(self) -> bytes:
        """The epoch a batch starts if it finds no stream (unique: this node's random id and a
        count), as a RESP bulk string."""
        self._epochs += 1
        return _bulk(b"%s-%d" % (self._node_id, self._epochs))

    def _packed(self, batch: _Batch) -> list[bytes]:
        """The batch's one EVAL, as RESP bytes (built here: no per-command packing)."""
        parts = [b"*%d\r\n" % (11 + 3 * len(batch)), self._call_head,
                 self._new_epoch(), _bulk(self._deadline(batch)), self._dedup_ttl,
                 _bulk(b"%s%s-%d" % (b"=" if batch.resent else b"", self._node_id, batch.seq)),
                 self._batch_ttl]
        for name, data, dedup, _fut, _t, _ev in batch:
            parts.append(b"$%d\r\n%b\r\n$1\r\n%b\r\n$%d\r\n" % (len(dedup), dedup, name, len(data)))
            parts.append(data)
            parts.append(b"\r\n")
        return parts

    # -- reading back -------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Owns the read connection: connects it (redis-py), takes it over, and keeps one
        blocking XREAD outstanding on it, always from the last id read (:meth:`_read_next`,
        :meth:`_read_back`); after a failure, connects again with back-off."""
        from redis.exceptions import RedisError

        loop = self._loop
        if loop is None:
            raise RuntimeError("RedisLog._read_loop runs only after start()")
        backoff = RECONNECT_MIN
        for _ in iter(int, 1):  # until cancelled or closing
            conn, reader = self._rconn, self._reader
            if conn is None or reader is None or self._closing:
                return
            entries = None
            try:
                if not self.loaded:
                    await self._prepare()
                if self._rtaken:  # redis-py's state of the connection taken over before: reset it
                    self._rtaken = False
                    await conn.disconnect(nowait=True)
                async with asyncio.timeout(self.timeout):
                    await reader.connection_pool.ensure_connection(conn)
                lost = self._read_lost = loop.create_future()
                entries = self._entries = _Taken.take_over(conn, self._read_back, self._read_failed)
                self._rtaken = True
                self._read_next()
                error = await lost
                raise error if isinstance(error, (RedisError, OSError, TimeoutError, ServiceUnavailable)) \
                    else ConnectionError(f"the read connection failed: {error!r}")
            except (RedisError, OSError, TimeoutError, ServiceUnavailable) as e:
                if self.closing:  # close() ended the connection
                    return
                if entries is not None:
                    self._read_failed(entries, e)
                    if entries.answers:
                        backoff = RECONNECT_MIN
                await self._drop_connection(conn)
                self._rtaken = False
                self.outage.failed(e)
                await asyncio.sleep(backoff)  # back-off before reconnecting, not synchronisation
                backoff = min(backoff * 2, RECONNECT_MAX)

    def _read_next(self) -> None:
        """Send the blocking XREAD from the last id read (its deadline: beyond the block)."""
        self._read_pause = None
        entries, loop = self._entries, self._loop
        if entries is None or entries.lost or loop is None or self._closing:
            return
        entries.transport.write(self._xread_head + _bulk(self.last_id))
        self._read_deadline.set(loop.time() + self._read_beyond)

    def _read_late(self) -> None:
        self._read_failed(self._entries, TimeoutError(f"no answer to XREAD within {self._read_beyond:g} s"))

    def _read_back(self, entries: _Taken, resp: object) -> None:
        """The answer to the XREAD (as it arrives: :class:`_Taken`)."""
        from redis.exceptions import ResponseError

        if entries is not self._entries:
            return
        self._read_deadline.set(None)
        if isinstance(resp, ResponseError):
            self._read_failed(entries, resp)
            return
        self.outage.ok()
        if resp and self._inflight and self._loop is not None:
            # Redis sends a read its entries before the appends their acknowledgements: one
            # turn of the loop lets the answers that came with them in first, so this node's
            # own entries are reused, not decoded (the read back's order is the same)
            self._loop.call_soon(self._read_take, entries, resp)
            return
        self._read_take(entries, resp)

    def _read_take(self, entries: _Taken, resp: object) -> None:
        """Take the entries read back, then read on (at once, or after a pause under a flood)."""
        if entries is not self._entries:
            return  # given up meanwhile: the next connection reads these entries again
        n = 0
        try:
            for _key, es in _streams(resp):
                n += len(es)
                self._take(es, route=True)
        except Exception as e:  # callback boundary (an answer not shaped as XREAD's): read again
            logger.exception("cluster log %s: a read back not taken", self.where)
            self._read_failed(entries, ServiceUnavailable(f"a read back not taken: {e!r:.200}", RETRY_AFTER))
            return
        if n >= COALESCE_AT and self._loop is not None:  # a flood: let entries gather for the next read
            self.coalesced_reads += 1
            self._read_pause = self._loop.call_later(COALESCE_PAUSE, self._read_next)
        else:
            self._read_next()

    def _read_failed(self, entries: _Taken | None, error: BaseException) -> None:
        """The read connection failed (lost, late, refused, not RESP): close it; the reading
        task connects again and continues after the last entry read."""
        if entries is None or entries is not self._entries:
            return
        self._entries = None
        self._read_deadline.set(None)
        if self._read_pause is not None:
            self._read_pause.cancel()
            self._read_pause = None
        entries.close()
        lost = self._read_lost
        if lost is not None and not lost.done():
            lost.set_result(error)

    def _take(self, entries: Sequence[tuple[bytes, Sequence[bytes]]], *, route: bool) -> None:
        """Entries read back, in stream order (each its id and its fields as a flat name, value
        list): into the mirror, then (live) to the node's hub. One loop, its lookups hoisted: it
        runs for every entry on every node.

        An entry this node appended (Redis gave its id to the append) holds the event this node
        built: that event is stamped with the entry's cursor and taken here, at its place in the
        stream, instead of being decoded again."""
        mirror, paths, own = self.mirror, self._paths, self._own
        keep, consumer = mirror.keep, self._consumer if route else None
        last, last_id, epoch_now, taken, reused = mirror.last_position, self.last_id, self.epoch, 0, 0
        count, since, read = self._count, self._since, 0
        try:
            for entry_id, fields in entries:
                try:
                    mine = own.pop(entry_id, None) if own else None
                    if mine is None:
                        position, cursor = entry_position(entry_id)
                    else:
                        self._own_bytes -= len(mine[0])
                        position, cursor = mine[2], mine[3]
                    if position <= last:
                        continue  # already taken (cannot happen with XREAD after last_id; cheap to guard)
                    last_id, read, taken = entry_id, position, taken + 1
                    # the writer's entries are [p|e, bytes, g, epoch], a batch's last one also
                    # [n, "N k"] (earlier versions': never); look further only for others
                    epoch: bytes | None
                    n: bytes | None
                    if len(fields) == 6 and fields[4] == COUNT_FIELD and fields[2] == EPOCH_FIELD:
                        name, data, epoch, n = fields[0], fields[1], fields[3], fields[5]
                    elif len(fields) == 4 and fields[2] == EPOCH_FIELD:
                        name, data, epoch, n = fields[0], fields[1], fields[3], None
                    else:
                        named = dict(zip(fields[::2], fields[1::2], strict=False))
                        epoch, n = named.get(EPOCH_FIELD), named.get(COUNT_FIELD)
                        name = PREFIX_FIELD if PREFIX_FIELD in named else EVENT_FIELD
                        data = named.get(name) or b""
                    if epoch != epoch_now:
                        # a new epoch is checked from its first batch read on (a node of an
                        # earlier version may have started it, and counted nothing)
                        if epoch_now is not None or len(mirror):
                            self._reset("an entry of a new epoch")
                        epoch_now = self.epoch = epoch
                        count, since = None, 0
                    since += 1
                    if n is not None:  # a batch's last entry ("N k"; anything else: no count)
                        total, _, size = n.partition(b" ")
                        if total.isdigit() and size.isdigit():
                            # its k entries end the epoch's first N: it must begin where the last
                            # batch read ended, and all k must have been read
                            got, k = int(total), int(size)
                            if count is not None and (got - k != count or since < k):
                                self._gap(count, got, k, since)
                            count, since = got, 0
                    if mine is not None and name == PREFIX_FIELD and data == mine[0] \
                            and not mine[1].position and type(payload := mine[1].payload) is dict:
                        # this node's event, as Redis holds it (the bytes are compared: after a
                        # reset, Redis may give the id to another node's entry), taken once
                        event = mine[1]
                        event.cursor = cursor
                        event.json = data + cursor.encode() + b'"}'
                        payload["pubsub_cursor"] = cursor
                        event.position = position
                        reused += 1
                    elif name != PREFIX_FIELD:
                        event = self._restamped(data, cursor, position)
                    else:  # the stamped JSON (cursor included): parsed, not rebuilt
                        json = data + cursor.encode() + b'"}'
                        obj = orjson.loads(json)
                        if type(obj) is not dict:  # orjson gives exact types: no subclass to allow for
                            raise EventError("not a JSON object")
                        path, ts = obj.get("pubsub_path"), obj.get("pubsub_timestamp")
                        if type(path) is not str or (type(ts) is not float and type(ts) is not int):
                            raise EventError("no pubsub_path or pubsub_timestamp")
                        parsed = paths.get(path)
                        if parsed is None:
                            parsed = self._parse_path(path)
                        # positional (Event's field order): a fifth cheaper than by keyword here
                        event = Event(parsed[0], parsed[1], path, float(ts), cursor, obj, json,
                                      parsed[2], {}, position)
                except (orjson.JSONDecodeError, EventError, TopicError) as e:
                    self.unreadable += 1
                    logger.warning("cluster log %s: skipping entry %s, not an event (%s)",
                                   self.where, entry_id.decode(errors="replace"), e)
                    continue
                except Exception:  # task boundary: one bad entry must not stop the node's reads
                    logger.exception("cluster log %s: entry %r not taken", self.where, entry_id)
                    continue
                keep(event)
                last = position
                if consumer is not None:
                    try:
                        consumer(event)
                    except Exception:  # task boundary: one subscriber's failure must not stop the reads
                        logger.exception("cluster log %s: entry %r not routed", self.where, entry_id)
            if own and (oldest := next(iter(own.values())))[2] <= read:
                # acknowledged with an id not read yet (the oldest is first), and now read past:
                # its entry is not in the stream this node reads, whatever the counts say
                self._reset(f"an event this node appended (cursor {oldest[3]}) is not in the stream "
                            f"any more: a restart from an older copy, failover to a lagging "
                            f"replica, or trimmed before this node read it")
        finally:
            self.last_id = last_id
            self._count, self._since = count, since
            self.entries_read += taken
            self.own_reused += reused

    def _parse_path(self, path: str) -> tuple[tuple[str, ...], bool, frozenset[str]]:
        """The topics, private flag and topic set of an entry's ``pubsub_path`` (cached)."""
        if path != remove_dot_segments(path):
            raise EventError(f"pubsub_path {path!r} is not canonical")
        topics, private = parse_publish_path(path)
        if len(self._paths) >= PATH_CACHE:
            self._paths.clear()
        parsed = self._paths[path] = (topics, private, frozenset(topics))
        return parsed

    def _restamped(self, data: bytes, cursor: str, position: int) -> Event:
        """An event stored whole (``e``): stamped again with its cluster cursor."""
        obj = orjson.loads(data)
        if not isinstance(obj, dict):
            raise EventError("not a JSON object")
        path, ts = obj.get("pubsub_path"), obj.get("pubsub_timestamp")
        if not isinstance(path, str) or not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise EventError("no pubsub_path or pubsub_timestamp")
        return make_event(path, obj, timestamp=float(ts), cursor=cursor, position=position)

    def _gap(self, count: int, got: int, k: int, since: int) -> None:
        """A batch of ``k`` entries that ends the epoch's first ``got``, read ``since`` entries
        after the end of a batch that ended its first ``count`` (same epoch), does not follow it."""
        if got - k >= count:  # entries in between are gone: trimmed or deleted before they were read
            # (entries of nodes of earlier versions are read but not counted: at least the rest)
            missed = max(got - count - since, got - k - count)
            self.missed += missed
            self._reset(f"{missed} {'entry was' if missed == 1 else 'entries were'} removed before "
                        f"this node read them: trimmed (the stream's size or max_age is too small "
                        f"for how far this node fell behind) or deleted", what="missed events")
        else:  # counted again: the stream lost entries this node had read, and went on
            self._reset(f"the stream went back: a batch begins after its entry {got - k}, but "
                        f"this node had read {count}: a restart from an older copy, or failover "
                        f"to a lagging replica")

    def _reset(self, why: str, what: str = "the stream was reset") -> None:
        """The stream was deleted or reset (FLUSHALL, failover to an empty or lagging replica),
        or this node missed entries: what it kept for replay no longer follows the stream."""
        self.resets += 1
        lost = len(self.mirror)
        self.mirror.clear()
        self._own.clear()  # entries of the old stream: never read back
        self._own_bytes = 0
        self._count, self._since = None, 0
        logger.warning("cluster log %s: %s (%s): acknowledged events may be lost to this "
                       "node's subscribers; %d retained event(s) dropped, clients resuming from "
                       "before it are told their cursor is not found", self.where, what, why, lost)

    async def _maintain_loop(self) -> None:
        """Detect a reset even when nothing is published; trim by age (Redis time); keep the
        measure of Redis' clock current."""
        from redis.exceptions import RedisError

        trim_every = min(max(self.max_age / 10, MIN_TRIM_INTERVAL), MAX_TRIM_INTERVAL)
        next_trim = time.monotonic() + trim_every
        for _ in iter(int, 1):  # until cancelled
            await asyncio.sleep(MAINTAIN_INTERVAL)
            redis = self._redis
            if redis is None:
                return
            if not self.loaded:
                continue  # the reader prepares when Redis first answers
            try:
                async with asyncio.timeout(self.timeout):
                    await self._check_reset(redis)
                    await self._measure_clock()
                    if self.max_age and time.monotonic() >= next_trim:
                        next_trim = time.monotonic() + trim_every
                        sec, usec = await redis.time()
                        minid = int(sec) * 1000 + int(usec) // 1000 - int(self.max_age * 1000)
                        if minid > 0:
                            await redis.xtrim(self.stream, minid=f"{minid}-0", approximate=True)
            except (RedisError, OSError, TimeoutError) as e:
                self.outage.failed(e)

    async def _check_reset(self, redis: Redis) -> None:
        """A stream that is gone, or whose newest id is older than what this node read, was
        reset (FLUSHALL, DEL, a restart from an older snapshot, failover to a lagging replica)."""
        if self.epoch is None:
            return  # nothing read since start or since the last reset: nothing more to lose
        from redis.exceptions import ResponseError

        # what was read before asking: entries read while the question is on its way may be
        # newer than the answer (Redis answers the reader first after a stall)
        read = self.last_id
        try:
            info = await redis.xinfo_stream(self.stream)
        except ResponseError:  # no such key
            why = "the stream is gone"
        else:
            last = _field(info, "last-generated-id") or b"0-0"
            self.newest_id = last if isinstance(last, bytes) else str(last).encode()
            if _split_id(last) >= _split_id(read):
                return
            why = "the stream is behind what this node read"
        self.epoch = None
        self._reset(why)

    # -- replay (from the mirror of what this node read back) -----------------------------
    async def locate(self, *, cursor: str | None = None, since: float | None = None) -> Located | None:
        if cursor is not None and cursor_entry(cursor) is None:
            logger.debug("cluster log: cursor %.64r is not a cluster cursor (foreign)", cursor)
            return None
        return self.mirror.locate_now(cursor=cursor, since=since)

    async def read(self, after: int, limit: int) -> list[Event]:
        return self.mirror.read_now(after, limit)


def _bulk(b: bytes) -> bytes:
    """``b`` as a RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _refuse(batch: list[_Queued],
            why: str = "the cluster log (Redis) is unreachable: event not stored") -> None:
    for q in batch:
        fut = q[3]
        if not fut.done():
            fut.set_exception(ServiceUnavailable(why, RETRY_AFTER))


async def cancel_and_wait_after(task: asyncio.Task[None], grace: float) -> None:
    """Let ``task`` finish by itself for ``grace`` seconds, then cancel it."""
    done, _ = await asyncio.wait([task], timeout=grace)
    if not done:
        logger.warning("cluster log: appends still pending at shutdown after %.1f s: refused", grace)
    await cancel_and_wait(task)


def _field(reply: Mapping[Any, Any], name: str) -> Any:
    """``reply[name]`` whether redis-py gave its keys as str or bytes (None when absent)."""
    v = reply.get(name)
    return reply.get(name.encode()) if v is None else v


def _text(v: object) -> object:
    return v.decode() if isinstance(v, bytes) else v


def _streams(resp: object) -> Sequence[tuple[object, Sequence[tuple[bytes, Sequence[bytes]]]]]:
    """XREAD's raw answer as (key, entries) pairs, whether RESP2 (a list) or RESP3 (a map);
    each entry is its id and its fields as a flat name, value list."""
    if not resp:
        return ()
    if isinstance(resp, dict):
        return [(k, v) for k, v in resp.items()]
    return resp  # type: ignore[return-value]
