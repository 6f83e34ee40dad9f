"""The admin listener against the real daemon: /metrics, /healthz, /readyz, /status, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    HOST,
    Daemon,
    DaemonFactory,
    auth_header,
    base_config,
    free_port,
    publish,
    put,
    subscribe,
    wait_subscribers,
)

ACL = {"alice": {"password": "wonderland", "acl": {"s": ["secret"]}}}


def admin_daemon(factory: DaemonFactory, acl: dict[str, Any] | None = None, **server: Any) -> Daemon:
    port = free_port()
    cfg = base_config(port, admin={"port": free_port(), "bind": HOST}, **server)
    return factory(config=cfg, acl=acl, port=port)


def admin_url(d: Daemon) -> str:
    return f"http://{HOST}:{d.config['server']['admin']['port']}"


async def get(url: str, **kw: Any) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


async def metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, labels)."""
    status, text, headers = await get(admin_url(d) + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def sample(d: Daemon, name: str, **labels: str) -> float:
    return (await metrics(d)).get((name, tuple(sorted(labels.items()))), -1.0)


async def wait_sample(d: Daemon, name: str, value: float, **labels: str) -> None:
    end = asyncio.get_running_loop().time() + 10
    while (v := await sample(d, name, **labels)) != value:
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"{name}{labels} is {v}, expected {value}")
        await asyncio.sleep(0.02)


async def test_admin_listener_is_off_unless_configured(daemon: Daemon) -> None:
    assert "admin listener" not in daemon.log()
    # on the main port /metrics is what it always was: a subscription to the topic "metrics"
    async with subscribe(daemon.url, "/metrics"):
        await wait_subscribers(daemon.url, 1)


