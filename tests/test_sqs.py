"""SQS ingestion against a real SQS API (moto server) and the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.event import Event
from hub.hub import Hub
from plugins.sqs import QueueConsumer, parse_sqs_config
from server.config import Section
from server.errors import ServiceUnavailable
from server.eventlog import Appended, MemoryLog
from server.ingest import Ingest
from tests.sqs_fixture import (
    KEY,
    SECRET,
    MotoServer,
    queue_depth,
    queue_entry,
    queue_name,
    send,
    wait_depth,
)
from tests.support import (
    Daemon,
    auth_header,
    await_until,
    base_config,
    free_port,
    publish,
    subscribe,
    wait_subscribers,
)

EVENT_TIMEOUT = 15.0  # long polls of 1 s plus backoff of at most 1 s: plenty


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


def start_daemon(factory: Callable[..., Daemon], entries: dict[str, dict[str, Any]],
                 **kw: Any) -> Daemon:
    port = free_port()
    cfg = base_config(port)
    cfg["sqs"] = entries
    return factory(config=cfg, port=port, **kw)


async def events(sub: Any, n: int) -> list[dict[str, Any]]:
    return [await sub.next(EVENT_TIMEOUT) for _ in range(n)]


async def test_message_reaches_subscriber_and_is_deleted(
        moto: MotoServer, daemon_factory: Callable[..., Daemon]) -> None:
    """Two queues, one consumer each."""
    sqs = moto.client()
    name, name2 = queue_name(), queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    url2 = sqs.create_queue(QueueName=name2)["QueueUrl"]
    d = start_daemon(daemon_factory, {"main": queue_entry(moto, name, delete=True),
                                      "second": queue_entry(moto, name2, delete=True)})
    async with subscribe(d.url, "/fruits") as fruits, subscribe(d.url, "/") as everything:
        await wait_subscribers(d.url, 2)
        send(sqs, url, {"pubsub_path": "/fruits/apples", "x": 1})
        send(sqs, url2, {"y": 2})  # no pubsub_path: published at /
        ev = await fruits.next(EVENT_TIMEOUT)
        assert ev["x"] == 1
        assert ev["pubsub_topics"] == ["fruits", "apples"]
        assert ev["pubsub_path"] == "/fruits/apples"
        assert ev["pubsub_cursor"] and ev["pubsub_timestamp"]
        got = await events(everything, 2)
        by_path = {e["pubsub_path"]: e for e in got}
        assert by_path["/"]["y"] == 2 and by_path["/"]["pubsub_topics"] == []
        assert by_path["/fruits/apples"]["x"] == 1
        await fruits.expect_none(0.3)
    wait_depth(sqs, url, 0)
    wait_depth(sqs, url2, 0)


async def test_private_message_and_credential_chain(
        moto: MotoServer, daemon_factory: Callable[..., Daemon]) -> None:
    """Credentials from the environment; asyncio debug on (moto's duplicate header fixed)."""
    sqs = moto.client()
    name = queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    entry = queue_entry(moto, url, delete=True)  # a queue URL: no GetQueueUrl
    del entry["key"], entry["secret"]
    acl = {"alice": {"password": "alice-pw", "acl": {"secrets": ["secret"]}}}
    d = start_daemon(daemon_factory, {"main": entry}, acl=acl, env={
        "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "PYTHONASYNCIODEBUG": "1"})
    async with subscribe(d.url, "/") as anon, \
            subscribe(d.url, "/", headers=auth_header("alice", "alice-pw")) as alice:
        await wait_subscribers(d.url, 2)
        send(sqs, url, {"pubsub_path": "/private/secret/x", "hidden": True})
        ev = await alice.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/private/secret/x"
        assert ev["pubsub_topics"] == ["secret", "x"] and ev["hidden"] is True
        send(sqs, url, {"pubsub_path": "/public/y"})
        ev = await anon.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/public/y"  # the private one went to no anonymous subscriber
        assert (await alice.next(EVENT_TIMEOUT))["pubsub_path"] == "/public/y"
    assert "for '/private/secret/x' accepted" in d.log()
    wait_depth(sqs, url, 0)
    assert "Duplicate 'Server' header" not in d.log()


async def test_delete_off_keeps_messages_and_dedups(
        moto: MotoServer, daemon_factory: Callable[..., Daemon]) -> None:
    sqs = moto.client()
    name = queue_name()
    # redelivered after 1 s: the consumer sees its own messages again and must skip them
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    d = start_daemon(daemon_factory, {"keep": queue_entry(moto, name, delete=False)})
    async with subscribe(d.url, "/") as sub:
        await wait_subscribers(d.url, 1)
        mid = send(sqs, url, {"pubsub_path": "/kept", "n": 1})
        bad = send(sqs, url, "not json")
        ev = await sub.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/kept"
        d.wait_log(f"message {mid} already handled: skipped", EVENT_TIMEOUT)
        d.wait_log(f"message {bad} already handled: skipped", EVENT_TIMEOUT)
        status, _ = await publish(d.url, "/marker", {"m": 1})
        assert status == 202
        ev = await sub.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/marker", f"duplicate delivered: {ev}"
    assert d.log().count(f"message {bad} rejected") == 1
    assert queue_depth(sqs, url) == 2  # nothing deleted


async def test_malformed_messages_are_logged_deleted_and_skipped(
        moto: MotoServer, daemon_factory: Callable[..., Daemon]) -> None:
    sqs = moto.client()
    name = queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    d = start_daemon(daemon_factory, {"main": queue_entry(moto, name, delete=True)})
    async with subscribe(d.url, "/") as sub:
        await wait_subscribers(d.url, 1)
        bad = [send(sqs, url, body) for body in
               ("not json", "[1, 2]", '{"pubsub_path": 5}', '"just text"', "\u00e9\u00e9")]
        send(sqs, url, {"pubsub_path": "/good", "ok": True})
        ev = await sub.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/good"
        await sub.expect_none(0.3)
    for mid in bad:
        d.wait_log(f"message {mid} rejected")
    wait_depth(sqs, url, 0)


async def test_queue_created_late(moto: MotoServer, daemon_factory: Callable[..., Daemon]) -> None:
    sqs = moto.client()
    name = queue_name("late")
    d = start_daemon(daemon_factory, {"late": queue_entry(moto, name, delete=True)})
    d.wait_log(f"queue '{name}' does not exist (create it", EVENT_TIMEOUT)
    d.wait_log("still failing", EVENT_TIMEOUT)  # it kept retrying, quietly
    async with subscribe(d.url, "/") as sub:
        await wait_subscribers(d.url, 1)
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        send(sqs, url, {"pubsub_path": "/late"})
        ev = await sub.next(EVENT_TIMEOUT)
        assert ev["pubsub_path"] == "/late"
    d.wait_log(f"sqs late: queue '{name}' reachable again")
    assert d.log().count("does not exist (create it") == 1
    wait_depth(sqs, url, 0)


async def test_server_restarted_mid_run(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    moto = MotoServer(tmp_path / "moto.log").start()
    try:
        sqs = moto.client()
        name = queue_name("restart")
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        d = start_daemon(daemon_factory, {"main": queue_entry(moto, name, delete=True)})
        async with subscribe(d.url, "/") as sub:
            await wait_subscribers(d.url, 1)
            send(sqs, url, {"pubsub_path": "/before"})
            assert (await sub.next(EVENT_TIMEOUT))["pubsub_path"] == "/before"

            await asyncio.to_thread(moto.stop)
            d.wait_log("sqs main: cannot reach queue", EVENT_TIMEOUT)
            d.wait_log("still failing", EVENT_TIMEOUT)
            await asyncio.to_thread(moto.start)  # same port; a fresh moto has no queues
            sqs = moto.client()
            url = sqs.create_queue(QueueName=name)["QueueUrl"]
            sent = {f"/after/{i}" for i in range(5)}
            for path in sorted(sent):
                send(sqs, url, {"pubsub_path": path})
            got = {e["pubsub_path"] for e in await events(sub, len(sent))}
            assert got == sent
            await sub.expect_none(0.3)
        d.wait_log(f"sqs main: queue '{name}' reachable again")
        log = d.log()
        assert log.count("sqs main: cannot reach queue") == 1, log
        wait_depth(sqs, url, 0)
        assert d.stop() == 0
        assert "sqs main: stopped" in d.log()
    finally:
        await asyncio.to_thread(moto.stop)


def test_bad_config_exits_naming_the_key(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    cfg = base_config(port)
    cfg["sqs"] = {"main": {"queue": "q", "region": "us-east-1", "wait_seconds": 30}}
    d = daemon_factory(config=cfg, port=port, start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(20) == 2
    assert "sqs.main.wait_seconds: must be at most 20" in d.log()


class FailingLog(MemoryLog):
    """A durable log whose commits fail while ``broken`` (a disk that is full, then freed)."""

    synchronous = False

    def __init__(self) -> None:
        super().__init__(100)
        self.broken = True

    def append(self, event: Event, *, dedup: str | None = None  # type: ignore[override]  # noqa: ARG002
               ) -> Awaitable[Appended | None]:
        return self._commit(event)

    async def _commit(self, event: Event) -> Appended:
        if self.broken:
            raise ServiceUnavailable("storage full")
        return super().append(event)


async def test_message_not_accepted_is_not_deleted(moto: MotoServer) -> None:
    """At-least-once: a message whose event the log refuses stays in the queue and comes back."""
    from aiobotocore.session import get_session

    sqs = moto.client()
    name = queue_name("refused")
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    log = FailingLog()
    hub = Hub()
    cfg = parse_sqs_config(Section({"main": queue_entry(moto, name, delete=True)}, "t.yaml", "sqs"))[0]
    consumer = QueueConsumer(cfg, Ingest(hub, log), get_session(), 102400)
    task = asyncio.get_running_loop().create_task(consumer.run())
    try:
        send(sqs, url, {"pubsub_path": "/refused"})
        await await_until(lambda: consumer.stats.failed >= 1, EVENT_TIMEOUT, "a refused append")
        assert consumer.stats.deleted == 0
        assert await asyncio.to_thread(queue_depth, sqs, url) == 1
        log.broken = False  # storage back: the redelivered message is accepted, then deleted
        await await_until(lambda: consumer.stats.deleted == 1, EVENT_TIMEOUT, "the delete")
        assert consumer.stats.accepted == 1 and len(log) == 1
        assert await asyncio.to_thread(queue_depth, sqs, url) == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
