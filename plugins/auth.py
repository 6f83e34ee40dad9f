"""The daemon's authenticator: the ACL file first, then LDAP; and the SIGHUP/SIGUSR2 ACL reload.

Owns the order of the backends (a user named in the ACL file is decided by the file alone, as
in 0.7.4; other users go to LDAP when it is configured), reloading the file on SIGHUP or
SIGUSR2 (a broken, empty or missing file keeps the previous ACL, logged), and re-authorising the streams
already open without dropping them (through the plugin context). Also owns the lifetime of the
signal handler and of the reload task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from plugins.acl import FileAuthenticator, FilePrincipal, load_acl_file
from server.auth import Principal
from server.config import Config
from server.context import PluginContext
from server.errors import ConfigError
from server.tasks import cancel_and_wait

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
        if self.file is not None:
            await self.file.close()
        if self.ldap is not None:
            await self.ldap.close()


class AclReloader:
    """Owns the SIGUSR2 handler and the reload task; one reload at a time, none lost."""

    def __init__(self, ctx: PluginContext, file: FileAuthenticator) -> None:
        self.ctx = ctx
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
            # reading the file and making the decoy hashes are blocking: off the event loop;
            # a missing or empty file is refused too (it would revoke every user)
            new = await asyncio.to_thread(functools.partial(load_acl_file, path, reload=True))
        except ConfigError as e:
            self.failures += 1
            logger.error("ACL reload failed, keeping the previous ACL: %s", e)
            return
        reauth = self.file.reload(new)
        self.file.warn_plaintext()
        checked, changed = self.ctx.reauthorise(FilePrincipal, reauth)
        self.reloads += 1
        logger.info("ACL reloaded from %s: %d user(s); %d open stream(s) re-authorised, %d changed",
                    path, len(new.users), checked, changed)

    async def close(self) -> None:
        await cancel_and_wait(self.task)


def build_auth(config: Config, acl_path: str | None) -> tuple[AuthChain, Callable[
        [PluginContext], contextlib.AbstractAsyncContextManager[None]]]:
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
    async def lifecycle(ctx: PluginContext) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        reloader = AclReloader(ctx, file) if file is not None else None
        if reloader is not None and file is not None:
            ctx.metrics.register(reloader)
            ctx.metrics.register(file.cache)  # auth_cache_*{cache="acl"}
            ctx.report("acl", lambda: {"file": file.path, "users": len(file.acl.users),
                                       "reloads": reloader.reloads,
                                       "reload_failures": reloader.failures})
        if ldap is not None:
            ctx.metrics.register(ldap)
            ctx.report("ldap", lambda: {"uri": ldap.cfg.uri, "binds": ldap.binds,
                                        "failures": ldap.failures})
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
