"""Cross-origin access: which browser origins may read streams and publish, and the headers
that say so.

Owns the rules of ``server.cors_origins`` (a list of origins, or ``"*"``), the CORS response
headers, the answer to a preflight ``OPTIONS``, and the WebSocket ``Origin`` check (a handshake
from a foreign origin is refused: cross-site WebSocket hijacking with cached credentials).
Pure functions on header values; nothing here knows aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PREFLIGHT_HEADERS", "PREFLIGHT_METHODS", "Cors"]

PREFLIGHT_METHODS = "GET, PUT, POST"
PREFLIGHT_HEADERS = "Content-Type, Authorization, Last-Event-ID"
#: response headers a cross-origin script may read (replay reports)
EXPOSE_HEADERS = "X-Fetch-Since-Cursor-Found, X-Fetch-Since-Truncated"
#: seconds a browser may cache a preflight answer
PREFLIGHT_MAX_AGE = 600


def _norm(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Cors:
    """The configured origins; ``("*",)`` allows any origin, never with credentials."""

    __slots__ = ("any", "listed")

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = origins == ("*",)
        self.listed = frozenset() if self.any else frozenset(_norm(o) for o in origins)

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.listed)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or _norm(origin) in self.listed)

    def headers(self, origin: str | None) -> dict[str, str]:
        """Headers for a response to a request from ``origin`` ({} when it is not allowed)."""
        if origin is None or not self.enabled:
            return {}
        if not self.allows(origin):
            return {"Vary": "Origin"}  # the answer depends on Origin: caches must know
        h = {"Access-Control-Allow-Origin": origin.strip(), "Vary": "Origin",
             "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if _norm(origin) in self.listed:  # credentials only for origins named one by one
            h["Access-Control-Allow-Credentials"] = "true"
        return h

    def preflight(self, origin: str | None) -> dict[str, str]:
        """Headers answering a preflight ``OPTIONS`` ({}-ish when ``origin`` is not allowed)."""
        h = self.headers(origin)
        if "Access-Control-Allow-Origin" in h:
            h["Access-Control-Allow-Methods"] = PREFLIGHT_METHODS
            h["Access-Control-Allow-Headers"] = PREFLIGHT_HEADERS
            h["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
        return h

    def websocket_allowed(self, headers: Mapping[str, str], scheme: str) -> bool:
        """May a WebSocket handshake with these request headers proceed?

        No ``Origin`` (not a browser) is allowed; otherwise it must be the daemon's own origin
        (``scheme://Host``) or allowed by ``cors_origins``.
        """
        origin = headers.get("Origin")
        if origin is None:
            return True
        host = headers.get("Host")
        if host is not None and _norm(origin) == _norm(f"{scheme}://{host}"):
            return True
        return self.allows(origin)
