"""Cursors: opaque, unique, time-ordered event ids in the 36-character UUID shape (UUIDv7).

Owns cursor generation only. 0.7.4 used random UUID4s and regenerated them on restart, so a
client resuming with an old cursor silently got nothing; a UUIDv7 carries its millisecond
timestamp in the top bits, so cursors sort by time and survive restarts unchanged.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid

__all__ = ["advance_past", "cursor_time", "is_uuid7", "new_cursor"]

_last_ms = 0
_seq = 0
_MS_MASK = (1 << 48) - 1
_LOW48 = (1 << 48) - 1
_VARIANT = 0b10 << 62
_random = random.Random(int.from_bytes(os.urandom(16), "big"))
#: the millisecond whose ``xxxxxxxx-xxxx-7`` prefix and ``-vxxx-xxxxxxxxxxxx`` tail are cached
_prefix_ms = -1
_prefix = ""
_suffix = ""
# rand_a is 12 bits: up to 4096 cursors per millisecond stay strictly ordered; past that we
# borrow the next millisecond (time runs slightly ahead rather than ordering breaking).
_SEQ_MAX = 0xFFF
_SEQ_HEX = tuple(f"{i:03x}" for i in range(_SEQ_MAX + 1))


_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z", re.I)


def is_uuid7(cursor: str) -> bool:
    """True for a UUIDv7 string (ours: time-ordered); False for 0.7.4's UUID4s and anything else."""
    return len(cursor) == 36 and _UUID7.match(cursor) is not None


def new_cursor(now: float | None = None) -> str:
    """A new UUIDv7 string, strictly greater than every cursor this process made before.

    For the event loop's thread (no lock: one publish's stamping is its hottest caller). All
    but the 12-bit sequence number is formatted once per millisecond.
    """
    global _last_ms, _seq, _prefix_ms, _prefix, _suffix
    ms = int((time.time() if now is None else now) * 1000)
    if ms <= _last_ms:
        ms = _last_ms
        _seq += 1
        if _seq > _SEQ_MAX:
            ms += 1
            _seq = 0
    else:
        _seq = 0
    _last_ms = ms
    if ms != _prefix_ms:
        _prefix_ms = ms
        h = "%012x" % (ms & _MS_MASK)
        _prefix = f"{h[:8]}-{h[8:]}-7"
        # uniqueness comes from (ms, seq); the other 62 bits only need to differ between
        # processes, not to be unguessable (a cursor grants nothing): random once per millisecond
        t = _random.getrandbits(62) | _VARIANT
        _suffix = f"-{t >> 48:04x}-{t & _LOW48:012x}"
    return _prefix + _SEQ_HEX[_seq] + _suffix


def advance_past(cursor: str) -> None:
    """Make every later cursor of this process greater than ``cursor`` (a stored UUIDv7).

    Called with the newest stored cursor at start-up: if the clock stepped backwards across a
    restart, new cursors still sort after the stored ones. Non-UUIDv7 strings are ignored.
    """
    global _last_ms, _seq
    if not is_uuid7(cursor):
        return
    u = uuid.UUID(cursor)
    ms, seq = u.int >> 80, (u.int >> 64) & _SEQ_MAX
    if (ms, seq) > (_last_ms, _seq):
        _last_ms, _seq = ms, seq


def cursor_time(cursor: str) -> float | None:
    """The epoch seconds encoded in a UUIDv7 cursor, or None if it is not one."""
    if not is_uuid7(cursor):
        return None
    return (uuid.UUID(cursor).int >> 80) / 1000.0
