"""The admin listener: what an operator reads, on its own port, where nothing is a topic.

Owns ``GET /metrics`` (Prometheus text, read at scrape time through :mod:`server.metrics`),
``/healthz`` (the event loop answers), ``/readyz`` (a publish can be accepted now: 503 during
an outage or a drain), ``/status`` (a JSON snapshot) and ``/`` (an HTML page drawn from
``/status``, updating live). Off unless ``server.admin.port`` is set.

Reads the daemon's :class:`~server.app.State`; changes nothing in it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server import __version__
from server.admin_page import STATUS_PAGE
from server.app import SERVER_HEADER, State
from server.metrics import StatsCollector

__all__ = ["build_admin_app", "status_snapshot"]

logger = logging.getLogger(__name__)

#: /status lists at most this many subscription topic sets (the largest first): a daemon with
#: 100 000 distinct subscriptions must not answer with megabytes
MAX_STATUS_SUBSCRIPTIONS = 500

ADMIN_STATE: web.AppKey[State] = web.AppKey("pypubsub_admin_state", State)
PROM_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("pypubsub_prom", CollectorRegistry)

#: the status page runs its own inline script only, and talks to nothing but this listener
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:")


def status_snapshot(state: State) -> dict[str, Any]:
    """What ``/status`` answers (and the status page draws)."""
    counts: dict[tuple[str, str], int] = {}
    for g in state.hub.topics.groups():
        if g.sinks:
            key = (str(g.family.spec), g.fmt.name)
            counts[key] = counts.get(key, 0) + len(g.sinks)
    subs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    metrics = state.metrics.snapshot()
    backlog: dict[str, Any] = {
        "capacity": state.config.server.backlog.size,
        "max_age": state.config.server.backlog.max_age,
        "persistent": state.config.server.backlog.storage is not None,
        "events": metrics.get("backlog_events", 0),
        "oldest": metrics.get("backlog_oldest_timestamp_seconds"),
        "newest": metrics.get("backlog_newest_timestamp_seconds"),
    }
    plugins: dict[str, Mapping[str, Any]] = {name: report() for name, report in list(state.plugins.items())}
    unready = state.unready()
    return {
        "version": __version__,
        "time": time.time(),
        "started": state.started,
        "uptime_seconds": time.time() - state.started,
        "ready": unready is None,
        "unready_reason": unready,
        "draining": state.closing,
        "subscribers": sum(counts.values()),
        "subscriptions": [{"topics": spec, "transport": fmt, "count": n}
                          for (spec, fmt), n in subs[:MAX_STATUS_SUBSCRIPTIONS]],
        "subscriptions_listed": min(len(subs), MAX_STATUS_SUBSCRIPTIONS),
        "subscriptions_total": len(subs),
        "backlog": backlog,
        "plugins": plugins,
        "metrics": metrics,
    }


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={"Server": SERVER_HEADER,
                                                          "Cache-Control": "no-store", **headers})


async def handle_metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PROM_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST,
                                            "Server": SERVER_HEADER, "Cache-Control": "no-store"})


async def handle_healthz(_: web.Request) -> web.Response:
    return _text(200, "ok\n")


async def handle_readyz(request: web.Request) -> web.Response:
    why = request.app[ADMIN_STATE].unready()
    if why is not None:
        return _text(503, f"not ready: {why}\n", **{"Retry-After": "5"})
    return _text(200, "ready\n")


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(status_snapshot(request.app[ADMIN_STATE]),
                             headers={"Server": SERVER_HEADER, "Cache-Control": "no-store"})


async def handle_page(_: web.Request) -> web.Response:
    return web.Response(text=STATUS_PAGE, content_type="text/html", headers={
        "Server": SERVER_HEADER, "Cache-Control": "no-store", "Content-Security-Policy": PAGE_CSP,
        "X-Content-Type-Options": "nosniff"})


def build_admin_app(state: State) -> web.Application:
    """The admin application for ``state`` (served by its own runner, see ``server.run``)."""
    app = web.Application()
    app[ADMIN_STATE] = state
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(state.metrics))
    app[PROM_REGISTRY] = registry
    for path, handler in (("/metrics", handle_metrics), ("/healthz", handle_healthz),
                          ("/readyz", handle_readyz), ("/status", handle_status), ("/", handle_page)):
        app.router.add_get(path, handler)  # GET and HEAD; anything else is 404/405
    return app
