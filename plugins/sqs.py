"""SQS ingestion: one long-polling consumer per configured queue, feeding the one publish path.

Owns the ``sqs:`` section (0.7.4's named entries plus ``endpoint_url``, ``wait_seconds``,
``max_backoff`` and ``dedup_size``), turning SQS messages into publishes through
:meth:`server.ingest.Ingest.submit` (so stamping, the log, eviction, persistence and routing are
exactly those of an HTTP PUT), the at-least-once rule (a message is deleted only after its event
was accepted), the bounded MessageId dedup, and retrying with backoff through outages.

It knows of the daemon only its plugin context (the publish path and the payload limit).
aiobotocore is imported only when this plugin is installed (``sqs:`` configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from hub.topics import TopicError, parse_publish_path
from server.config import Config, Section
from server.context import PluginContext
from server.errors import BadRequest, ConfigError, PubSubError
from server.ingest import Ingest
from server.payload import parse_json_object
from server.tasks import cancel_and_wait

__all__ = [
    "Backoff",
    "BadMessage",
    "QueueConfig",
    "QueueConsumer",
    "SeenIds",
    "SqsPlugin",
    "SqsStats",
    "build",
    "decode_message",
    "parse_sqs_config",
]

logger = logging.getLogger(__name__)

# -- named limits -------------------------------------------------------------------------------
#: SQS's own bounds on long polling (``WaitTimeSeconds``); 20 s costs the fewest requests.
MAX_WAIT_SECONDS = 20
DEFAULT_WAIT_SECONDS = 20
#: With ``wait_seconds: 0`` (short polling), the pause after an empty answer.
SHORT_POLL_PAUSE = 1.0
#: SQS returns at most 10 messages per receive.
MAX_MESSAGES_PER_RECEIVE = 10
#: First retry delay after an error; doubles per failure up to ``max_backoff``.
INITIAL_BACKOFF = 0.5
#: Longest pause between retries during an outage (config ``max_backoff``).
DEFAULT_MAX_BACKOFF = 30.0
#: MessageIds remembered (``delete: false`` dedup, and redeliveries after a failed delete).
#: About 100 bytes each: 100,000 ids cost ~10 MB per queue at most.
DEFAULT_DEDUP_SIZE = 100_000
#: Connecting to the SQS endpoint gives up after this long (then backoff and retry).
CONNECT_TIMEOUT = 10.0
#: A long poll answers within ``wait_seconds``; a read slower than that by this margin is an outage.
READ_TIMEOUT_MARGIN = 15.0
#: botocore logs every request, signature and hook at DEBUG: far too much for ``--log-level debug``.
NOISY_LOGGERS = ("botocore", "aiobotocore", "urllib3")
#: Error codes meaning "this queue does not exist (yet)".
MISSING_QUEUE_CODES = frozenset({
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "NonExistentQueue",
})


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One entry of ``sqs:`` (its key is the entry's name)."""

    name: str
    #: queue name (resolved with GetQueueUrl) or a full queue URL
    queue: str
    #: AWS region; None = from the AWS configuration chain
    region: str | None = None
    #: delete each message once its event is accepted; False = leave it (dedup by MessageId)
    delete: bool = False
    #: access key id and secret; both None = the usual AWS credential chain
    key: str | None = None
    secret: str | None = None
    #: another SQS API (ElasticMQ, LocalStack, moto); None = AWS
    endpoint_url: str | None = None
    #: long-poll duration, 0..20 s (0 = short polling, not advised)
    wait_seconds: int = DEFAULT_WAIT_SECONDS
    #: longest pause between retries during an outage
    max_backoff: float = DEFAULT_MAX_BACKOFF
    #: MessageIds remembered for dedup
    dedup_size: int = DEFAULT_DEDUP_SIZE

    @property
    def queue_is_url(self) -> bool:
        return self.queue.startswith(("http://", "https://"))


