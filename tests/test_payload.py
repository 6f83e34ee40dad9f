"""Unit tests of body validation (no sockets): every bad body is a one-line BadRequest."""

from __future__ import annotations

import pytest

from server.errors import BadRequest
from server.payload import MAX_DEPTH, parse_json_object


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"a": "\\ud800"}', "lone surrogate"),
    (b'{"a": "\\udc00x"}', "lone surrogate"),
    (b'{"\\ud800": 1}', "lone surrogate"),  # a key
    (b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}", "deeper than"),
    (b'{"a": ' + b'{"b": ' * 200 + b"1" + b"}" * 200 + b"}", "deeper than"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
    (b"", "empty body"),
    (b"[1]", "not an array"),
    (b"\xff", "not valid UTF-8"),
])
def test_bad_bodies(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_json_object(body)
    assert reason in e.value.reason and "\n" not in e.value.reason


def test_good_bodies() -> None:
    assert parse_json_object(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a valid pair
    deep = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert parse_json_object(deep)["a"]
    many = b'{"a": [' + b",".join([b"[1]"] * 500) + b"]}"  # many brackets, shallow
    assert len(parse_json_object(many)["a"]) == 500


def test_depth_limit_on_the_shortest_body_too_deep() -> None:
    """The shortest object one level too deep is refused (bodies of at most 2 x MAX_DEPTH bytes
    skip counting their brackets: they cannot nest that deep)."""
    too_deep = b'{"":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    assert len(too_deep) == 2 * MAX_DEPTH + 5
    with pytest.raises(BadRequest, match="deeper than"):
        parse_json_object(too_deep)
    short = b'{"a":' + b"[" * 125 + b"]" * 125 + b"}"  # 2 x MAX_DEPTH bytes, accepted
    assert len(short) == 2 * MAX_DEPTH
    assert isinstance(parse_json_object(short)["a"], list)
