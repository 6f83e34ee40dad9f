"""clients/python/pypubsub_client.py: its pure parts, then its asyncio API against the real daemon.

The cross-client behaviour (CLI, resume across a restart, auth) is in test_client_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.relay import Relay
from tests.support import ROOT, Daemon, await_until, base_config, free_port, publish, wait_subscribers

CLIENT_PATH = ROOT / "clients" / "python" / "pypubsub_client.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pypubsub_client", CLIENT_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pypubsub_client"] = mod
    spec.loader.exec_module(mod)
    return mod


pc = _load()



def fast(**kw: Any) -> dict[str, Any]:
    """Listener options for tests: short backoff so reconnects take milliseconds."""
    opts: dict[str, Any] = {"backoff": pc.Backoff(base=0.05, cap=0.2), "timeout": 5.0,
                            "connect_timeout": 2.0}
    opts.update(kw)
    return opts


# -- pure parts ---------------------------------------------------------------------------------
def test_linebuffer_merged_and_split() -> None:
    lb = pc.LineBuffer(100)
    assert lb.feed(b'{"a":1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert lb.feed(b":3") == []
    assert lb.feed(b"}\n") == [b'{"c":3}']
    assert lb.pending == 0


def test_linebuffer_every_byte_separately() -> None:
    lb = pc.LineBuffer(100)
    data = b'{"a":1}\n{"bb":22}\n'
    out = [line for i in range(len(data)) for line in lb.feed(data[i:i + 1])]
    assert out == [b'{"a":1}', b'{"bb":22}']


def test_linebuffer_skips_long_lines_without_holding_them() -> None:
    lb = pc.LineBuffer(10)
    assert lb.feed(b"short\n" + b"x" * 8) == [b"short"]
    assert lb.feed(b"y" * 8) == []  # over the limit: dropped as it arrives
    assert lb.pending == 0
    assert lb.feed(b"zzz\nok\n") == [b"ok"]
    assert lb.skipped == 1
    assert lb.feed(b"x" * 11 + b"\nfine\n") == [b"fine"]
    assert lb.skipped == 2


def test_chunked_decoder_any_cut() -> None:
    records = [b'{"a":1}\n', b'{"stillalive":1.5}\n', b"x" * 300 + b"\n"]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(r), r) for r in records) + b"0\r\n\r\n"
    for step in (1, 2, 3, 7, 64, len(wire)):
        d = pc.ChunkedDecoder()
        out = b"".join(d.feed(wire[i:i + step]) for i in range(0, len(wire), step))
        assert out == b"".join(records), step
        assert d.done


def test_chunked_decoder_rejects_garbage() -> None:
    with pytest.raises(pc.ProtocolError):
        pc.ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(pc.ProtocolError):
        pc.ChunkedDecoder().feed(b"2\r\nabXY\r\n")


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = pc.Backoff(base=1.0, cap=8.0)
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert delays[0] <= 1.0 and delays[1] <= 2.0
    assert len(set(delays)) > 1  # jittered
    b.reset()
    assert b.next_delay() <= 1.0


def test_parse_record_handles_nul_framing_and_junk() -> None:
    assert pc.parse_record(b'\0{"a":1}') == {"a": 1}
    assert pc.parse_record(b"") is None
    assert pc.parse_record(b"\0") is None
    assert pc.parse_record(b"[1]") is None
    assert pc.parse_record(b"{nope") is None


# -- against the real daemon --------------------------------------------------------------------
TOO_MANY = "/a" * 65  # more topic segments than the daemon accepts: 400


def start(factory: Callable[..., Daemon], **server: Any) -> Daemon:
    """A daemon pinging every 0.25 s (so silence is quick to notice)."""
    port = free_port()
    return factory(config=base_config(port, ping_interval=0.25, **server), port=port)



@contextlib.asynccontextmanager
async def collecting(url: str, **kw: Any) -> AsyncIterator[tuple[list[dict[str, Any]], Any]]:
    """Run a Listener in a task, collecting what it yields; close it cleanly at the end."""
    got: list[dict[str, Any]] = []
    listener = pc.listen(url, **kw)

    async def run() -> None:
        async for ev in listener:
            got.append(ev)

    task = asyncio.create_task(run())
    try:
        yield got, listener
    finally:
        await listener.close()
        await asyncio.wait_for(task, 5)


def _n(got: list[dict[str, Any]]) -> list[int]:
    return [e["n"] for e in got if "n" in e]


async def test_listen_basic_and_pings_hidden(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with collecting(d.url + "/fruits", **fast()) as (got, listener):
        await wait_subscribers(d.url, 1)
        for i in range(3):
            assert (await publish(d.url, "/fruits/apples", {"n": i}))[0] == 202
        await await_until(lambda: len(got) >= 3, what="3 events")
        # pings flow every 0.25 s; none is shown
        await await_until(lambda: listener.connections == 1)
    assert _n(got) == [0, 1, 2]
    assert all("stillalive" not in e for e in got)
    assert got[-1]["pubsub_cursor"] == listener.cursor


async def test_pings_shown_when_asked(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with collecting(d.url + "/x", pings=True, **fast()) as (got, _):
        await await_until(lambda: any("stillalive" in e for e in got), what="a ping")


@pytest.mark.parametrize("mode", ["merge", "split", "straddle"])
async def test_merged_and_split_reads(daemon_factory: Callable[..., Daemon], mode: str) -> None:
    d = start(daemon_factory)
    async with Relay(d.port, mode) as relay, collecting(relay.url + "/t", **fast()) as (got, _):
        await wait_subscribers(d.url, 1)
        for i in range(6):
            assert (await publish(d.url, "/t", {"n": i, "pad": "é" * i * 10}))[0] == 202
        await await_until(lambda: len(got) >= 6, what="6 events")
    assert _n(got) == list(range(6))
    assert got[5]["pad"] == "é" * 50
    if mode == "merge":
        assert relay.stats.merged_writes >= 1
    else:
        assert relay.stats.split_writes >= 1


async def test_silence_triggers_reconnect(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with Relay(d.port) as relay, collecting(relay.url + "/t", **fast(timeout=1.0)) as (got, lis):
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/t", {"n": 1})
        await await_until(lambda: len(got) == 1)
        relay.stall()  # the path goes dead; the TCP connection stays open
        await await_until(lambda: lis.connections == 2, timeout=8, what="a reconnect after silence")
        await wait_subscribers(d.url, 1)  # the stalled stream may linger server-side; wait it out
        await await_until(lambda: relay.stats.stalled_bytes > 0)
        await publish(d.url, "/t", {"n": 2})
        await await_until(lambda: len(got) == 2, what="an event on the new connection")
    assert _n(got) == [1, 2]


async def test_reconnects_after_daemon_restart(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with collecting(d.url + "/t", **fast()) as (got, lis):
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/t", {"n": 1})
        await await_until(lambda: len(got) == 1)
        await asyncio.to_thread(d.restart)
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/t", {"n": 2})
        await await_until(lambda: len(got) == 2, what="an event after the restart")
        assert lis.connections == 2
    assert _n(got) == [1, 2]


async def test_long_line_is_skipped_and_stream_goes_on(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with collecting(d.url + "/t", max_line=2000, **fast()) as (got, lis):
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/t", {"n": 1, "big": "x" * 5000})
        await publish(d.url, "/t", {"n": 2})
        await await_until(lambda: len(got) == 1, what="the event after the long one")
        assert lis.connections == 1  # no reconnect loop
    assert _n(got) == [2]
    assert lis.skipped == 1


async def test_cancellation_closes_the_connection(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)

    async def consume() -> None:
        async for _ in pc.listen(d.url + "/t", **fast()):
            pass

    task = asyncio.create_task(consume())
    await wait_subscribers(d.url, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_subscribers(d.url, 0)


async def test_close_from_another_task_and_break(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with pc.listen(d.url + "/t", **fast()) as lis:
        async def consume() -> list[dict[str, Any]]:
            return [ev async for ev in lis]
        task = asyncio.create_task(consume())
        await wait_subscribers(d.url, 1)
        await lis.close()
        assert await asyncio.wait_for(task, 5) == []
    await wait_subscribers(d.url, 0)
    # leaving an `async with` block by break closes the connection
    async def pub() -> None:  # the listener connects on the first iteration
        await wait_subscribers(d.url, 1)
        await publish(d.url, "/t", {"n": 1})

    async with pc.listen(d.url + "/t", **fast()) as lis2:
        t = asyncio.create_task(pub())
        async for ev in lis2:
            assert ev["n"] == 1
            break
        await t
    await wait_subscribers(d.url, 0)


async def test_backoff_while_server_is_down() -> None:
    port = free_port()  # nothing listens here
    lis = pc.listen(f"http://127.0.0.1:{port}/t", **fast())
    task = asyncio.create_task(anext(aiter(lis)))
    await await_until(lambda: lis.backoff.attempt >= 3, what="three failed attempts")
    await lis.close()
    with pytest.raises((StopAsyncIteration, RuntimeError)):
        await asyncio.wait_for(task, 5)


async def test_http_error_is_raised_not_retried(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    lis = pc.listen(d.url + TOO_MANY, **fast())
    with pytest.raises(pc.PubSubHTTPError) as ei:
        async for _ in lis:
            pass
    assert ei.value.status == 400
    assert lis.backoff.attempt == 0


async def test_publish_helpers(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    async with collecting(d.url + "/p", **fast()) as (got, _):
        await wait_subscribers(d.url, 1)
        status, text = await pc.apublish(d.url + "/p/q", {"n": 1})
        assert status == 202, text
        status, _ = await asyncio.to_thread(pc.publish, d.url + "/p", {"n": 2}, method="POST")
        assert status == 202
        await await_until(lambda: len(got) == 2)
    assert got[0]["pubsub_topics"] == ["p", "q"]
    with pytest.raises(pc.PubSubHTTPError) as ei:
        await pc.apublish(d.url + TOO_MANY, {"n": 1})
    assert ei.value.status == 400


def test_blocking_iterator_and_callback(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory)
    # the events are published by a thread once the blocking listener is subscribed
    import threading

    def publisher() -> None:
        asyncio.run(wait_subscribers(d.url, 1))
        for i in range(3):
            pc.publish(d.url + "/b", {"n": i})

    th = threading.Thread(target=publisher)
    th.start()
    got = []
    it = pc.listen_blocking(d.url + "/b", **fast())
    for ev in it:
        got.append(ev["n"])
        if len(got) == 3:
            break
    it.close()
    th.join(10)
    assert got == [0, 1, 2]
    asyncio.run(wait_subscribers(d.url, 0))

    class Done(Exception):
        pass

    seen: list[int] = []

    def cb(ev: dict[str, Any]) -> None:
        seen.append(ev["n"])
        raise Done

    th = threading.Thread(target=publisher)
    th.start()
    with pytest.raises(Done):
        pc.listen_forever(cb, d.url + "/b", **fast())
    th.join(10)
    assert seen == [0]


def test_module_is_standalone() -> None:
    """The client is one file with no dependency outside the standard library."""
    src = Path(CLIENT_PATH).read_text()
    for mod in ("aiohttp", "requests", "orjson", "hub", "server"):
        assert f"import {mod}" not in src and f"from {mod}" not in src
    json.loads(json.dumps(pc.__all__))