async def test_metrics_read_the_counters_at_scrape_time(daemon_factory: DaemonFactory) -> None:
    d = admin_daemon(daemon_factory, ACL, backlog={"size": 10})
    assert "admin listener (/metrics /healthz /readyz /status /) on http://127.0.0.1:" in d.log()
    m = await metrics(d)
    assert m[("pypubsub_events_published_total", ())] == 0
    assert m[("pypubsub_subscribers", (("transport", "chunked"),))] == 0
    async with subscribe(d.url, "/t") as sub:
        await wait_subscribers(d.url, 1)
        await wait_sample(d, "pypubsub_subscribers", 1, transport="chunked")
        await put(d, "/t", {"n": 1})
        await sub.next()
        await wait_sample(d, "pypubsub_events_published_total", 1)
        await wait_sample(d, "pypubsub_deliveries_total", 1)
    await wait_subscribers(d.url, 0)
    await wait_sample(d, "pypubsub_disconnects_total", 1, reason="client")
    await wait_sample(d, "pypubsub_streams_opened_total", 1)
    # refused publishes by status code
    assert (await publish(d.url, "/t", data=b"{nope"))[0] == 400
    assert (await publish(d.url, "/t", data=b"[1]"))[0] == 400
    await wait_sample(d, "pypubsub_refused_total", 2, code="400")
    # replay: an unknown cursor continues live, and is counted
    async with subscribe(d.url, "/t", headers={"X-Fetch-Since-Cursor": "nope"}) as sub:
        assert sub.resp.headers["X-Fetch-Since-Cursor-Found"] == "false"
    await wait_sample(d, "pypubsub_replay_requests_total", 1)
    await wait_sample(d, "pypubsub_replay_unknown_cursors_total", 1)
    # wrong credentials: an anonymous stream, and an auth failure
    async with subscribe(d.url, "/t", headers=auth_header("alice", "wrong")):
        await wait_sample(d, "pypubsub_auth_failures_total", 1)
    m = await metrics(d)
    assert m[("pypubsub_backlog_events", ())] == 1
    assert m[("pypubsub_log_appends_total", ())] == 1
    assert m[("pypubsub_publish_latency_seconds_count", ())] == 1
    assert m[("pypubsub_publish_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    assert m[("pypubsub_fastlane_served_total", ())] >= 2
    assert m[("pypubsub_fastlane_handed_over_total", ())] >= 2
    assert m[("pypubsub_presence_events_total", ())] >= 2
    # no per-topic label anywhere (unbounded cardinality)
    assert not [k for k in m if any(lb[0] in ("topic", "topics", "path") for lb in k[1])]


async def test_sighup_reloads_the_acl_and_is_counted(daemon_factory: DaemonFactory) -> None:
    d = admin_daemon(daemon_factory, ACL)
    d.signal(signal.SIGHUP)
    d.wait_log("ACL reloaded from")
    await wait_sample(d, "pypubsub_acl_reloads_total", 1)
    d.acl_path.write_text("alice: [unclosed\n")  # refused: the previous ACL is kept
    d.signal(signal.SIGUSR2)
    d.wait_log("ACL reload failed")
    await wait_sample(d, "pypubsub_acl_reload_failures_total", 1)
    for i in (1, 2):  # a verified password is remembered: the second is a cache hit
        async with subscribe(d.url, "/t", headers=auth_header("alice", "wonderland")):
            await wait_sample(d, "pypubsub_streams_opened_total", i)
    await wait_sample(d, "pypubsub_auth_cache_hits_total", 1, cache="acl")
    status = json.loads((await get(admin_url(d) + "/status"))[1])
    assert status["plugins"]["acl"]["users"] == 1
    assert status["plugins"]["acl"]["reloads"] == 1


async def test_health_ready_status_and_nothing_is_a_topic(daemon_factory: DaemonFactory) -> None:
    d = admin_daemon(daemon_factory, backlog={"size": 5})
    url = admin_url(d)
    assert (await get(url + "/healthz"))[:2] == (200, "ok\n")
    assert (await get(url + "/readyz"))[:2] == (200, "ready\n")
    assert (await get(url + "/some/topic"))[0] == 404
    async with subscribe(d.url, "/a/b") as s1, subscribe(d.url, "/a/b"), \
            subscribe(d.url, "/c", headers={"User-Agent": "svnwcsub/1"}):
        await wait_subscribers(d.url, 3)
        await put(d, "/a/b", {"x": 1})
        await s1.next()
        status, text, headers = await get(url + "/status")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        st = json.loads(text)
    assert st["version"] and st["uptime_seconds"] >= 0 and st["ready"] is True
    assert st["subscribers"] == 3
    subs = {(s["topics"], s["transport"]): s["count"] for s in st["subscriptions"]}
    assert subs == {("/a/b", "chunked"): 2, ("/c", "chunked-nul"): 1}
    assert st["backlog"]["events"] == 1 and st["backlog"]["capacity"] == 5
    assert st["backlog"]["oldest"] == st["backlog"]["newest"] > 0
    assert st["plugins"]["backlog"]["backend"] == "MemoryLog"
    assert "presence" in st["plugins"]
    assert st["metrics"]["events_published_total"] == 1


async def test_readyz_is_503_during_the_drain_and_received_publishes_are_answered(
        daemon_factory: DaemonFactory) -> None:
    d = admin_daemon(daemon_factory, shutdown_grace=10)
    url = admin_url(d)
    # a publish whose upload is under way when SIGTERM comes (aiohttp owns chunked uploads)
    reader, writer = await asyncio.open_connection(HOST, d.port)
    try:
        writer.write(b"PUT /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a")
        await writer.drain()
        await wait_sample(d, "pypubsub_publishes_in_progress", 1)
        d.signal(signal.SIGTERM)

        async def ready_status() -> int:
            return (await get(url + "/readyz"))[0]

        end = asyncio.get_running_loop().time() + 10
        while (s := await ready_status()) != 503:
            assert s == 200 and asyncio.get_running_loop().time() < end
            await asyncio.sleep(0.01)
        assert "not ready: draining" in (await get(url + "/readyz"))[1]
        # the listener no longer accepts
        with pytest.raises(OSError):
            _, w = await asyncio.open_connection(HOST, d.port)
            w.close()
            await w.wait_closed()
        writer.write(b"\r\n5\r\n\":1}\n\r\n0\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 202"), head
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert d.proc is not None and d.proc.wait(15) == 0


async def test_sigusr1_logs_a_status_line_and_no_signal_kills(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    async with subscribe(d.url, "/t"):
        await wait_subscribers(d.url, 1)
        d.signal(signal.SIGUSR1)
        d.wait_log("status: 1 subscriber(s) (chunked 1)")
    lines = [ln for ln in d.log().splitlines() if "status: " in ln]
    assert len(lines) == 1
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                signal.SIGIO, signal.SIGPWR, signal.SIGXCPU, signal.SIGRTMIN, signal.SIGRTMAX):
        d.signal(sig)
    d.wait_log("signal SIGRTMAX received: ignored")
    assert d.proc is not None and d.proc.poll() is None
    await put(d, "/t", {"still": "serving"})
    d.signal(signal.SIGQUIT)  # a stop signal: the clean shutdown
    assert d.proc.wait(10) == 0
    assert "SIGQUIT: draining" in d.log()
    assert "stopped" in d.log()


def test_operations_page_documents_every_metric() -> None:
    from server.metrics import METRICS
    from tests.support import ROOT

    page = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in METRICS if f"`pypubsub_{name}`" not in page]
    assert missing == []


async def test_ldap_binds_and_cache_hits_are_exposed(daemon_factory: DaemonFactory) -> None:
    from tests.ldap_fixture import Slapd, ldap_config

    slapd = Slapd().start()
    try:
        port = free_port()
        cfg = base_config(port, admin={"port": free_port(), "bind": HOST})
        cfg["clients"]["ldap"] = ldap_config(slapd)
        d = daemon_factory(config=cfg, acl={}, port=port)
        for i in (1, 2):  # the second is answered from the cache
            async with subscribe(d.url, "/t", headers=auth_header("alice", "alice-pw")):
                await wait_sample(d, "pypubsub_streams_opened_total", i)
        async with subscribe(d.url, "/t", headers=auth_header("alice", "wrong")):
            await wait_sample(d, "pypubsub_streams_opened_total", 3)
        m = await metrics(d)
        assert m[("pypubsub_ldap_binds_total", ())] == 2
        assert m[("pypubsub_auth_cache_hits_total", (("cache", "ldap"),))] == 1
        assert m[("pypubsub_auth_cache_misses_total", (("cache", "ldap"),))] == 2
        assert m[("pypubsub_auth_failures_total", ())] == 1
        assert m[("pypubsub_ldap_failures_total", ())] == 0
        slapd.stop()  # LDAP down: a look-up fails (closed), and is counted
        async with subscribe(d.url, "/t", headers=auth_header("bob", "bob-pw")):
            await wait_sample(d, "pypubsub_ldap_failures_total", 1)
        st = json.loads((await get(admin_url(d) + "/status"))[1])
        assert st["plugins"]["ldap"]["uri"] == slapd.uri
    finally:
        slapd.close()


async def test_sqs_counters_are_exposed_per_queue(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    from tests.sqs_fixture import MotoServer, queue_entry, queue_name, send, wait_depth

    moto = MotoServer(tmp_path / "moto.log").start()
    try:
        sqs = moto.client()
        name = queue_name()
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        port = free_port()
        cfg = base_config(port, admin={"port": free_port(), "bind": HOST})
        cfg["sqs"] = {"main": queue_entry(moto, name, delete=True)}
        d = daemon_factory(config=cfg, port=port)
        send(sqs, url, "not json")
        send(sqs, url, {"pubsub_path": "/good"})
        await wait_sample(d, "pypubsub_sqs_accepted_total", 1, queue="main")
        wait_depth(sqs, url, 0)
        await wait_sample(d, "pypubsub_sqs_deleted_total", 2, queue="main")
        m = await metrics(d)
        assert m[("pypubsub_sqs_received_total", (("queue", "main"),))] == 2
        assert m[("pypubsub_sqs_malformed_total", (("queue", "main"),))] == 1
        assert m[("pypubsub_events_published_total", ())] == 1
        st = json.loads((await get(admin_url(d) + "/status"))[1])
        assert st["plugins"]["sqs"]["main"]["state"] == "ok"
    finally:
        moto.stop()


async def test_cluster_node_is_not_ready_while_redis_is_down(daemon_factory: DaemonFactory,
                                                             tmp_path: Path) -> None:
    from tests.redis_fixture import RedisServer

    redis = RedisServer(tmp_path / "redis").start()
    try:
        port = free_port()
        cfg = base_config(port, admin={"port": free_port(), "bind": HOST},
                          backlog={"size": 100, "storage": redis.url, "stream": "ops-test"})
        d = daemon_factory(config=cfg, port=port)
        url = admin_url(d)
        await put(d, "/t", {"n": 1})
        await wait_sample(d, "pypubsub_cluster_entries_read_total", 1)
        assert (await get(url + "/readyz"))[0] == 200
        assert await sample(d, "pypubsub_cluster_redis_up") == 1
        assert await sample(d, "pypubsub_cluster_read_lag_seconds") == 0  # it has read everything
        redis.kill()
        assert (await publish(d.url, "/t", {"n": 2}))[0] == 503  # the outage is noticed
        await wait_sample(d, "pypubsub_cluster_redis_up", 0)
        status, text, _ = await get(url + "/readyz")
        assert status == 503 and "Redis unreachable" in text
        assert await sample(d, "pypubsub_cluster_outages_total") == 1
    finally:
        redis.stop()
