"""The systemd notify protocol (``Type=notify``), in a few lines of stdlib.

Owns sending ``READY=1``, ``STOPPING=1``, ``STATUS=...`` and ``WATCHDOG=1`` datagrams to the
socket systemd names in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace),
and the watchdog interval from ``$WATCHDOG_USEC``. Without ``$NOTIFY_SOCKET`` (not started by
systemd) every call does nothing. Knows nothing of the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; a no-op when the service manager did not ask for them."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self._sock: socket.socket | None = None
        self._warned = False
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_usec = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1`` (half the timeout, as sd_notify(3) advises)."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec and self.enabled else None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value``) in one datagram; False when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._warned:  # once: a missing socket would otherwise log every watchdog ping
                self._warned = True
                logger.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