def _parse_queue(sec: Section, name: str) -> QueueConfig:
    queue = sec.string("queue") or ""
    if not queue:
        sec.report("queue", "is required (the queue's name or URL)")
    key, secret = sec.string("key"), sec.string("secret")
    if (key is None) != (secret is None):
        sec.report("secret" if secret is None else "key",
                   "key and secret go together (or leave both out to use the AWS credential chain)")
    endpoint = sec.string("endpoint_url")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        sec.report("endpoint_url", f"expected an http:// or https:// URL, got {endpoint!r}")
    max_backoff = sec.duration("max_backoff", DEFAULT_MAX_BACKOFF)
    if max_backoff < INITIAL_BACKOFF:
        sec.report("max_backoff", f"must be at least {INITIAL_BACKOFF}s")
    q = QueueConfig(
        name=name,
        queue=queue,
        region=sec.string("region") or None,
        delete=sec.typed("delete", bool, False),
        key=key,
        secret=secret,
        endpoint_url=endpoint,
        wait_seconds=sec.integer("wait_seconds", DEFAULT_WAIT_SECONDS, minimum=0,
                                 maximum=MAX_WAIT_SECONDS),
        max_backoff=max_backoff,
        dedup_size=sec.integer("dedup_size", DEFAULT_DEDUP_SIZE, minimum=1),
    )
    sec.warn_unknown()
    return q


def parse_sqs_config(sqs: Section) -> tuple[QueueConfig, ...]:
    """The queues of an ``sqs:`` section; raises ConfigError naming the file and the key."""
    queues = []
    for name, entry in sqs.data.items():
        sqs.raw(name)  # mark it read
        queues.append(_parse_queue(Section(entry, sqs.file, sqs.key(str(name)), sqs.errors), str(name)))
    if not queues:
        sqs.report("", "names no queue")
    return tuple(queues)


# -- pure parts: message decoding, dedup, backoff -----------------------------------------------
class BadMessage(Exception):
    """A message that can never become an event (not JSON, not an object, bad path, too big)."""


def decode_message(body: object, max_payload: int) -> tuple[str, dict[str, Any]]:
    """The publish path and JSON object of an SQS message body; raises BadMessage.

    ``pubsub_path`` gives the topics (``/private/...`` allowed); without it the path is ``/``.
    """
    if not isinstance(body, str):
        raise BadMessage("message has no text body")
    raw = body.encode("utf-8", "surrogatepass")
    if max_payload and len(raw) > max_payload:
        raise BadMessage(f"body of {len(raw)} bytes exceeds max_payload_size ({max_payload} bytes)")
    try:
        obj = parse_json_object(raw)
    except BadRequest as e:
        raise BadMessage(e.reason) from None
    path = obj.get("pubsub_path", "/")
    if path is None:
        path = "/"
    if not isinstance(path, str):
        raise BadMessage(f"pubsub_path must be a string, not {type(path).__name__}")
    if not path.startswith("/"):
        path = "/" + path  # keep the leading / (0.7.4 lost it on restored events)
    try:
        parse_publish_path(path)
    except TopicError as e:
        raise BadMessage(f"bad pubsub_path: {e}") from None
    return path, obj


class SeenIds:
    """MessageIds already accepted, oldest forgotten first once ``capacity`` is reached."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, mid: object) -> bool:
        return mid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, mid: str) -> None:
        self._ids[mid] = None
        self._ids.move_to_end(mid)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class Backoff:
    """Exponential backoff with jitter: each delay is in [d/2, d], d doubling up to ``maximum``."""

    def __init__(self, initial: float = INITIAL_BACKOFF, maximum: float = DEFAULT_MAX_BACKOFF,
                 rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        d = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return d / 2 + self._rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.failures = 0


# -- the consumer -------------------------------------------------------------------------------
@dataclass(slots=True)
class SqsStats:
    """Counters of one queue consumer."""

    received: int = 0
    accepted: int = 0
    malformed: int = 0
    duplicates: int = 0
    deleted: int = 0
    #: messages whose event the server failed to accept (left in the queue for redelivery)
    failed: int = 0
    outages: int = 0

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol; label ``queue``)."""
        return {"sqs_received_total": self.received, "sqs_accepted_total": self.accepted,
                "sqs_malformed_total": self.malformed, "sqs_duplicates_total": self.duplicates,
                "sqs_deleted_total": self.deleted, "sqs_failed_total": self.failed,
                "sqs_outages_total": self.outages}


