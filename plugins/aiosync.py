"""fdatasync without a thread: Linux native AIO (``IOCB_CMD_FDSYNC``) completed on an eventfd.

Owns one kernel AIO context, one eventfd the event loop watches and the request in flight
(one at a time). The kernel runs the sync in its own worker (Linux >= 4.18, any file system);
the loop is told through the eventfd, so the event loop's thread never blocks on the disk and
no Python thread has to take the GIL to sync and to report back. Knows nothing of SQLite.

:meth:`AioSync.open` returns None where this is not available (another OS or architecture, a
kernel or file system without AIO fsync, a sandbox refusing the system calls, the system's
``fs.aio-max-nr`` used up): callers then sync in a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import platform
import sys
from collections.abc import Callable

__all__ = ["AioSync"]

logger = logging.getLogger(__name__)

#: io_setup, io_destroy, io_getevents, io_submit: the system call numbers (no libc wrappers)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1
#: how long opening waits for its probe sync (seconds): a disk this slow is not usable anyway
_PROBE_TIMEOUT = 30


class _Iocb(ctypes.Structure):
    # struct iocb (linux/aio_abi.h), little-endian field order
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AioSync:
    """Syncs one file's data (``fdatasync``) asynchronously; one request at a time."""

    def __init__(self, fd: int, syscall: Callable[..., int], nrs: tuple[int, int, int, int],
                 ctx: ctypes.c_ulong, efd: int) -> None:
        self._fd = fd
        self._syscall = syscall
        self._setup_nr, self._destroy_nr, self._getevents_nr, self._submit_nr = nrs
        self._ctx = ctx
        self._efd = efd
        self._iocb = _Iocb(aio_lio_opcode=_IOCB_CMD_FDSYNC, aio_fildes=fd,
                           aio_flags=_IOCB_FLAG_RESFD, aio_resfd=efd)
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = _IoEvent()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: Callable[[int], None] | None = None

    def __repr__(self) -> str:
        return f"<AioSync fd={self._fd} {'busy' if self._done else 'idle'}>"

    @classmethod
    def open(cls, fd: int) -> AioSync | None:
        """An AioSync for ``fd`` (kept open by the caller), checked with one blocking sync;
        None when this system cannot do it (the reason is logged at debug level)."""
        nrs = _SYSCALLS.get(platform.machine())
        if not sys.platform.startswith("linux") or nrs is None or not hasattr(os, "eventfd"):
            logger.debug("no Linux AIO on %s/%s", sys.platform, platform.machine())
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syscall = libc.syscall
            syscall.restype = ctypes.c_long
            ctx = ctypes.c_ulong(0)
            if syscall(ctypes.c_long(nrs[0]), ctypes.c_uint(1), ctypes.byref(ctx)) != 0:
                logger.debug("io_setup: %s", os.strerror(ctypes.get_errno()))
                return None
        except (OSError, AttributeError) as e:  # no libc to call through
            logger.debug("no syscall(): %s", e)
            return None
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as e:
            syscall(ctypes.c_long(nrs[1]), ctx)
            logger.debug("eventfd: %s", e)
            return None
        aio = cls(fd, syscall, nrs, ctx, efd)
        try:
            err = aio._probe()
        except OSError as e:
            err = e.errno or errno.EIO
        if err:
            logger.debug("AIO fdatasync: %s", os.strerror(err))
            aio._release()
            return None
        return aio

    def _probe(self) -> int:
        """(blocking) One sync, waited for: 0, or the errno that says AIO fsync is unusable."""
        if self._syscall(ctypes.c_long(self._submit_nr), self._ctx, ctypes.c_long(1), self._iocbs) != 1:
            return ctypes.get_errno() or errno.EIO
        timeout = _Timespec(_PROBE_TIMEOUT, 0)
        got = self._syscall(ctypes.c_long(self._getevents_nr), self._ctx, ctypes.c_long(1),
                            ctypes.c_long(1), ctypes.byref(self._event), ctypes.byref(timeout))
        if got != 1:
            return ctypes.get_errno() or errno.ETIMEDOUT
        os.eventfd_read(self._efd)
        return -self._event.res if self._event.res < 0 else 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver completions on ``loop`` (its thread calls :meth:`submit` from now on)."""
        self._loop = loop
        loop.add_reader(self._efd, self._ready)

    def submit(self, done: Callable[[int], None]) -> None:
        """Start syncing the file's data written so far; ``done(0 or errno)`` is called on the
        loop when it is on disk (or failed). One request at a time."""
        if self._done is not None:
            raise RuntimeError("AioSync: a sync is already in flight")
        if self._syscall(ctypes.c_long(self._submit_nr), self._ctx, ctypes.c_long(1), self._iocbs) != 1:
            err = ctypes.get_errno() or errno.EIO
            if self._loop is None:
                raise RuntimeError("AioSync.submit before attach()")
            self._loop.call_soon(done, err)
            return
        self._done = done

    def _ready(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:  # nothing completed (a spurious wake-up)
            return
        zero = _Timespec(0, 0)
        got = self._syscall(ctypes.c_long(self._getevents_nr), self._ctx, ctypes.c_long(1),
                            ctypes.c_long(1), ctypes.byref(self._event), ctypes.byref(zero))
        done, self._done = self._done, None
        if done is None:
            return
        if got != 1:
            done(ctypes.get_errno() or errno.EIO)
            return
        res = self._event.res
        done(-res if res < 0 else 0)

    def close(self) -> None:
        """Stop watching, wait for a request still in flight (io_destroy does), release."""
        if self._loop is not None:
            self._loop.remove_reader(self._efd)
            self._loop = None
        self._release()

    def _release(self) -> None:
        if self._ctx.value:
            self._syscall(ctypes.c_long(self._destroy_nr), self._ctx)
            self._ctx.value = 0
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
