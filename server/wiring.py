"""Assembling the daemon from its configuration: which log, which auth, which plugins.

Owns the choice and order of the optional parts; each part is imported only when configured.
One function per part keeps each plugin's wiring in one place.
"""

from __future__ import annotations

import logging

from aiohttp import web

from server.app import build_app
from server.config import Config
from server.eventlog import EventLog, MemoryLog

__all__ = ["build_daemon"]

logger = logging.getLogger(__name__)


def make_log(config: Config) -> EventLog:
    """The event log for ``server.backlog`` (memory ring; persistent when ``storage`` is set)."""
    bl = config.server.backlog
    return MemoryLog(bl.size, bl.max_age)


def build_daemon(config: Config, acl_path: str | None) -> web.Application:
    """The full application: core + configured plugins. Raises ConfigError on bad config."""
    app = build_app(config, log=make_log(config))
    return app
