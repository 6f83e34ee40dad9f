"""Running the daemon: listening sockets, TLS, the admin listener, signals, the drain.

Owns the process lifecycle. Signals: SIGTERM, SIGINT and SIGQUIT drain and exit 0; SIGHUP and
SIGUSR2 reload the ACL (``plugins.auth``); SIGUSR1 logs a one-line status; every other signal
whose default would end the process is logged and ignored, so nothing a user may send ends
the daemon without the clean shutdown. The drain (:func:`drain`): readiness turns 503 at
once and new publishes and streams get 503, the listeners stop accepting, publishes already
under way are answered and delivered,
then the streams end cleanly, a batch at a time over ``server.shutdown_grace`` (thousands of
clients do not all reconnect in the same instant); plugins close (logs flushed); exit 0.
systemd ``Type=notify`` hears READY=1 once every listener is up, STOPPING=1 when the drain
starts and WATCHDOG=1 while the event loop runs (``server.notify``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import Callable

import netaddr
from aiohttp import web

from server.admin import build_admin_app
from server.app import STATE, State
from server.config import Config, TlsConfig
from server.errors import ConfigError
from server.fastlane import KEEPALIVE_TIMEOUT, FastLaneSite, Lane
from server.fastws import CLOSE_TIMEOUT as WS_CLOSE_TIMEOUT
from server.gate import GateSite
from server.limits import AcceptErrorLog
from server.notify import Notifier
from server.tasks import cancel_and_wait

__all__ = ["ACCESS_LOG_FORMAT", "check_binds", "drain", "make_ssl_context", "serve", "status_line"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pypubsub.access")

#: peer, request line, status, bytes sent, seconds, user agent
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'
#: pending connections the kernel may queue (bursts of reconnecting subscribers)
LISTEN_BACKLOG = 4096
#: signals that drain and stop the daemon
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: signals whose default action ends the process and that mean nothing to the daemon: logged
#: and ignored (SIGHUP/SIGUSR2 reload the ACL, SIGUSR1 logs the status; SIGKILL cannot be
#: caught; fault signals such as SIGSEGV are the interpreter's)
IGNORED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGHUP", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
                                       "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGXCPU", "SIGXFSZ")
    if hasattr(signal, name)) + tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
#: share of ``server.shutdown_grace`` publishes under way may take to finish
DRAIN_PUBLISH_SHARE = 0.3
#: share of ``server.shutdown_grace`` over which the drain spreads the end of the streams (the
#: rest is left for the last writes and the plugins)
DRAIN_SPREAD = 0.5
#: seconds between two batches of streams ended by the drain
DRAIN_STEP = 0.05
#: streams ended per batch at least (a few hundred reconnections at once are no storm)
DRAIN_MIN_BATCH = 200


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


def _bind_hosts(binds: tuple[str, ...]) -> list[str | None]:
    return [None if h in ("", "*") else h for h in binds]


def check_binds(config: Config) -> list[ConfigError]:
    """Every ``bind`` host name that does not resolve, as errors naming the key and value."""
    errors = []
    checks = [("server.bind", config.server.bind, config.server.port)]
    if config.server.admin.port is not None:
        checks.append(("server.admin.bind", config.server.admin.bind, config.server.admin.port))
    for key, binds, port in checks:
        for i, host in enumerate(binds):
            if host in ("", "*"):
                continue
            try:
                netaddr.IPAddress(host)
                continue
            except (netaddr.AddrFormatError, ValueError, TypeError):
                pass
            try:
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as e:
                msg = e.strerror if isinstance(e, socket.gaierror) else str(e)
                errors.append(ConfigError(config.file, f"{key}[{i}]" if len(binds) > 1 else key,
                                          f"{host!r} cannot be resolved: {msg}"))
    return errors


def status_line(state: State) -> str:
    """One line saying how the daemon is doing (SIGUSR1)."""
    m = state.metrics.snapshot()

    def num(name: str) -> int:
        v = m.get(name, 0)
        return int(v) if not isinstance(v, dict) else int(sum(v.values()))

    def labelled(name: str) -> str:
        v = m.get(name)
        if not isinstance(v, dict):
            return "none"
        return ", ".join(f"{k} {int(n)}" for k, n in sorted(v.items()) if n) or "none"

    ready = "draining" if state.closing else "ready" if state.unready() is None else "not ready"
    return (f"status: {state.hub.subscriber_count} subscriber(s) ({labelled('subscribers')}); "
            f"{num('events_published_total')} event(s) published, {num('deliveries_total')} "
            f"delivered; disconnects: {labelled('disconnects_total')}; "
            f"refused: {labelled('refused_total')}; backlog {num('backlog_events')} event(s); "
            f"{ready}; up {num('uptime_seconds')} s")


async def drain(state: State, sites: list[web.BaseSite], lanes: list[Lane], grace: float) -> None:
    """Stop accepting, answer and deliver what was received, end the streams spread over
    ``grace`` (see the module docstring). The runner's cleanup does the rest."""
    state.closing = True  # /readyz answers 503 from now; a new stream or publish gets 503
    for site in sites:
        await site.stop()  # closes the listening socket; open connections stay
    for lane in lanes:
        lane.close_idle()
    # publishes under way are answered (and routed) first: an upload still arriving, a commit
    # to a durable log; at most a share of the grace
    try:
        async with asyncio.timeout(max(0.0, grace * DRAIN_PUBLISH_SHARE)):
            if state.publishing:
                await state.publishes_done.wait()
            await state.ingest.settle()
    except TimeoutError:
        logger.warning("draining: %d publish(es) still under way, %d waiting for the log",
                       state.publishing, state.ingest.pending)
    state.hub.topics.flush_now()  # routed batches into the streams' buffers, before they end
    streams = list(state.streams)
    n = len(streams)
    if not n:
        return
    ticks = max(1, int(grace * DRAIN_SPREAD / DRAIN_STEP))
    batch = max(DRAIN_MIN_BATCH, math.ceil(n / ticks))
    logger.info("draining: ending %d stream(s), %d every %.0f ms", n, batch, DRAIN_STEP * 1000)
    for i in range(0, n, batch):
        if i:
            await asyncio.sleep(DRAIN_STEP)
        for s in streams[i:i + batch]:
            s.end("shutdown")
        logger.debug("draining: %d of %d stream(s) ended", min(n, i + batch), n)
    # WebSocket subscribers were sent close 1001: their answers are awaited (aiohttp's are,
    # in its handlers, by the runner's cleanup), so that no peer's close meets a closed socket
    try:
        async with asyncio.timeout(min(grace, WS_CLOSE_TIMEOUT + DRAIN_STEP)):
            for lane in lanes:
                await lane.ws.wait_closed()
    except TimeoutError:
        logger.info("draining: %d WebSocket closing handshake(s) unanswered",
                    sum(len(lane.ws.conns) for lane in lanes))