class QueueConsumer:
    """Long-polls one queue and publishes each message; runs until cancelled."""

    def __init__(self, cfg: QueueConfig, ingest: Ingest, session: Any, max_payload: int) -> None:
        self.cfg = cfg
        self.ingest = ingest
        self.session = session
        self.max_payload = max_payload
        self.stats = SqsStats()
        self.seen = SeenIds(cfg.dedup_size)
        self.backoff = Backoff(INITIAL_BACKOFF, cfg.max_backoff)
        self.source = f"sqs:{cfg.name}"
        #: why the consumer is failing ("missing", "error"), None while healthy
        self._down: str | None = None
        self._down_since = 0.0

    def __repr__(self) -> str:
        return f"<QueueConsumer {self.cfg.name} queue={self.cfg.queue!r} {self.stats}>"

    def health(self) -> str:
        """``ok``, or why the queue cannot be read now (``down: missing``...)."""
        return "ok" if self._down is None else f"down: {self._down}"

    def _client(self) -> Any:
        from aiobotocore.config import AioConfig

        cfg = self.cfg
        # one attempt per call: our loop owns retrying (botocore's own retries would hide outages)
        aio = AioConfig(connect_timeout=CONNECT_TIMEOUT,
                        read_timeout=cfg.wait_seconds + READ_TIMEOUT_MARGIN,
                        retries={"mode": "standard", "total_max_attempts": 1})
        return self.session.create_client("sqs", region_name=cfg.region, endpoint_url=cfg.endpoint_url,
                                          aws_access_key_id=cfg.key, aws_secret_access_key=cfg.secret,
                                          config=aio)

    async def run(self) -> None:
        """Consume until cancelled; every failure is retried after a backoff pause."""
        from botocore.exceptions import BotoCoreError, ClientError

        logger.info("sqs %s: consuming queue %r (delete=%s, wait %ds)", self.cfg.name, self.cfg.queue,
                    self.cfg.delete, self.cfg.wait_seconds)
        for _ in iter(int, 1):  # until cancelled
            try:
                # a fresh client (and connection pool) after each failure
                async with self._client() as client:
                    url = await self._queue_url(client)
                    for _ in iter(int, 1):
                        await self._poll(client, url)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in MISSING_QUEUE_CODES:
                    self._failing("missing", f"queue {self.cfg.queue!r} does not exist")
                else:
                    self._failing("error", str(e))
            except BotoCoreError as e:
                self._failing("error", str(e))
            except Exception:  # task boundary: a bug must not end the consumer
                logger.exception("sqs %s: unexpected error", self.cfg.name)
                self._failing("error", "unexpected error (logged above)")
            await asyncio.sleep(self.backoff.next_delay())

    async def _queue_url(self, client: Any) -> str:
        if self.cfg.queue_is_url:
            return self.cfg.queue
        resp = await client.get_queue_url(QueueName=self.cfg.queue)
        return str(resp["QueueUrl"])

    def _failing(self, kind: str, why: str) -> None:
        """One log line per outage (and one more if its cause changes), then quiet retries."""
        if self._down is None:
            self.stats.outages += 1
            self._down_since = time.monotonic()
        elif self._down == kind:
            logger.debug("sqs %s: still failing: %s", self.cfg.name, why)
            return
        self._down = kind
        if kind == "missing":
            logger.error("sqs %s: %s (create it, or fix sqs.%s.queue); retrying with backoff up to %gs",
                         self.cfg.name, why, self.cfg.name, self.cfg.max_backoff)
        else:
            logger.warning("sqs %s: cannot reach queue %r: %s; retrying with backoff up to %gs",
                           self.cfg.name, self.cfg.queue, why, self.cfg.max_backoff)

    def _healthy(self) -> None:
        if self._down is not None:
            logger.info("sqs %s: queue %r reachable again after %.1fs", self.cfg.name, self.cfg.queue,
                        time.monotonic() - self._down_since)
            self._down = None
        self.backoff.reset()

    async def _poll(self, client: Any, url: str) -> None:
        resp = await client.receive_message(QueueUrl=url, MaxNumberOfMessages=MAX_MESSAGES_PER_RECEIVE,
                                            WaitTimeSeconds=self.cfg.wait_seconds)
        self._healthy()
        messages = resp.get("Messages", ())
        for msg in messages:
            await self._handle(client, url, msg)
        if not messages and self.cfg.wait_seconds == 0:
            await asyncio.sleep(SHORT_POLL_PAUSE)  # short polling: do not hammer an empty queue

    async def _handle(self, client: Any, url: str, msg: dict[str, Any]) -> None:
        """Publish one message; delete it (when configured) only once its event is accepted."""
        self.stats.received += 1
        mid = str(msg.get("MessageId", "?"))
        if mid in self.seen:
            self.stats.duplicates += 1
            logger.debug("sqs %s: message %s already handled: skipped", self.cfg.name, mid)
            if self.cfg.delete:  # accepted earlier but its delete failed
                await self._delete(client, url, msg, mid)
            return
        try:
            path, body = decode_message(msg.get("Body"), self.max_payload)
        except BadMessage as e:
            self.stats.malformed += 1
            logger.warning("sqs %s: message %s rejected: %s", self.cfg.name, mid, e)
            self.seen.add(mid)
            if self.cfg.delete:
                await self._delete(client, url, msg, mid)
            return
        try:
            # a cluster log keeps the message once whichever node (and however often) receives it
            event = await self.ingest.submit(path, body, source=self.source, dedup=f"sqs:{mid}")
        except PubSubError as e:  # the log refused it (storage failure): leave it for redelivery
            self.stats.failed += 1
            logger.warning("sqs %s: message %s not accepted (%s); it stays in the queue",
                           self.cfg.name, mid, e.reason)
            return
        except Exception:  # message boundary: a bug must not cost the message
            self.stats.failed += 1
            logger.exception("sqs %s: message %s not accepted; it stays in the queue", self.cfg.name, mid)
            return
        self.stats.accepted += 1
        self.seen.add(mid)
        logger.debug("sqs %s: message %s for %r accepted as %s", self.cfg.name, mid, path,
                     event or "a duplicate: the cluster log has it already")
        if self.cfg.delete:
            await self._delete(client, url, msg, mid)

    async def _delete(self, client: Any, url: str, msg: dict[str, Any], mid: str) -> None:
        handle = msg.get("ReceiptHandle")
        if not handle:
            logger.warning("sqs %s: message %s has no receipt handle: cannot delete it", self.cfg.name, mid)
            return
        await client.delete_message(QueueUrl=url, ReceiptHandle=handle)
        self.stats.deleted += 1


