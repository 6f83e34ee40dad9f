"""A per-(user, password) cache of authentication results, with single-flight look-ups.

Owns remembering what a backend answered for one credential pair for a while, and making
concurrent requests with the same credentials share one look-up (a reconnect storm of 1 000
subscribers by 50 users costs 50 look-ups, not 1 000). Passwords are never stored: entries are
keyed by an HMAC of user and password under a per-process random key.

Knows nothing of files, LDAP or HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from server.auth import Principal
from server.tasks import cancel_and_wait

__all__ = ["CredentialCache", "Lookup"]

logger = logging.getLogger(__name__)

#: Distinct credential pairs remembered; the oldest is evicted first. Bounded so that a stream of
#: made-up credentials cannot grow memory without limit.
DEFAULT_MAX_ENTRIES = 10_000

#: What a look-up returns: the principal (None: refused) and whether the answer may be cached
#: (False for "the backend could not be asked", which must not stick).
Lookup = tuple[Principal | None, bool]


class CredentialCache:
    """Results per (user, password) for ``ttl`` seconds (refusals for ``negative_ttl``)."""

    def __init__(self, ttl: float, negative_ttl: float, max_entries: int = DEFAULT_MAX_ENTRIES,
                 name: str = "auth") -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.name = name
        self._secret = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Lookup]] = {}
        self.hits = 0
        self.misses = 0

    def _key(self, user: str, password: str) -> bytes:
        u = user.encode("utf-8", "surrogatepass")
        p = password.encode("utf-8", "surrogatepass")
        # length-prefixed so that ("ab", "c") and ("a", "bc") never collide
        return hmac.new(self._secret, len(u).to_bytes(4, "big") + u + p, hashlib.sha256).digest()

    def stats(self) -> dict[str, dict[str, float]]:
        """Counters for the metrics collector (``server.metrics`` protocol; label ``cache``)."""
        return {"auth_cache_hits_total": {self.name: self.hits},
                "auth_cache_misses_total": {self.name: self.misses}}

    async def get(self, user: str, password: str,
                  lookup: Callable[[], Awaitable[Lookup]]) -> Principal | None:
        """The cached answer, or ``lookup()``'s, shared with concurrent callers."""
        key = self._key(user, password)
        hit = self._entries.get(key)
        now = time.monotonic()
        if hit is not None:
            if hit[0] > now:
                self.hits += 1
                return hit[1]
            del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            task = asyncio.get_running_loop().create_task(self._run(key, lookup),
                                                          name=f"pypubsub-{self.name}-lookup")
            self._inflight[key] = task
        # shield: one impatient client leaving must not cancel the look-up the others share
        principal, _ = await asyncio.shield(task)
        return principal

    async def _run(self, key: bytes, lookup: Callable[[], Awaitable[Lookup]]) -> Lookup:
        try:
            principal, cacheable = await lookup()
            ttl = self.ttl if principal is not None else self.negative_ttl
            if cacheable and ttl > 0:
                self._entries[key] = (time.monotonic() + ttl, principal)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return principal, cacheable
        finally:
            self._inflight.pop(key, None)

    def clear(self) -> None:
        """Forget every answer (after the users changed)."""
        self._entries.clear()

    async def close(self, grace: float = 0.0) -> None:
        """End look-ups still running (shutdown): let them finish for ``grace`` s, then cancel."""
        tasks = list(self._inflight.values())
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        await cancel_and_wait(*tasks)
        self._entries.clear()