def _install_signals(loop: asyncio.AbstractEventLoop, state: State, stop: asyncio.Event,
                     caught: list[signal.Signals]) -> list[int]:
    """Handlers for every signal the daemon owns; returns those to remove at the end."""
    installed: list[int] = []

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.info("%s: already stopping", sig.name)
            return
        caught.append(sig)
        stop.set()

    def ignored(sig: int) -> None:
        logger.warning("signal %s received: ignored", _signame(sig))

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop, sig)
        installed.append(sig)
    loop.add_signal_handler(signal.SIGUSR1, lambda: logger.info("%s", status_line(state)))
    installed.append(signal.SIGUSR1)
    for sig in IGNORED_SIGNALS:
        # SIGHUP/SIGUSR2 already belong to the ACL reloader when it runs: leave them to it
        if signal.getsignal(sig) not in (signal.SIG_DFL, None):
            continue
        try:
            loop.add_signal_handler(sig, ignored, sig)
        except (OSError, RuntimeError, ValueError) as e:  # reserved by the C library
            logger.debug("signal %s cannot be handled: %s", _signame(sig), e)
            continue
        installed.append(sig)
    return installed


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}" if sig >= signal.SIGRTMIN else str(sig)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    for _ in iter(int, 1):  # until cancelled
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


async def serve(config: Config, app: web.Application,
                on_ready: Callable[[list[str]], None] | None = None,
                notifier: Notifier | None = None) -> int:
    """Run until SIGTERM/SIGINT/SIGQUIT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    srv = config.server
    state = app[STATE]
    notifier = notifier or Notifier()
    bad = check_binds(config)
    if bad:
        for e in bad:
            logger.error("configuration error: %s", e)
        return 2
    # keepalive_timeout: the fast lane's, so both lanes close an idle connection alike
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT,
                           access_log=access_logger,
                           access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=srv.shutdown_grace)
    admin_runner: web.AppRunner | None = None
    ssl_ctx = make_ssl_context(srv.tls, config.file) if srv.tls else None
    await runner.setup()
    limits = state.limits
    loop.set_exception_handler(AcceptErrorLog(limits))
    sites: list[web.BaseSite] = []
    admin_sites: list[web.BaseSite] = []
    lanes: list[FastLaneSite] = []
    try:
        for h in _bind_hosts(srv.bind):
            if srv.fast_lane:
                lane = FastLaneSite(runner, h, srv.port, state, backlog=LISTEN_BACKLOG,
                                    reuse_address=True)
                lanes.append(lane)
                sites.append(lane)
            else:
                sites.append(GateSite(runner, h, srv.port, limits, backlog=LISTEN_BACKLOG,
                                      reuse_address=True))
            if srv.tls is not None and ssl_ctx is not None:
                sites.append(GateSite(runner, h, srv.tls.port, limits, ssl_context=ssl_ctx,
                                      backlog=LISTEN_BACKLOG, reuse_address=True))
        if srv.admin.port is not None:
            admin_runner = web.AppRunner(build_admin_app(state), access_log=None)
            await admin_runner.setup()
            admin_sites = [web.TCPSite(admin_runner, h, srv.admin.port, reuse_address=True)
                           for h in _bind_hosts(srv.admin.bind)]
        for s in sites + admin_sites:
            await s.start()
    except OSError as e:
        logger.error("cannot listen: %s", e)
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
        return 1
    for lane in lanes:
        if lane.lane is not None:
            state.metrics.register(lane.lane)
    names = [s.name for s in sites]
    logger.info("PyPubSub listening on %s", ", ".join(names))
    if admin_sites:
        logger.info("admin listener (/metrics /healthz /readyz /status /) on %s",
                    ", ".join(s.name for s in admin_sites))
    if on_ready is not None:
        on_ready(names)
    notifier.send("READY=1", f"STATUS=listening on {', '.join(names)}", f"MAINPID={os.getpid()}")
    watchdog = None
    if notifier.watchdog_interval is not None:
        watchdog = loop.create_task(_watchdog(notifier, notifier.watchdog_interval),
                                    name="pypubsub-watchdog")
    stop = asyncio.Event()
    caught: list[signal.Signals] = []
    installed = _install_signals(loop, state, stop, caught)
    try:
        await stop.wait()
        why = caught[0].name if caught else "stop"
        logger.info("%s: draining (server.shutdown_grace %.1f s)", why, srv.shutdown_grace)
        notifier.send("STOPPING=1", "STATUS=draining")
        await drain(state, sites, [ls.lane for ls in lanes if ls.lane is not None], srv.shutdown_grace)
    finally:
        for lane in lanes:
            if lane.lane is not None:
                lane.lane.close_idle()
        await runner.cleanup()  # the plugins stop here: their signal handlers go with them
        if admin_runner is not None:
            await admin_runner.cleanup()
        await cancel_and_wait(watchdog)
        notifier.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
        # from here to the exit, no signal may cut the last log lines short
        for sig in (*STOP_SIGNALS, signal.SIGUSR1, *IGNORED_SIGNALS):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_IGN)
    logger.info("stopped")
    return 0
