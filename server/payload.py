"""Validating a published body: bytes in, a JSON object out, or a one-line reason.

Pure functions, no HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from server.errors import BadRequest

__all__ = ["parse_json_object"]


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``; raises BadRequest with a one-line reason otherwise."""
    if not body.strip():
        raise BadRequest("empty body: publish a JSON object")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as ue:
            raise BadRequest(f"body is not valid UTF-8 (byte {ue.start})") from None
        try:  # orjson refuses integers beyond 64 bits that are valid JSON
            obj = json.loads(text)
        except ValueError:
            raise BadRequest(f"body is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number")
        raise BadRequest(f"body must be a JSON object, not {kind}")
    return obj
