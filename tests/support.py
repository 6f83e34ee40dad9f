"""Test support: the real daemon as a subprocess on a free loopback port, and small clients.

Every wait here is a condition polled with a deadline, never a sleep used as synchronisation.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"


#: the lowest port free_port() hands out when it can stay below the ephemeral range
PORTS_FROM = 10000
#: ports handed out lately: not handed out again before their server had time to take them
_recent: collections.deque[int] = collections.deque(maxlen=512)


def _ephemeral_low() -> int:
    """The kernel's lowest port for the source of outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = HOST) -> int:
    """A port free on ``host`` for a server a test starts, below the kernel's ephemeral range:
    a port in that range may be taken meanwhile as the source port of an outgoing connection
    (one to that very port while nothing listens there connects to itself), and a server
    started or restarted on it then fails with "address already in use"."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    for _ in range(200 if low - PORTS_FROM >= 1000 else 0):
        port = random.randrange(PORTS_FROM, low)
        if port in _recent:
            continue
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _recent.append(port)
        return port
    with socket.socket(fam, socket.SOCK_STREAM) as s:  # no room below the range: any free port
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


async def await_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def base_config(port: int, **server: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"port": port, "bind": HOST, "max_payload_size": 102400,
                   "backlog": {"size": 0, "max_age": 0}},
        "clients": {"payloaders": ["127.0.0.0/8", "::1/128"], "oldschoolers": ["svnwcsub"]},
    }
    cfg["server"].update(server)
    return cfg


class Daemon:
    """``pypubsub.py`` in a subprocess, with its log in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None = None,
                 acl: dict[str, Any] | None = None, args: list[str] | None = None,
                 port: int | None = None, env: dict[str, str] | None = None,
                 nofile: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = config if config is not None else base_config(self.port)
        self.config.setdefault("server", {}).setdefault("port", self.port)
        self.config_path = workdir / "pypubsub.yaml"
        self.acl_path = workdir / "pypubsub_acl.yaml"
        self.log_path = workdir / "daemon.log"
        self.args = args or []
        self.env = env or {}
        #: the daemon's soft RLIMIT_NOFILE (None: inherited)
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.write_files(acl)

    def write_files(self, acl: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))
        if acl is not None or not self.acl_path.exists():
            self.acl_path.write_text(yaml.safe_dump(acl or {}))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, wait: bool = True) -> Daemon:
        self._log_offset = len(self.log())  # a restart waits for its own "listening" line
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [PYTHON, str(ROOT / "pypubsub.py"), "--config", str(self.config_path),
             "--acl", str(self.acl_path), "--log-level", "debug", *self.args],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=self._limit_files if self.nofile is not None else None)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def _limit_files(self) -> None:
        """In the child, before exec: lower the soft open-file limit."""
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile or 0, hard))

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return "PyPubSub listening on" in self.log()[self._log_offset:]
        wait_until(ready, timeout, "daemon to listen")

    def restart(self) -> None:
        """Stop (it must exit 0) and start again on the same port, files and log."""
        rc = self.stop()
        if rc != 0:
            raise RuntimeError(f"daemon exited {rc} on restart:\n{self.log()[-3000:]}")
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        wait_until(lambda: self.log().count(text) >= count, timeout, f"log line {text!r}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise RuntimeError(f"daemon did not stop within {timeout}s:\n{self.log()[-3000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


#: the type of the ``daemon_factory`` fixture
DaemonFactory = Callable[..., Daemon]


async def put(d: Daemon, path: str, body: dict[str, Any]) -> None:
    """Publish ``body`` and require the 202."""
    status, text = await publish(d.url, path, body)
    assert status == 202, text


def auth_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def publish(url: str, path: str, body: Any = None, *, data: bytes | None = None,
                  method: str = "PUT", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Publish and return (status, text)."""
    if data is None:
        data = json.dumps(body if body is not None else {}).encode()
    async with aiohttp.ClientSession() as s, s.request(method, url + path, data=data,
                                                       headers=headers) as r:
        return r.status, await r.text()


class Subscription:
    """A streaming GET read line by line; pings are kept apart from events."""

    def __init__(self, resp: aiohttp.ClientResponse, session: aiohttp.ClientSession) -> None:
        self.resp = resp
        self.session = session
        self.pings: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    async def next(self, timeout: float = 5.0, pings: bool = False) -> dict[str, Any]:
        """The next event (or ping when ``pings``); TimeoutError if none in time."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event in time")
            line = await asyncio.wait_for(self.resp.content.readline(), left)
            if not line:
                raise EOFError("stream ended")
            obj = json.loads(line)
            if "stillalive" in obj:
                self.pings.append(obj)
                if pings:
                    return obj  # type: ignore[no-any-return]
                continue
            self.events.append(obj)
            return obj  # type: ignore[no-any-return]

    async def expect_none(self, within: float = 0.5) -> None:
        """Assert that no event arrives within ``within`` seconds (pings are ignored)."""
        try:
            ev = await self.next(within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event {ev}")


@contextlib.asynccontextmanager
async def subscribe(url: str, path: str,
                    headers: dict[str, str] | None = None) -> AsyncIterator[Subscription]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        resp = await s.get(url + path, headers=headers)
        try:
            yield Subscription(resp, s)
        finally:
            resp.close()


async def subscriber_count(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.head(url + "/") as r:
        return int(r.headers.get("X-Subscribers", "-1"))


async def wait_subscribers(url: str, n: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while True:
        c = await subscriber_count(url)
        if c == n:
            return
        if time.monotonic() > end:
            raise TimeoutError(f"expected {n} subscribers, have {c}")
        await asyncio.sleep(0.01)
