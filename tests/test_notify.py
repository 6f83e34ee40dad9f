"""systemd Type=notify: the daemon tells its own NOTIFY_SOCKET READY=1, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.notify import Notifier
from tests.support import HOST, DaemonFactory


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        yield sock, path
    finally:
        sock.close()


def messages_until(sock: socket.socket, want: str) -> list[dict[str, str]]:
    """Datagrams received until one holds ``want`` (``KEY=value``), as dicts."""
    seen = []
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        seen.append(fields)
        key, _, value = want.partition("=")
        if fields.get(key) == value:
            return seen


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((HOST, port))
        except OSError:
            return False
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 204")


def test_ready_watchdog_and_stopping(daemon_factory: DaemonFactory,
                                     notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    d = daemon_factory(start=False, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    d.start(wait=False)
    msgs = messages_until(sock, "READY=1")
    assert port_answers(d.port)  # READY=1 is sent once the listener is up
    ready = msgs[-1]
    assert ready["STATUS"].startswith("listening on http://127.0.0.1:")
    assert d.proc is not None and ready["MAINPID"] == str(d.proc.pid)
    messages_until(sock, "WATCHDOG=1")
    messages_until(sock, "WATCHDOG=1")  # again: a timer, not a one-off
    d.signal(signal.SIGTERM)
    messages_until(sock, "STOPPING=1")
    assert d.proc.wait(10) == 0


def test_watchdog_for_another_pid_is_not_ours(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
    n = Notifier({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "1000000"})
    assert n.address == "\0abstract" and n.watchdog_interval == 0.5


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.send("READY=1") is False


def test_an_absent_socket_is_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert n.send("READY=1") is False
    assert n.send("WATCHDOG=1") is False
    n.close()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1
