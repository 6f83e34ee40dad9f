"""The PyPI client most PyPubSub users run, ``asfpy.pubsub.listen`` (asfpy 0.60), against our daemon.

It reads lines up to ``\\n`` (so merged and split reads must not matter), resumes with
``X-Fetch-Since-Cursor`` after any disconnect, and expects an unknown cursor to mean "continue
live". Its backoff after a failed reconnect is 2 s, then 6 s: the restart tests take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asfpy.pubsub import listen as asfpy_listen

from tests.relay import Relay
from tests.support import (
    Daemon,
    await_until,
    base_config,
    free_port,
    put,
    wait_subscribers,
)


def start(factory: Callable[..., Daemon], acl: dict[str, Any] | None = None, **server: Any) -> Daemon:
    port = free_port()
    return factory(config=base_config(port, ping_interval=0.25, **server), port=port, acl=acl)




@contextlib.asynccontextmanager
async def asfpy_events(url: str, **kw: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """asfpy's listener in a task; what it yields (pings left out) is collected."""
    got: list[dict[str, Any]] = []

    async def run() -> None:
        async for payload in asfpy_listen(url, timeout=5, **kw):
            if "stillalive" not in payload:
                got.append(payload)

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ns(got: list[dict[str, Any]]) -> list[int]:
    return [e["n"] for e in got]


async def wait_n(got: list[dict[str, Any]], count: int, timeout: float = 10.0) -> list[int]:
    await await_until(lambda: len(got) >= count, timeout, f"{count} events (have {ns(got)})")
    return ns(got)


@pytest.mark.parametrize("mode", ["merge", "split", "straddle"])
async def test_asfpy_merged_and_split_reads(daemon_factory: Callable[..., Daemon], mode: str) -> None:
    d = start(daemon_factory)
    async with Relay(d.port, mode) as relay, asfpy_events(relay.url + "/t") as got:
        await wait_subscribers(d.url, 1)
        for i in range(6):
            await put(d, "/t", {"n": i})
        assert await wait_n(got, 6) == list(range(6))


async def test_asfpy_resumes_across_restart_with_persistent_backlog(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    store = tmp_path / "backlog.sqlite"
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0, "storage": str(store)})
    async with Relay(d.port) as relay, asfpy_events(relay.url + "/t") as got:
        await wait_subscribers(d.url, 1)
        for i in (1, 2, 3):
            await put(d, "/t", {"n": i})
        await wait_n(got, 3)
        relay.block()  # asfpy may reconnect only once events 4-6 were published
        await asyncio.to_thread(d.restart)
        for i in (4, 5, 6):
            await put(d, "/t", {"n": i})
        await await_until(lambda: relay.stats.refused >= 1, 10, "a refused reconnect")
        relay.unblock()
        await wait_subscribers(d.url, 1, timeout=20)  # asfpy's backoff: 2 s, then 6 s
        await put(d, "/t", {"n": 7})
        assert await wait_n(got, 7) == [1, 2, 3, 4, 5, 6, 7]
    assert len({e["pubsub_cursor"] for e in got}) == 7


async def test_asfpy_unknown_cursor_continues_live(daemon_factory: Callable[..., Daemon]) -> None:
    """A restart without persistent storage forgets every cursor: asfpy must go on live."""
    d = start(daemon_factory, backlog={"size": 100, "max_age": 0})
    async with asfpy_events(d.url + "/t") as got:
        await wait_subscribers(d.url, 1)
        await put(d, "/t", {"n": 1})
        await wait_n(got, 1)
        await asyncio.to_thread(d.restart)
        await wait_subscribers(d.url, 1, timeout=20)
        await put(d, "/t", {"n": 2})
        assert await wait_n(got, 2) == [1, 2]


# asfpy 0.60 passes aiohttp.BasicAuth as `auth=`, which aiohttp now deprecates: asfpy's
# warnings, not ours
@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_asfpy_auth_private_events(daemon_factory: Callable[..., Daemon]) -> None:
    d = start(daemon_factory, acl={"janedoe": {"password": "hunter2", "acl": {"s": ["secret"]}}})
    async with asfpy_events(d.url + "/secret", username="janedoe", password="hunter2") as priv, \
            asfpy_events(d.url + "/secret") as anon:
        await wait_subscribers(d.url, 2)
        await put(d, "/private/secret/x", {"n": 1})
        await put(d, "/secret/x", {"n": 2})
        assert await wait_n(priv, 2) == [1, 2]
        assert await wait_n(anon, 1) == [2]
    assert priv[0]["pubsub_path"] == "/private/secret/x"
