"""The aiohttp application: thin handlers adapting HTTP to the hub, the ingest path and auth.

Owns request dispatch (GET streams in every format, the live page and WebSocket handshakes,
PUT/POST publish, HEAD health, CORS preflight, 405 otherwise), mapping
:class:`~server.errors.PubSubError` to one-line text responses, and the app's state keys.
Topic rules, formats (``server.formats``), CORS rules, validation and routing live in pure
modules; this file only adapts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from hub.hub import Hub
from hub.router import NO_ACL
from hub.topics import TopicError, TopicSpec
from server import __version__
from server.auth import AllowList, Authenticator, NoAuth, Principal, parse_basic_auth
from server.config import Config
from server.cors import Cors
from server.errors import BadRequest, Forbidden, PayloadTooLarge, PubSubError, ServiceUnavailable
from server.eventlog import EventLog, MemoryLog
from server.formats import FORMATS, STREAM_CONTENT_TYPE, StreamFormat, stream_format, wire_format
from server.ingest import Ingest
from server.limits import Limits
from server.logs import access_log_flusher, log_access
from server.metrics import Registry, StatsSource
from server.negotiate import Decision, Outcome, negotiate
from server.negotiate import StreamFormat as Requested
from server.page import load_page, page_response
from server.payload import parse_json_object
from server.replay import CURSOR_FOUND_HEADER, CURSOR_HEADER, SINCE_HEADER, TRUNCATED_HEADER, ReplayHook
from server.stream import Stream, StreamStats, close_stream, open_stream, stream_head
from server.target import publish_target, subscription_target
from server.tasks import cancel_and_wait

__all__ = ["ACCEPTED_TEXT", "SERVER_HEADER", "STATE", "STREAM_CONTENT_TYPE", "State", "build_app",
           "wire_format"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pypubsub.access")

SERVER_HEADER = f"PyPubSub/{__version__}"
#: 0.7.4's answer to an accepted publish; scripts grep for it
ACCEPTED_TEXT = "Payload received, thank you very much!\n"
ALLOW = "GET, HEAD, PUT, POST"
#: the request header an EventSource sends when it reconnects (the last ``id:`` it saw)
LAST_EVENT_ID_HEADER = "Last-Event-ID"
#: query parameters with the meaning of X-Fetch-Since-Cursor / X-Fetch-Since (a browser cannot
#: set headers on a WebSocket or on an EventSource's first request)
QUERY_CURSOR = "last_event_id"
QUERY_SINCE = "since"


@dataclass
class State:
    """Everything the handlers share; one per application."""

    config: Config
    hub: Hub
    log: EventLog
    ingest: Ingest
    allow: AllowList
    auth: Authenticator = field(default_factory=NoAuth)
    stats: StreamStats = field(default_factory=StreamStats)
    streams: dict[Stream, None] = field(default_factory=dict)
    #: plans a backlog replay from a subscriber's headers (server.replay); None: no replay
    replay: ReplayHook | None = None
    #: True once shutdown began: new streams and new publishes are refused (503); publishes
    #: already under way are finished, and delivered before the streams end
    closing: bool = False
    #: bumped by every ACL reload (after it re-authorised the open streams)
    auth_generation: int = 0
    #: requests refused, by status code (every PubSubError answered by ``dispatch``)
    rejected: dict[int, int] = field(default_factory=dict)
    cors: Cors = field(default_factory=lambda: Cors(()))
    #: open connections and refusals, kept by both lanes (server.limits)
    limits: Limits = field(default_factory=Limits)
    #: requests whose credentials did not authenticate
    auth_failures: int = 0
    #: every part that counts registers here (``server.metrics``); read by /metrics and /status
    metrics: Registry = field(default_factory=Registry)
    #: checks that say why a publish cannot be accepted now (None: it can); /readyz reads them
    readiness: list[Callable[[], str | None]] = field(default_factory=list)
    #: name → what that part reports about itself for /status (state, counts, settings)
    plugins: dict[str, Callable[[], Mapping[str, Any]]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: publishes being handled by aiohttp now (the drain lets them finish); set when it drops to 0
    publishing: int = 0
    publishes_done: asyncio.Event = field(default_factory=asyncio.Event)

    def forget(self, stream: Stream, why: str) -> None:
        """A stream has ended: out of the hub and of the open-stream set (idempotent)."""
        if stream.group is not None:
            self.hub.topics.unsubscribe(stream, stream.group)
        if stream in self.streams:
            del self.streams[stream]
            ended = self.stats.ended
            ended[why] = ended.get(why, 0) + 1
        logger.debug("stream %r ended: %s", stream, why)

    def subscribers_by_transport(self) -> dict[str, float]:
        """Open subscriptions per transport (stream format; ``inprocess``: key subscriptions)."""
        out: dict[str, float] = dict.fromkeys(FORMATS, 0)
        for g in self.hub.topics.groups():
            out[g.fmt.name] = out.get(g.fmt.name, 0) + len(g.sinks)
        out["inprocess"] = self.hub.key_subscription_count
        return out

    def unready(self) -> str | None:
        """Why a publish cannot be accepted now, or None."""
        if self.closing:
            return "draining for shutdown"
        for check in self.readiness:
            why = check()
            if why is not None:
                return why
        return None


class StateStats:
    """The daemon-wide counters of a :class:`State` (``server.metrics`` protocol)."""

    def __init__(self, state: State) -> None:
        self.state = state

    def stats(self) -> dict[str, float | dict[str, float]]:
        st = self.state
        return {"subscribers": st.subscribers_by_transport(),
                "refused_total": {str(k): v for k, v in st.rejected.items()},
                "auth_failures_total": st.auth_failures,
                "publishes_in_progress": st.publishing,
                "uptime_seconds": time.time() - st.started,
                "draining": 1 if st.closing else 0}


STATE: web.AppKey[State] = web.AppKey("pypubsub_state", State)


def log_stream_end(peer: str, request_line: str, started: float, ua: str) -> None:
    """The access line of a stream, written when it ends (by us: aiohttp logs none for it)."""
    log_access(peer, request_line, 200, "-", time.monotonic() - started, ua)


# -- helpers ------------------------------------------------------------------------------------
def _peer(request: web.Request) -> str:
    return request.remote or "?"


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={"Server": SERVER_HEADER, **headers})


async def _principal(state: State, request: web.Request) -> Principal | None:
    """The authenticated user, None for anonymous.

    Wrong credentials also give None, never a 401: the subscriber gets the public stream as an
    anonymous one would, and cannot tell from the answer whether its credentials were good
    (0.7.4 did the same; asfpy's legacy Listener would reconnect in a tight loop on a refusal).
    The failure is logged for the operator.
    """
    creds = parse_basic_auth(request.headers.get("Authorization"))
    if creds is None:
        return None
    who = await state.auth.authenticate(*creds)
    if who is None:
        state.auth_failures += 1
        logger.info("authentication failed for user %r from %s", creds[0][:64], _peer(request))
    return who


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes actually read (chunked included)."""
    cl = request.content_length
    if cl is not None and cl > limit:
        raise PayloadTooLarge(f"payload of {cl} bytes exceeds max_payload_size ({limit} bytes)")
    if cl is not None:
        return await request.content.readexactly(cl) if cl else b""
    parts: list[bytes] = []
    n = 0
    async for chunk in request.content.iter_any():
        n += len(chunk)
        if n > limit:
            raise PayloadTooLarge(f"payload exceeds max_payload_size ({limit} bytes)")
        parts.append(chunk)
    return b"".join(parts)


def replay_request(request: web.Request) -> Mapping[str, str]:
    """The request's headers as the replay planner reads them: ``Last-Event-ID`` and the
    ``last_event_id`` / ``since`` query parameters become X-Fetch-Since-Cursor / X-Fetch-Since
    (an explicit X-Fetch-* header wins, then Last-Event-ID, then the query)."""
    h = request.headers
    q = request.rel_url.query
    if (LAST_EVENT_ID_HEADER not in h and QUERY_CURSOR not in q and QUERY_SINCE not in q):
        return h
    out = CIMultiDict(h)
    if CURSOR_HEADER not in out:
        cursor = h.get(LAST_EVENT_ID_HEADER) or q.get(QUERY_CURSOR)
        if cursor:
            out[CURSOR_HEADER] = cursor
    if SINCE_HEADER not in out and q.get(QUERY_SINCE):
        out[SINCE_HEADER] = q[QUERY_SINCE]
    return out


def gap_notice(fmt: StreamFormat, replay_headers: Mapping[str, str], answer: Mapping[str, str]) -> bytes:
    """The in-band gap notice (SSE ``event: gap``, a WebSocket ``pubsub_gap`` frame) for a replay
    that cannot be gap-free: an unknown or evicted cursor, or a replay cut to max_replay."""
    if answer.get(CURSOR_FOUND_HEADER) == "false":
        return fmt.notice("gap", {"last_event_id": replay_headers.get(CURSOR_HEADER, ""),
                                  "reason": "unknown or evicted cursor: continuing live"})
    if answer.get(TRUNCATED_HEADER) == "true":
        return fmt.notice("gap", {"reason": "more events than max_replay: the oldest were skipped"})
    return b""


# -- handlers -----------------------------------------------------------------------------------
async def handle_publish(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.publishing += 1
    state.publishes_done.clear()
    try:
        return await _publish(request, state)
    finally:
        state.publishing -= 1
        if not state.publishing:
            state.publishes_done.set()


async def _publish(request: web.Request, state: State) -> web.StreamResponse:
    if state.closing:
        raise ServiceUnavailable("server is shutting down", retry_after=5)
    cfg = state.config
    peer = _peer(request)
    try:
        target = publish_target(request.raw_path, cfg.clients.secure_topics)
    except TopicError as e:
        raise BadRequest(str(e)) from None
    if not state.allow.allows(peer):
        raise Forbidden(f"publishing is not allowed from {peer}")
    secure = target.secure
    if secure:
        who = await _principal(state, request)
        missing = secure - who.publish_topics if who else secure
        if missing:
            names = ", ".join(sorted(missing))
            raise Forbidden(f"publishing to secure topic(s) {names} needs credentials that grant them")
    body = await _read_body(request, cfg.server.max_payload_size)
    obj = parse_json_object(body)
    await state.ingest.submit(target.path, obj, source=peer)
    return _text(202, ACCEPTED_TEXT)


async def handle_subscribe(request: web.Request, decision: Decision) -> web.StreamResponse:
    """A ``GET`` on a subscription path, in the format ``negotiate()`` read from the request."""
    state = request.app[STATE]
    if state.closing:
        return _text(503, "server is shutting down\n", **{"Retry-After": "5"})
    try:
        spec = subscription_target(request.raw_path)
    except TopicError as e:
        raise BadRequest(str(e)) from None
    version = (request.version.major, request.version.minor)
    kind = decision.format or Requested.NDJSON
    if kind is Requested.PAGE:
        page = page_response(SERVER_HEADER)
        if page is not None:
            return page
        kind = Requested.NDJSON  # the page's files are missing: what browsers got before it
    fmt = stream_format(kind, version, request.headers.get("User-Agent"),
                        state.config.clients.oldschoolers)
    if kind is Requested.WEBSOCKET and not state.cors.websocket_allowed(request.headers, request.scheme):
        raise Forbidden(f"WebSocket handshake from origin {request.headers.get('Origin', '')[:100]!r} "
                        "is not allowed (server.cors_origins)")
    generation = state.auth_generation
    who = await _principal(state, request)
    if kind is Requested.WEBSOCKET:
        from server.websocket import websocket_response
        return await websocket_response(request, state, spec, who, generation)
    return await stream_response(request, state, spec, fmt, who, generation)


#: re-authentications of one stream while ACL reloads keep landing during its set-up
MAX_REAUTH = 5


async def reauthenticate(state: State, request: web.Request, who: Principal | None,
                         generation: int) -> Principal | None:
    """An ACL reload re-authorises the streams in state.streams; one that landed while this
    request was being set up missed this one: authenticate again (bounded)."""
    for _ in range(MAX_REAUTH):
        if state.auth_generation == generation:
            break
        generation = state.auth_generation
        who = await _principal(state, request)
    return who


async def stream_response(request: web.Request, state: State, spec: TopicSpec, fmt: StreamFormat,
                          who: Principal | None, generation: int) -> web.StreamResponse:
    """Serve one HTTP subscriber (NDJSON, svnpubsub, SSE) until it leaves, overflows or the
    server shuts down."""
    # plan the replay first: its headers (cursor found?) must go out with the response's
    asked = replay_request(request)
    replay = await state.replay(asked) if state.replay is not None else None
    answer = replay.headers if replay is not None else {}
    resp = web.StreamResponse(status=200, headers=CIMultiDict(stream_head(fmt, SERVER_HEADER, answer)))
    if fmt.chunked:
        resp.enable_chunked_encoding()
    else:
        resp.force_close()  # HTTP/1.0: the body ends when the connection closes
    if replay is not None and not replay.needed:
        replay = None
    await resp.prepare(request)
    transport = request.transport
    if transport is None:  # the client left while we answered
        return resp
    who = await reauthenticate(state, request, who, generation)
    stream = open_stream(state, transport, fmt, spec, _peer(request), who,
                         acl=who.acl if who is not None else NO_ACL,
                         preamble=gap_notice(fmt, asked, answer), hold=replay is not None)
    why = "gone"
    started = time.monotonic()
    try:
        if replay is not None:
            await replay.run(stream)
            stream.release()
        why = await stream.done
    finally:
        close_stream(state, stream, why, end_record=False)  # resp.write_eof() ends it
        if why == "gone":  # aiohttp logs no access line for a cancelled handler: we do
            v = request.version
            log_stream_end(stream.peer, f"{request.method} {request.raw_path} HTTP/{v.major}.{v.minor}",
                           started, request.headers.get("User-Agent", "-"))
    if why == "shutdown" and stream.transport is not None and not stream.transport.is_closing():
        try:
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            logger.debug("stream %r: client left during shutdown", stream)
    return resp


async def handle_options(request: web.Request) -> web.StreamResponse:
    """A CORS preflight from an allowed origin; anything else is refused as before CORS."""
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    if "Access-Control-Request-Method" not in request.headers or not state.cors.allows(origin):
        return _text(405, "method OPTIONS not allowed\n", Allow=ALLOW)
    return web.Response(status=204, headers={"Server": SERVER_HEADER, "Allow": ALLOW,
                                             **state.cors.preflight(origin)})


async def handle_head(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    headers = {"Server": SERVER_HEADER}
    if state.config.server.subscriber_header:
        headers["X-Subscribers"] = str(state.hub.subscriber_count)
    return web.Response(status=204, headers=headers)


HANDLERS: dict[Outcome, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    Outcome.PUBLISH: handle_publish,
    Outcome.HEAD: handle_head,
}


async def dispatch(request: web.Request) -> web.StreamResponse:
    """One entry for every request: pick the handler, map refusals to one-line answers."""
    v = request.version
    decision = negotiate(request.method.encode(), f"{v.major}.{v.minor}",
                         {k.lower(): val for k, val in request.raw_headers})
    try:
        if decision.outcome is Outcome.BAD:
            raise BadRequest(decision.reason)
        if decision.outcome is Outcome.STREAM:
            return await handle_subscribe(request, decision)
        if decision.outcome is Outcome.OTHER and request.method == "OPTIONS":
            return await handle_options(request)
        handler = HANDLERS.get(decision.outcome)
        if handler is None:
            return _text(405, f"method {request.method} not allowed\n", Allow=ALLOW)
        return await handler(request)
    except PubSubError as e:
        state = request.app[STATE]
        state.rejected[e.status] = state.rejected.get(e.status, 0) + 1
        logger.info("%s %s %s from %s: %s", e.status, request.method, request.raw_path[:200],
                    _peer(request), e.reason)
        if isinstance(e, ServiceUnavailable) and e.retry_after is not None:
            return _text(e.status, e.reason + "\n", **{"Retry-After": str(e.retry_after)})
        return _text(e.status, e.reason + "\n")
    except asyncio.IncompleteReadError:
        logger.info("400 %s %s from %s: body shorter than Content-Length", request.method,
                    request.raw_path[:200], _peer(request))
        return _text(400, "body shorter than Content-Length\n")


# -- lifecycle inside the app -------------------------------------------------------------------
#: keep-alive ticks per ``ping_interval``
PING_SLICES = 8


def _ping(fmt: StreamFormat, now: float) -> bytes:
    return fmt.keepalive(now)


async def _cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """CORS headers on every answer (streams, SSE, publishes, refusals) to an allowed origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    state = request.app[STATE]  # type: ignore[attr-defined]
    for k, v in state.cors.headers(origin).items():
        if k == "Vary" and "Vary" in response.headers:
            if "origin" not in response.headers["Vary"].lower():
                response.headers["Vary"] = response.headers["Vary"] + ", Origin"
            continue
        response.headers.setdefault(k, v)


async def _pinger(app: web.Application) -> AsyncIterator[None]:
    """Owns the keep-alive task: one timer for all streams, bytes built once per format.

    It ticks PING_SLICES times per interval and pings only the streams that would otherwise stay
    silent for a whole interval: busy streams are not pinged, idle ones are pinged less than
    ``ping_interval`` after their last write, and the pings spread over the interval."""
    state = app[STATE]
    interval = state.config.server.ping_interval
    step = interval / PING_SLICES

    async def loop() -> None:
        for _ in iter(int, 1):  # runs until cancelled
            await asyncio.sleep(step)
            state.hub.topics.ping_idle(functools.partial(_ping, now=time.time()), interval, step)

    task = asyncio.get_running_loop().create_task(loop(), name="pypubsub-pinger")
    yield
    await cancel_and_wait(task)


async def _eventlog(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.log.start()
    yield
    await state.log.close()


async def _end_streams(app: web.Application) -> None:
    """Shutdown step: refuse new streams, end the open ones cleanly (terminating chunk)."""
    state = app[STATE]
    state.closing = True
    n = len(state.streams)
    for s in list(state.streams):
        s.end("shutdown")
    if n:
        logger.info("ending %d stream(s) for shutdown", n)


def build_app(config: Config, *, log: EventLog | None = None, auth: Authenticator | None = None,
              hub: Hub | None = None) -> web.Application:
    """The application for ``config``; plugins add themselves to its cleanup_ctx."""
    hub = hub or Hub()
    log = log or MemoryLog(config.server.backlog.size, config.server.backlog.max_age)
    state = State(config=config, hub=hub, log=log, ingest=Ingest(hub, log),
                  allow=AllowList(config.clients.payloaders), auth=auth or NoAuth(),
                  cors=Cors(config.server.cors_origins),
                  limits=Limits(config.server.max_connections, config.server.max_connections_per_ip,
                                config.server.header_timeout))
    app = web.Application(client_max_size=config.server.max_payload_size + 1, handler_args={
        "max_field_size": 16384, "max_line_size": 16384})
    app[STATE] = state
    for source in (StateStats(state), state.stats, hub.topics, state.ingest, state.limits):
        state.metrics.register(source)
    if isinstance(log, StatsSource):
        state.metrics.register(log)
    state.plugins["backlog"] = lambda: {"backend": type(log).__name__,
                                        "size": config.server.backlog.size,
                                        "storage": str(config.server.backlog.storage or "")}
    unready = getattr(log, "unready", None)
    if unready is not None:
        state.readiness.append(unready)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    load_page()  # read once at start (a missing file is logged now, not at the first visit)
    app.cleanup_ctx.append(access_log_flusher)
    app.cleanup_ctx.append(_eventlog)
    app.cleanup_ctx.append(_pinger)
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(_cors_headers)
    return app
