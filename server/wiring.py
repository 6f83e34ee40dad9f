"""Assembling the daemon from its configuration: which log, which auth, which plugins.

Owns the choice and order of the optional parts; each part is imported only when configured.
One function per part keeps each plugin's wiring in one place.
"""

from __future__ import annotations

import logging

from aiohttp import web

from plugins import presence
from server.app import build_app
from server.config import Config
from server.eventlog import EventLog, MemoryLog

__all__ = ["build_daemon"]

logger = logging.getLogger(__name__)


def make_log(config: Config) -> EventLog:
    """The event log for ``server.backlog`` (memory ring; persistent when ``storage`` is set)."""
    bl = config.server.backlog
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
    from server.app import STATE
    from server.replay import Replayer

    state = app[STATE]
    state.replay = replayer = Replayer(state.log, config.server.backlog.max_replay)
    state.metrics.register(replayer.stats)


def build_daemon(config: Config, acl_path: str | None) -> web.Application:
    """The full application: core + configured plugins. Raises ConfigError on bad config."""
    from plugins.auth import build_auth  # ACL file + LDAP (bonsai only when configured)

    auth, auth_lifecycle = build_auth(config, acl_path)
    app = build_app(config, log=make_log(config), auth=auth)
    install_replay(app, config)
    app.cleanup_ctx.append(auth_lifecycle)  # SIGUSR2 ACL reload; LDAP look-ups ended at shutdown
    presence.install(app)  # join/leave events at /private/pubsub/presence (admins' private stream)
    if config.sqs is not None:  # SQS ingestion (imports aiobotocore only when configured)
        from plugins import sqs

        sqs.install(app, config)
    return app