# -- the plugin ---------------------------------------------------------------------------------
class SqsPlugin:
    """Owns the consumer tasks: started and stopped through the app's cleanup_ctx."""

    def __init__(self, queues: Iterable[QueueConfig]) -> None:
        self.queues = tuple(queues)
        self.consumers: list[QueueConsumer] = []

    @contextlib.asynccontextmanager
    async def lifecycle(self, ctx: PluginContext) -> AsyncIterator[None]:
        from aiobotocore.session import get_session

        session = get_session()
        loop = asyncio.get_running_loop()
        self.consumers = [QueueConsumer(q, ctx.ingest, session, ctx.max_payload_size)
                          for q in self.queues]
        tasks = [loop.create_task(c.run(), name=f"pypubsub-sqs-{c.cfg.name}") for c in self.consumers]
        for c in self.consumers:
            ctx.metrics.register(c.stats, queue=c.cfg.name)
        ctx.report("sqs", lambda: {c.cfg.name: {"queue": c.cfg.queue, "state": c.health(),
                                                "received": c.stats.received}
                                   for c in self.consumers})
        try:
            yield
        finally:
            for c in self.consumers:
                ctx.metrics.unregister(c.stats)
            await cancel_and_wait(*tasks)
            for c in self.consumers:
                logger.info("sqs %s: stopped (%s)", c.cfg.name, c.stats)


def build(config: Config) -> SqsPlugin:
    """SQS ingestion for ``config.sqs``; raises ConfigError on bad config.

    Start it with :meth:`SqsPlugin.lifecycle` (the composition root adds it to the app).
    """
    if config.sqs is None:
        raise ConfigError(config.file, "sqs", "not configured")
    queues = parse_sqs_config(config.sqs)
    try:
        from aiobotocore.session import get_session
    except ImportError as e:
        raise ConfigError(config.file, "sqs", f"needs aiobotocore (pip install aiobotocore): {e}") from None
    if any(q.region is None for q in queues) and get_session().get_config_variable("region") is None:
        q = next(q for q in queues if q.region is None)
        raise ConfigError(config.file, f"sqs.{q.name}.region",
                          "is required (no region in the AWS configuration or AWS_DEFAULT_REGION either)")
    for name in NOISY_LOGGERS:
        quiet = logging.getLogger(name)
        if quiet.level == logging.NOTSET:  # left alone when the operator set a level
            quiet.setLevel(logging.INFO)
    return SqsPlugin(queues)
