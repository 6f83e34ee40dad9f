"""The daemon's small error hierarchy: each error carries the HTTP status it maps to.

Handlers raise these; one middleware (``server.app``) turns them into a one-line text response
and a log line. Nothing here knows aiohttp.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ConfigError",
    "Forbidden",
    "PayloadTooLarge",
    "PubSubError",
    "ServiceUnavailable",
    "Unauthorized",
]


class PubSubError(Exception):
    """A request the daemon refuses; ``status`` is the HTTP status hint."""

    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(PubSubError):
    status = 400


class Unauthorized(PubSubError):
    status = 401


class Forbidden(PubSubError):
    status = 403


class PayloadTooLarge(PubSubError):
    status = 413


class ServiceUnavailable(PubSubError):
    status = 503

    def __init__(self, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        #: seconds for the ``Retry-After`` header (None: not sent)
        self.retry_after = retry_after


class ConfigError(Exception):
    """A configuration problem, naming the file and the key."""

    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file = file
        self.key = key
        self.message = message
