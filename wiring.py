"""The composition root: assembling the daemon from its configuration (which log, which auth,
which plugins).

Sits above both ``server`` and ``plugins`` (neither imports this module), so every import runs
downward. Owns the choice and order of the optional parts; each part is imported only when
configured. Plugins get a :class:`~server.context.PluginContext` (what they may use of the
daemon), never the application's state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from aiohttp import web

from plugins import presence
from server.app import STATE, build_app
from server.config import Config, Section
from server.context import PluginContext, plugin_context
from server.errors import ConfigError
from server.eventlog import EventLog, MemoryLog
from server.replay import Replayer

__all__ = ["build_daemon", "plugin_problems"]

logger = logging.getLogger(__name__)


def plugin_problems(ldap: Section | None, sqs: Section | None) -> list[ConfigError]:
    """Every error in the sections plugins parse, so a file's errors are reported at once
    (``server.config.load_config``'s ``validate``). Imports a plugin only if it is configured."""
    errors: list[ConfigError] = []
    if ldap is not None:
        from plugins.ldap import parse_ldap

        parse_ldap(ldap.collecting(errors))
    if sqs is not None:
        from plugins.sqs import parse_sqs_config

        parse_sqs_config(sqs.collecting(errors))
    return errors


def make_log(config: Config) -> EventLog:
    """The event log for ``server.backlog`` (memory ring; persistent when ``storage`` is set)."""
    bl = config.server.backlog
    if bl.redis_url is not None:  # a cluster node (redis-py only when configured)
        from plugins.backlog_redis import RedisLog

        return RedisLog(bl.redis_url, bl.stream, bl.size, bl.max_age, timeout=bl.timeout,
                        config_file=config.file)
    if bl.storage is not None:
        if not bl.size:
            logger.warning("%s: server.backlog.storage is set but size is 0: the backlog is off",
                           config.file)
        else:
            from plugins.backlog_sqlite import SqliteLog  # sqlite3 only when persistent

            return SqliteLog(bl.storage, bl.size, bl.max_age, fsync=bl.fsync, config_file=config.file)
    return MemoryLog(bl.size, bl.max_age)


def install_replay(app: web.Application, config: Config) -> None:
    """X-Fetch-Since / X-Fetch-Since-Cursor replay from the log (answers "not found" when off)."""
    state = app[STATE]
    state.replay = replayer = Replayer(state.log, config.server.backlog.max_replay)
    state.metrics.register(replayer.stats)


def start_with(app: web.Application, ctx: PluginContext,
               lifecycle: Callable[[PluginContext], contextlib.AbstractAsyncContextManager[None]]) -> None:
    """Run a plugin's ``lifecycle(ctx)`` from the app's startup to its cleanup."""
    app.cleanup_ctx.append(lambda _app: lifecycle(ctx))


def build_daemon(config: Config, acl_path: str | None) -> web.Application:
    """The full application: core + configured plugins. Raises ConfigError on bad config."""
    from plugins.auth import build_auth  # ACL file + LDAP (bonsai only when configured)

    auth, auth_lifecycle = build_auth(config, acl_path)
    app = build_app(config, log=make_log(config), auth=auth)
    install_replay(app, config)
    ctx = plugin_context(app)
    start_with(app, ctx, auth_lifecycle)  # SIGUSR2 ACL reload; LDAP look-ups ended at shutdown
    start_with(app, ctx, presence.lifecycle)  # join/leave events at /private/pubsub/presence
    if config.sqs is not None:  # SQS ingestion (imports aiobotocore only when configured)
        from plugins import sqs

        start_with(app, ctx, sqs.build(config).lifecycle)
    return app
