"""SQS plugin, pure parts: config parsing, message decoding, bounded dedup, backoff."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from plugins.sqs import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_WAIT_SECONDS,
    Backoff,
    BadMessage,
    QueueConfig,
    SeenIds,
    build,
    decode_message,
    parse_sqs_config,
)
from server.config import Section, parse_config
from server.errors import ConfigError


def parse(data: Any) -> tuple[QueueConfig, ...]:
    return parse_sqs_config(Section(data, "test.yaml", "sqs"))


def test_074_format_parses() -> None:
    (q,) = parse({"main": {"queue": "events", "region": "us-east-1", "delete": True,
                           "key": "AKIA", "secret": "s3cr3t"}})
    assert q == QueueConfig(name="main", queue="events", region="us-east-1", delete=True,
                            key="AKIA", secret="s3cr3t")
    assert q.wait_seconds == DEFAULT_WAIT_SECONDS
    assert q.dedup_size == DEFAULT_DEDUP_SIZE
    assert not q.queue_is_url


def test_new_keys_and_several_queues() -> None:
    a, b = parse({
        "a": {"queue": "http://127.0.0.1:9324/000/a", "endpoint_url": "http://127.0.0.1:9324",
              "wait_seconds": 0, "max_backoff": "2m", "dedup_size": 10},
        "b": {"queue": "b", "region": "eu-west-1"},
    })
    assert a.queue_is_url and a.endpoint_url == "http://127.0.0.1:9324"
    assert (a.wait_seconds, a.max_backoff, a.dedup_size, a.delete) == (0, 120.0, 10, False)
    assert a.key is None and a.secret is None
    assert b.name == "b" and b.region == "eu-west-1"


@pytest.mark.parametrize(("entry", "key"), [
    ({}, "sqs.main.queue"),
    ({"queue": "q", "wait_seconds": 21}, "sqs.main.wait_seconds"),
    ({"queue": "q", "wait_seconds": "long"}, "sqs.main.wait_seconds"),
    ({"queue": "q", "delete": "yes"}, "sqs.main.delete"),
    ({"queue": "q", "key": "only-key"}, "sqs.main.secret"),
    ({"queue": "q", "secret": "only-secret"}, "sqs.main.key"),
    ({"queue": "q", "endpoint_url": "localhost:4566"}, "sqs.main.endpoint_url"),
    ({"queue": "q", "dedup_size": 0}, "sqs.main.dedup_size"),
    ({"queue": "q", "max_backoff": 0.1}, "sqs.main.max_backoff"),
])
def test_bad_entries_name_the_key(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse({"main": entry})
    assert ei.value.file == "test.yaml"
    assert ei.value.key == key


def test_section_must_name_a_queue() -> None:
    with pytest.raises(ConfigError, match="names no queue"):
        parse({})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse({"main": "events"})


def test_unknown_key_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse({"main": {"queue": "q", "visibility": 3}})
    assert "sqs.main.visibility" in caplog.text


def test_decode_message_paths() -> None:
    assert decode_message('{"pubsub_path": "/a/b", "x": 1}', 1000) == (
        "/a/b", {"pubsub_path": "/a/b", "x": 1})
    assert decode_message('{"x": 1}', 1000) == ("/", {"x": 1})
    assert decode_message('{"pubsub_path": null}', 1000)[0] == "/"
    assert decode_message('{"pubsub_path": "private/a"}', 1000)[0] == "/private/a"
    assert decode_message('{"pubsub_path": "/private/a/b"}', 1000)[0] == "/private/a/b"


def test_decode_message_does_not_mutate() -> None:
    path, body = decode_message('{"pubsub_path": "a"}', 1000)
    assert path == "/a" and body == {"pubsub_path": "a"}


@pytest.mark.parametrize(("body", "why"), [
    ("not json", "not valid JSON"),
    ("", "empty body"),
    ("[1, 2]", "not an array"),
    ('"text"', "not a string"),
    ("42", "not a number"),
    ('{"pubsub_path": 5}', "pubsub_path must be a string"),
    (None, "no text body"),
    ('{"pad": "' + "x" * 200 + '"}', "exceeds max_payload_size"),
    ('{"pubsub_path": "' + "/a" * 1000 + '"}', "bad pubsub_path"),
])
def test_decode_message_rejects(body: object, why: str) -> None:
    with pytest.raises(BadMessage, match=why):
        decode_message(body, 150 if "pad" in str(body) else 100_000)


def test_seen_ids_bounded() -> None:
    seen = SeenIds(3)
    for mid in "abcd":
        seen.add(mid)
    assert len(seen) == 3
    assert "a" not in seen and all(m in seen for m in "bcd")
    seen.add("b")  # refreshed: now the newest
    seen.add("e")
    assert "c" not in seen and "b" in seen
    with pytest.raises(ValueError):
        SeenIds(0)


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for d, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= d <= cap
    b.reset()
    assert b.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(1.0, 0.5)


def test_entry_names_need_not_be_strings() -> None:
    (q,) = parse({1: {"queue": "q"}})
    assert q.name == "1"
    with pytest.raises(ConfigError) as ei:
        parse({1: {}})
    assert ei.value.key == "sqs.1.queue"


def test_build_needs_a_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    config = parse_config({"sqs": {"main": {"queue": "q"}}}, "test.yaml")
    with pytest.raises(ConfigError) as ei:
        build(config)
    assert ei.value.key == "sqs.main.region"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the AWS chain gives one: fine
    plugin = build(config)
    assert [q.name for q in plugin.queues] == ["main"]
