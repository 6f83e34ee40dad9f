"""Who a request is: the contract between the daemon and its authentication backends.

Owns the :class:`Principal` shape, the Basic-auth header parsing and the allow-list check.
The ACL file and LDAP backends live in ``plugins``; they implement :class:`Authenticator`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Protocol

import netaddr

from hub.router import NO_ACL, Acl

__all__ = ["AllowList", "Authenticator", "NoAuth", "Principal", "parse_basic_auth"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user: the private segments it may read, the secure topics it may publish."""

    user: str
    acl: Acl = NO_ACL
    publish_topics: frozenset[str] = frozenset()


class Authenticator(Protocol):
    async def authenticate(self, username: str, password: str) -> Principal | None:
        """The principal for these credentials, or None when they are wrong or unknown."""


class NoAuth:
    """No users configured: every credential is refused."""

    async def authenticate(self, _username: str, _password: str) -> Principal | None:
        return None


def parse_basic_auth(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic`` header, or None if absent/garbled."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


class AllowList:
    """The publishers' IP allow-list (``clients.payloaders``), IPv4 and IPv6 CIDRs."""

    #: distinct peer addresses remembered; publishers come from few addresses
    CACHE_MAX = 4096

    def __init__(self, nets: netaddr.IPSet) -> None:
        self.nets = nets
        self._cache: dict[str, bool] = {}

    def allows(self, addr: str | None) -> bool:
        if not addr:
            return False
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        try:
            ip = netaddr.IPAddress(addr.split("%", 1)[0])  # without an IPv6 zone (fe80::1%eth0)
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return False
        if ip.is_ipv4_mapped():  # ::ffff:127.0.0.1 from a dual-stack socket
            ip = ip.ipv4()
        ok = ip in self.nets
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        self._cache[addr] = ok
        return ok
