"""Running the daemon: listening sockets, TLS, signals and an orderly shutdown.

Owns the process lifecycle: SIGTERM/SIGINT → stop accepting, end streams cleanly, close plugins
(flush logs, close backends), exit 0 within ``server.shutdown_grace`` plus a little.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import tempfile
from collections.abc import Callable

from aiohttp import web

from server.app import STATE
from server.config import Config, TlsConfig
from server.errors import ConfigError
from server.fastlane import KEEPALIVE_TIMEOUT, FastLaneSite
from server.gate import GateSite
from server.limits import AcceptErrorLog

__all__ = ["ACCESS_LOG_FORMAT", "make_ssl_context", "serve"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pypubsub.access")

#: peer, request line, status, bytes sent, seconds, user agent
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'
#: pending connections the kernel may queue (bursts of reconnecting subscribers)
LISTEN_BACKLOG = 4096


def make_ssl_context(tls: TlsConfig, file: str) -> ssl.SSLContext:
    """A server context from cert, key and optional chain; errors name the config keys."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert = str(tls.cert)
    tmp: str | None = None
    try:
        if tls.chain is not None:
            # serve the intermediates too: ssl loads a chain only from the certificate file
            fd, tmp = tempfile.mkstemp(prefix="pypubsub-chain-", suffix=".pem")
            with os.fdopen(fd, "wb") as out:
                out.write(tls.cert.read_bytes().rstrip(b"\n") + b"\n" + tls.chain.read_bytes())
            cert = tmp
        ctx.load_cert_chain(certfile=cert, keyfile=str(tls.key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(file, "server.tls.cert/key/chain", f"cannot load certificate: {e}") from None
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return ctx


async def serve(config: Config, app: web.Application,
                on_ready: Callable[[list[str]], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    srv = config.server
    # keepalive_timeout: the fast lane's, so both lanes close an idle connection alike
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT,
                           access_log=access_logger,
                           access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=srv.shutdown_grace)
    ssl_ctx = make_ssl_context(srv.tls, config.file) if srv.tls else None
    await runner.setup()
    limits = app[STATE].limits
    loop.set_exception_handler(AcceptErrorLog(limits))
    sites: list[web.BaseSite] = []
    lanes: list[FastLaneSite] = []
    try:
        for host in srv.bind:
            h = None if host in ("", "*") else host
            if srv.fast_lane:
                lane = FastLaneSite(runner, h, srv.port, app[STATE], backlog=LISTEN_BACKLOG,
                                    reuse_address=True)
                lanes.append(lane)
                sites.append(lane)
            else:
                sites.append(GateSite(runner, h, srv.port, limits, backlog=LISTEN_BACKLOG,
                                      reuse_address=True))
            if srv.tls is not None and ssl_ctx is not None:
                sites.append(GateSite(runner, h, srv.tls.port, limits, ssl_context=ssl_ctx,
                                      backlog=LISTEN_BACKLOG, reuse_address=True))
        for s in sites:
            await s.start()
    except OSError as e:
        logger.error("cannot listen: %s", e)
        await runner.cleanup()
        return 1
    names = [s.name for s in sites]
    logger.info("PyPubSub listening on %s", ", ".join(names))
    if on_ready is not None:
        on_ready(names)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for lane in lanes:
            if lane.lane is not None:
                lane.lane.close_idle()
        await runner.cleanup()
    logger.info("stopped")
    return 0
