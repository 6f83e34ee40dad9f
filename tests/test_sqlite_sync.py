"""The SQLite backlog answers an append only once its WAL is on disk, not just written.

A process crash (kill -9) cannot tell a synced WAL from one still in the page cache; a power
loss can. So the check asks the kernel itself: when the log hands a batch to its tail (which
happens before the batch's appends resolve), the WAL must have no dirty page and none under
writeback left (Linux ``cachestat``, 6.5+). With ``fsync`` off the same probe does see dirty
pages: it can tell the two apart.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
from pathlib import Path

import pytest

from hub.event import Event, make_event
from plugins.backlog_sqlite import SqliteLog
from server.errors import ServiceUnavailable
from server.eventlog import Appended

#: cachestat(2) on x86_64 and aarch64 (the generic system call table)
_NR_CACHESTAT = 451


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def unsynced_pages(path: Path) -> int:
    """Pages of ``path`` dirty or under writeback in the page cache (not on disk yet)."""
    assert platform.machine() in ("x86_64", "aarch64"), "cachestat's number is known here only"
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        rng = _Range(0, 0)  # the whole file
        if _libc.syscall(ctypes.c_long(_NR_CACHESTAT), ctypes.c_uint(fd), ctypes.byref(rng),
                         ctypes.byref(st), ctypes.c_uint(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cachestat (Linux 6.5+): {os.strerror(err)}")
        return int(st.nr_dirty + st.nr_writeback)
    finally:
        os.close(fd)


async def burst(tmp_path: Path, *, fsync: bool, aio: bool) -> list[int]:
    """Unsynced WAL pages seen at each delivery of 30 rounds of 10 concurrent appends."""
    path = tmp_path / "b.db"
    wal = Path(str(path) + "-wal")
    log = SqliteLog(path, 1000, fsync=fsync, aio=aio)
    seen: list[int] = []

    def at_delivery(_ev: Event) -> None:
        seen.append(unsynced_pages(wal))

    log.tail(at_delivery)
    await log.start()
    # Linux (x86_64, aarch64) syncs by native AIO; the thread when asked to, or without fsync
    assert (log._aio is not None) == (aio and fsync)
    try:
        for r in range(30):
            done = await asyncio.gather(*[log.append(make_event("/t", {"r": r, "n": i, "pad": "x" * 300}))
                                          for i in range(10)])
            assert all(isinstance(d, Appended) for d in done)
    finally:
        await log.close()
    assert len(seen) == 300
    return seen


@pytest.mark.parametrize("aio", [True, False], ids=["linux-aio", "thread"])
async def test_appends_resolve_only_after_the_wal_is_on_disk(tmp_path: Path, aio: bool) -> None:
    seen = await burst(tmp_path, fsync=True, aio=aio)
    assert max(seen) == 0, f"a batch was routed (and answered) with {max(seen)} WAL page(s) not on disk"


async def test_without_fsync_the_probe_sees_the_wal_in_memory_only(tmp_path: Path) -> None:
    seen = await burst(tmp_path, fsync=False, aio=False)
    assert max(seen) > 0  # the check above can fail: it sees pages the kernel has not written


@pytest.mark.parametrize("aio", [True, False], ids=["linux-aio", "thread"])
async def test_a_failed_sync_refuses_publishing_until_restart(tmp_path: Path, aio: bool) -> None:
    """The WAL cannot be synced (here: its descriptor now names /dev/null, which the kernel
    refuses to sync): that batch and every later append fail, none is routed, the log says why."""
    path = tmp_path / "b.db"
    log = SqliteLog(path, 1000, aio=aio)
    routed: list[Event] = []
    log.tail(routed.append)
    await log.start()
    try:
        assert isinstance(await log.append(make_event("/t", {"n": 0})), Appended)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(devnull, log._wal_fd)
        finally:
            os.close(devnull)
        with pytest.raises(ServiceUnavailable):
            await log.append(make_event("/t", {"n": 1}))
        why = log.unready()
        assert why is not None and "cannot be synced" in why
        with pytest.raises(ServiceUnavailable):
            await log.append(make_event("/t", {"n": 2}))
        assert [e.payload["n"] for e in routed] == [0]
    finally:
        await log.close()
