"""SIGTERM drains: what was published is delivered, then streams end cleanly, spread out."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import datetime

from server.run import DRAIN_MIN_BATCH, DRAIN_STEP
from tests.support import HOST, DaemonFactory, base_config, free_port, put, wait_subscribers

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
