"""The daemon's authenticator: the ACL file first, then LDAP; and the SIGUSR2 ACL reload.

Owns the order of the backends (a user named in the ACL file is decided by the file alone, as
in 0.7.4; other users go to LDAP when it is configured), reloading the file on SIGUSR2 (a broken
file keeps the previous ACL, logged), and re-authorising the streams already open without
dropping them. Also owns the lifetime of the signal handler and of the reload task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from hub.router import NO_ACL
from plugins.acl import FileAuthenticator, FilePrincipal, load_acl_file
from server.app import STATE
from server.auth import Principal
from server.config import Config
from server.errors import ConfigError

if TYPE_CHECKING:
    from plugins.ldap import LdapAuthenticator

__all__ = ["AuthChain", "build_auth"]

logger = logging.getLogger(__name__)

#: signals that reload the ACL file
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)


class AuthChain:
    """ACL-file users, then LDAP users. Implements ``server.auth.Authenticator``."""

    def __init__(self, file: FileAuthenticator | None, ldap: LdapAuthenticator | None) -> None:
        self.file = file
        self.ldap = ldap

    async def authenticate(self, username: str, password: str) -> Principal | None:
        if self.file is not None and self.file.knows(username):
            return await self.file.authenticate(username, password)
        if self.ldap is not None:
            return await self.ldap.authenticate(username, password)
        if self.file is not None:  # unknown user: the decoy check, as costly as a wrong password
            return await self.file.authenticate(username, password)
        return None

    async def close(self) -> None:
        if self.ldap is not None:
            await self.ldap.close()


def reauthorise_streams(app: web.Application,
                        reauth: Callable[[FilePrincipal], FilePrincipal | None]) -> tuple[int, int]:
    """Apply a reloaded ACL to every open stream of a file user; returns (checked, changed).

    A stream is moved to its new hub group in place: it is never dropped, and from the next
    event on it sees exactly what its new rights allow.
    """
    state = app[STATE]
    router = state.hub.topics
    checked = changed = 0
    for stream in list(state.streams):
        old = stream.principal
        if not isinstance(old, FilePrincipal):
            continue  # anonymous, or vouched for by LDAP (not reloaded)
        checked += 1
        new = reauth(old)
        stream.principal = new
        acl = new.acl if new is not None else NO_ACL
        if new is None:
            logger.info("stream %r: user %r revoked or password changed: private events stop",
                        stream, old.user)
        if stream.group is not None and stream.group.acl != acl:
            stream.group = router.move(stream, stream.group, acl)
            changed += 1
    state.auth_generation += 1  # streams still being set up re-authenticate
    return checked, changed


class AclReloader:
    """Owns the SIGUSR2 handler and the reload task; one reload at a time, none lost."""

    def __init__(self, app: web.Application, file: FileAuthenticator) -> None:
        self.app = app
        self.file = file
        self.task: asyncio.Task[None] | None = None
        self.again = False
        self.reloads = 0
        self.failures = 0

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector (``server.metrics`` protocol)."""
        return {"acl_reloads_total": self.reloads, "acl_reload_failures_total": self.failures}

    def trigger(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True  # a signal during a reload: read the file once more after it
            return
        self.task = asyncio.get_running_loop().create_task(self._run(), name="pypubsub-acl-reload")

    async def _run(self) -> None:
        while True:
            self.again = False
            await self.reload()
            if not self.again:
                return

    async def reload(self) -> None:
        path = self.file.path
        try:
            # reading the file and making the decoy hash are blocking: off the event loop
            new = await asyncio.to_thread(load_acl_file, path)
        except ConfigError as e:
            self.failures += 1
            logger.error("ACL reload failed, keeping the previous ACL: %s", e)
            return
        reauth = self.file.reload(new)
        self.file.warn_plaintext()
        checked, changed = reauthorise_streams(self.app, reauth)
        self.reloads += 1
        logger.info("ACL reloaded from %s: %d user(s); %d open stream(s) re-authorised, %d changed",
                    path, len(new.users), checked, changed)

    async def close(self) -> None:
        t = self.task
        if t is not None and not t.done():
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def build_auth(config: Config, acl_path: str | None) -> tuple[AuthChain, Callable[
        [web.Application], contextlib.AbstractAsyncContextManager[None]]]:
    """The authenticator and its cleanup context (SIGUSR2 reload, LDAP cache shutdown).

    Loads the ACL file now: a broken file at start-up is a ConfigError.
    """
    file = None
    if acl_path is not None:
        file = FileAuthenticator(load_acl_file(acl_path))
        logger.info("ACL: %d user(s) from %s", len(file.acl.users), acl_path)
        file.warn_plaintext()
    ldap = None
    if config.clients.ldap is not None:
        from plugins.ldap import build_ldap

        ldap = build_ldap(config.clients.ldap)
        logger.info("LDAP authentication via %s", ldap.cfg.uri)
    chain = AuthChain(file, ldap)

    @contextlib.asynccontextmanager
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        reloader = AclReloader(app, file) if file is not None else None
        state = app[STATE]
        if reloader is not None and file is not None:
            state.metrics.register(reloader)
            state.plugins["acl"] = lambda: {"file": file.path, "users": len(file.acl.users),
                                            "reloads": reloader.reloads,
                                            "reload_failures": reloader.failures}
        if ldap is not None:
            state.metrics.register(ldap)
            state.plugins["ldap"] = lambda: {"uri": ldap.cfg.uri, "binds": ldap.binds,
                                             "failures": ldap.failures}
        for sig in RELOAD_SIGNALS:  # SIGHUP: the Unix daemon convention; SIGUSR2: 0.7.4's
            if reloader is not None:
                loop.add_signal_handler(sig, reloader.trigger)
            else:
                loop.add_signal_handler(sig, logger.warning, "%s: no ACL file in use (start with "
                                        "--acl FILE), nothing to reload", sig.name)
        try:
            yield
        finally:
            for sig in RELOAD_SIGNALS:
                loop.remove_signal_handler(sig)
            if reloader is not None:
                await reloader.close()
            await chain.close()

    return chain, lifecycle
