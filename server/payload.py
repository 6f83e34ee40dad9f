"""Validating a published body: bytes in, a JSON object out, or a one-line reason.

Pure functions, no HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from server.errors import BadRequest

__all__ = ["MAX_DEPTH", "parse_json_object"]

#: deepest nesting of arrays and objects accepted: the event is re-encoded (and later decoded
#: by clients) with recursive encoders that fail near 1 000 levels; real events are shallow
MAX_DEPTH = 128


def _check(obj: Any, strings: bool) -> None:
    """Refuse nesting deeper than MAX_DEPTH, and (``strings``) strings that are not Unicode
    text (a lone surrogate decoded from ``\\ud800``: it cannot be encoded as UTF-8)."""
    todo: list[tuple[Any, int]] = [(obj, 1)]
    while todo:
        o, depth = todo.pop()
        if isinstance(o, dict):
            items: Any = o.values()
            if strings:
                for k in o:
                    _utf8(k)
        elif isinstance(o, list):
            items = o
        else:
            if strings and isinstance(o, str):
                _utf8(o)
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"body nests arrays/objects deeper than {MAX_DEPTH} levels")
        todo.extend((v, depth + 1) for v in items)


def _utf8(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"body is not valid JSON: lone surrogate \\u{ord(s[e.start]):04x} "
                             "in a string") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``; raises BadRequest with a one-line reason otherwise."""
    if not body.strip():
        raise BadRequest("empty body: publish a JSON object")
    strings = False
    try:
        obj = orjson.loads(body)  # refuses lone surrogates and invalid UTF-8 itself
    except orjson.JSONDecodeError as e:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as ue:
            raise BadRequest(f"body is not valid UTF-8 (byte {ue.start})") from None
        try:  # orjson refuses integers beyond 64 bits that are valid JSON
            obj = json.loads(text)
        except (ValueError, RecursionError):
            raise BadRequest(f"body is not valid JSON: {str(e).splitlines()[0]}") from None
        strings = True  # the stdlib decoder accepts lone surrogates: look for them
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number")
        raise BadRequest(f"body must be a JSON object, not {kind}")
    # only a body with more brackets than MAX_DEPTH can nest that deep: most skip the walk (and
    # valid JSON that deep has as many closing brackets: a shorter body needs no count)
    if strings or (len(body) > 2 * MAX_DEPTH and body.count(b"[") + body.count(b"{") > MAX_DEPTH):
        _check(obj, strings)
    return obj
