"""WebSocket subscribers aiohttp serves: the handshake on a subscription path, and the
connection's life. A plain handshake (``negotiate.FAST_WS_HEADERS``, no replay, no credentials)
is the fast lane's instead (:mod:`server.fastws`, the same bytes on the wire); this module serves
every other one: credentials, replay queries, subprotocols, TLS, a fast lane turned off.

Owns the aiohttp :class:`~aiohttp.web.WebSocketResponse` (compression off, protocol pings to
find dead peers, close 1001 at shutdown) and reading what the client sends (nothing is expected:
control frames are answered by aiohttp, anything else is ignored). Events do not go through
aiohttp's writer: the hub writes each group's pre-framed text frames (``server.formats.
WEBSOCKET``) straight to the connection's transport, the same bytes object for every
subscriber, exactly as it does for HTTP streams (``server.stream``).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from hub.router import NO_ACL
from hub.topics import TopicSpec
from server.app import SERVER_HEADER, State, _peer, gap_notice, reauthenticate, replay_request
from server.auth import Principal
from server.errors import BadRequest
from server.fastws import CLOSE_TIMEOUT
from server.formats import WEBSOCKET, WS_GOING_AWAY
from server.stream import Stream, close_stream, open_stream
from server.tasks import cancel_and_wait

__all__ = ["websocket_response"]

logger = logging.getLogger(__name__)

#: a subscriber has nothing to say: a message larger than this is a protocol error
MAX_INCOMING = 4096


async def websocket_response(request: web.Request, state: State, spec: TopicSpec,
                             who: Principal | None, generation: int) -> web.StreamResponse:
    """Serve one WebSocket subscriber until it closes, overflows or the server shuts down."""
    asked = replay_request(request)
    replay = await state.replay(asked) if state.replay is not None else None
    answer = replay.headers if replay is not None else {}
    ws = web.WebSocketResponse(compress=False, autoping=True, heartbeat=state.config.server.ping_interval,
                               timeout=CLOSE_TIMEOUT, max_msg_size=MAX_INCOMING)
    ws.headers.update({"Server": SERVER_HEADER, **answer})
    if replay is not None and not replay.needed:
        replay = None
    try:
        await ws.prepare(request)
    except ValueError:
        # aiohttp refuses a bad handshake with a 400 quoting the header at fault, but fails
        # instead (a 500, a traceback) when that header is not ASCII: a key it cannot decode,
        # a Connection, Upgrade or version it cannot quote. Nothing was written yet.
        raise BadRequest("invalid WebSocket handshake: a header it needs is not ASCII") from None
    transport = request.transport
    if transport is None:
        return ws
    who = await reauthenticate(state, request, who, generation)
    stream = open_stream(state, transport, WEBSOCKET, spec, _peer(request), who,
                         acl=who.acl if who is not None else NO_ACL,
                         preamble=gap_notice(WEBSOCKET, asked, answer), hold=replay is not None)
    why = "gone"
    # one task per subscriber reads what the peer sends (nothing is expected: aiohttp answers
    # pings and the closing handshake); this handler waits for it or for the stream's end
    receiving: asyncio.Task[None] = asyncio.get_running_loop().create_task(
        _drain_incoming(ws, stream), name=f"pypubsub-ws-read-{stream.id}")
    try:
        if replay is not None:
            await replay.run(stream)
            stream.release()
        await asyncio.wait((receiving, stream.done), return_when=asyncio.FIRST_COMPLETED)
        if stream.done.done() and stream.done.result() == "shutdown" and not ws.closed:
            # the closing handshake from this task, never from another one: aiohttp's close()
            # beside a pending receive() closes the connection without waiting for the peer's
            # close frame, which then meets a closed socket, and the peer sees a reset
            await cancel_and_wait(receiving)
            await ws.close(code=WS_GOING_AWAY, message=b"server shutting down")
        else:
            await receiving  # overflow or a vanished peer: the connection is ending
        why = stream.done.result() if stream.done.done() else "gone"
    finally:  # (the handler is cancelled when the connection is lost: teardown comes first)
        close_stream(state, stream, why)
        stream.end(why)
        await cancel_and_wait(receiving)
    return ws


async def _drain_incoming(ws: web.WebSocketResponse, stream: Stream) -> None:
    """Read (and drop) what the peer sends until the connection ends."""
    try:
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                logger.debug("websocket %r: %s", stream, ws.exception())
                break
    except ConnectionError as e:  # a pong (aiohttp's answer to a ping) to a peer gone
        logger.debug("websocket %r: %s", stream, e)
