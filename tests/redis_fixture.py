"""A real ``redis-server`` on a free loopback port, for the cluster tests.

The process is ours (``--daemonize no``), its files live in the test's temporary directory
(``--dir``, ``--save ''``), and AOF with ``appendfsync always`` is on unless asked otherwise.
Readiness is a ``PING`` answered (through redis-py: TLS and a password alike); every wait is a
condition with a deadline.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from tests.support import HOST, free_port, wait_until

REDIS_SERVER = "redis-server"


class RedisServer:
    """One redis-server process; restartable on the same port and files."""

    def __init__(self, workdir: Path, *, aof: bool = True, tls: bool = False,
                 password: str | None = None, replica_of: int | None = None) -> None:
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            pytest.fail(f"{REDIS_SERVER} is not installed (scripts/install.sh --dev installs it)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"
        self.password = password
        #: a replica of the (plain) Redis on this port until told otherwise (``REPLICAOF NO ONE``)
        self.replica_of = replica_of
        #: with ``tls``: TLS only (no plain port), a certificate for 127.0.0.1 from a test CA
        self.ca_path: Path | None = None
        if tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert(HOST)
            self.ca_path = workdir / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_path))
            cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
            cert.private_key_pem.write_to_path(str(workdir / "key.pem"))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.ca_path is not None:
            return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={self.ca_path}"
        return f"redis://{auth}{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        listen = ["--port", str(self.port)]
        if self.ca_path is not None:  # TLS only: no plain port
            listen = ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", str(self.workdir / "cert.pem"),
                      "--tls-key-file", str(self.workdir / "key.pem"),
                      "--tls-ca-cert-file", str(self.ca_path), "--tls-auth-clients", "no"]
        args = [self.binary, *listen, "--bind", HOST, "--dir", str(self.workdir),
                "--save", "", "--daemonize", "no", "--logfile", str(self.log_path)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.replica_of is not None:
            args += ["--replicaof", HOST, str(self.replica_of)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            return self._ping()

        wait_until(up, 10, "redis-server to answer PING")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _ping(self) -> bool:
        try:
            with redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections but answers nothing (a hung server)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server (AOF, appendfsync always), stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def stream_entries(client: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of ``stream``: (id, fields), as redis-py returns them without decoding."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
