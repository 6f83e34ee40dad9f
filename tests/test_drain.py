"""SIGTERM drains: what was published is delivered, then streams end cleanly, spread out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from datetime import datetime

import aiohttp

from server.run import DRAIN_MIN_BATCH, DRAIN_STEP
from tests.support import HOST, DaemonFactory, base_config, free_port, put, subscribe, wait_subscribers

#: more streams than one batch: the drain needs three batches for these
STREAMS = 2 * DRAIN_MIN_BATCH + 50


async def open_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /drain HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 20)


async def test_sigterm_delivers_then_ends_streams_spread_over_the_grace(
        daemon_factory: DaemonFactory) -> None:
    port = free_port()
    d = daemon_factory(config=base_config(port, shutdown_grace=2), port=port)
    conns = [await open_stream(d.port) for _ in range(STREAMS)]
    try:
        await wait_subscribers(d.url, STREAMS, timeout=30)
        await put(d, "/drain", {"last": "words"})  # answered 202: it must reach every stream
        d.signal(signal.SIGTERM)
        results = await asyncio.gather(*(read_to_end(r) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
    for data in results:
        assert b'"last":"words"' in data, data
        assert data.endswith(b"0\r\n\r\n"), data[-50:]  # the terminating chunk: a clean end
    assert d.proc is not None and d.proc.wait(15) == 0
    log = d.log()
    assert f"draining: ending {STREAMS} stream(s), {DRAIN_MIN_BATCH} every" in log
    # three batches, DRAIN_STEP apart at least (the daemon's own clock; sleeps only last longer)
    batches = [ln for ln in log.splitlines() if f"of {STREAMS} stream(s) ended" in ln]
    assert [ln.split("draining: ")[1].split(" of")[0] for ln in batches] == [
        str(DRAIN_MIN_BATCH), str(2 * DRAIN_MIN_BATCH), str(STREAMS)]
    stamps = [datetime.strptime(ln[:23], "%Y-%m-%d %H:%M:%S,%f") for ln in batches]
    assert (stamps[-1] - stamps[0]).total_seconds() >= 2 * DRAIN_STEP - 0.002


async def test_sigterm_under_load_loses_and_undelivers_nothing_acknowledged(
        daemon_factory: DaemonFactory) -> None:
    """Publishers at full speed into the persistent backlog, a stream open, SIGTERM: every event
    answered 202 reached the open stream before it ended, and is in the backlog after a restart."""
    port = free_port()
    cfg = base_config(port, shutdown_grace=3)
    d = daemon_factory(config=cfg, port=port, start=False)
    cfg["server"]["backlog"] = {"size": 100_000, "storage": str(d.workdir / "backlog.db")}
    d.write_files()
    d.start()
    acked: set[int] = set()
    refused: list[int] = []
    counter = iter(range(1 << 30))
    stop_after = 300

    async def publisher(s: aiohttp.ClientSession) -> None:
        while True:
            n = next(counter)
            try:
                async with s.put(d.url + "/load", data=json.dumps({"n": n})) as r:
                    if r.status == 202:
                        acked.add(n)
                    else:
                        refused.append(r.status)
                        return
            except aiohttp.ClientError:
                return  # the listener is closed: the drain has begun
            if len(acked) == stop_after:
                d.signal(signal.SIGTERM)

    seen: list[int] = []
    async with subscribe(d.url, "/load") as sub:
        await wait_subscribers(d.url, 1)
        async with aiohttp.ClientSession() as s:
            pubs = asyncio.gather(*[publisher(s) for _ in range(8)])
            with contextlib.suppress(EOFError):
                while True:
                    seen.append((await sub.next(timeout=20))["n"])
            await asyncio.wait_for(pubs, 30)
    assert d.proc is not None and d.proc.wait(15) == 0
    assert len(acked) >= stop_after
    assert set(refused) <= {503}
    assert not acked - set(seen), f"{len(acked - set(seen))} acknowledged event(s) never delivered"
    d.start()
    async with subscribe(d.url, "/load", headers={"X-Fetch-Since": "0"}) as sub:
        kept: set[int] = set()
        while len(kept) < len(acked):
            kept.add((await sub.next(timeout=20))["n"])
    assert acked <= kept
