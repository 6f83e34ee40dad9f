"""What a plugin may use of the running daemon: the narrow context handed to each plugin.

Owns :class:`PluginContext` (the hub, the one publish path, the payload limit, the one
operation on open streams a plugin needs: re-authorising them after its users changed, and
where a plugin's counters and status are read: ``metrics`` and ``report``) and
building it from an application. Plugins receive this object from the composition root
(``wiring``) and never reach into :class:`server.app.State`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hub.hub import Hub
from hub.router import NO_ACL
from server.app import STATE, State
from server.auth import Principal
from server.ingest import Ingest
from server.metrics import Registry

__all__ = ["PluginContext", "Reauthorise", "plugin_context"]

logger = logging.getLogger(__name__)

#: Re-authorises one open stream's principal: its new rights, or None to make it anonymous.
Reauthorise = Callable[[Principal], Principal | None]


@dataclass(frozen=True, slots=True)
class PluginContext:
    """Exactly what plugins use of the daemon."""

    #: routing: presence publishes straight to it and listens to its membership changes
    hub: Hub
    #: the one publish path (stamp, log, route): SQS publishes through it
    ingest: Ingest
    #: the configured limit on an event body, in bytes (``server.max_payload_size``)
    max_payload_size: int
    #: ``reauthorise(kind, fn)``: apply ``fn`` to every open stream whose principal is a
    #: ``kind``; returns (streams checked, streams whose rights changed)
    reauthorise: Callable[[type[Principal], Reauthorise], tuple[int, int]]
    #: where counters are read (``/metrics``, ``/status``): ``metrics.register(obj)`` for an
    #: object with a ``stats()`` (``server.metrics``)
    metrics: Registry
    #: ``report(name, fn)``: ``fn()`` says what the plugin is doing, in ``/status``
    report: Callable[[str, Callable[[], Mapping[str, Any]]], None]


def _reauthorise(state: State, kind: type[Principal], fn: Reauthorise) -> tuple[int, int]:
    """Apply reloaded rights to every open stream of ``kind``; returns (checked, changed).

    A stream is moved to its new hub group in place: it is never dropped, and from the next
    event on it sees exactly what its new rights allow.
    """
    router = state.hub.topics
    checked = changed = 0
    for stream in list(state.streams):
        old = stream.principal
        if not isinstance(old, kind):
            continue  # anonymous, or vouched for by another backend
        checked += 1
        new = fn(old)
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


def plugin_context(app: web.Application) -> PluginContext:
    """The context for plugins of ``app`` (built by :func:`server.app.build_app`)."""
    state = app[STATE]
    return PluginContext(
        hub=state.hub,
        ingest=state.ingest,
        max_payload_size=state.config.server.max_payload_size,
        reauthorise=lambda kind, fn: _reauthorise(state, kind, fn),
        metrics=state.metrics,
        report=state.plugins.__setitem__,
    )
