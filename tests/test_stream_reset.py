"""The reset that follows a slow subscriber's close frame: harmless once the connection is gone.

A subscriber over its buffer is sent its format's close record, then its transport is closed and,
``OVERFLOW_CLOSE_GRACE`` later, reset. A peer that took the close in time has ended the
connection by then: the reset must find nothing to do (uvloop's transport then hands out a
socket object whose descriptor is -1, and setting an option on it raises ValueError).
"""

from __future__ import annotations

import asyncio

import uvloop

from server.stream import _reset


def test_a_reset_after_the_connection_ended_does_nothing() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()

        class Peer(asyncio.Protocol):
            def connection_lost(self, _exc: Exception | None) -> None:
                if not lost.done():
                    lost.set_result(None)

        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await loop.create_connection(Peer, "127.0.0.1", port)
            # asked for while the connection is open (as when a connection is set up): uvloop
            # keeps that object and returns it after the end too, with descriptor -1
            assert transport.get_extra_info("socket") is not None
            transport.close()
            await asyncio.wait_for(lost, 5)  # the connection is over: its descriptor is closed
            _reset(transport)  # must not raise
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())
