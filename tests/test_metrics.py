"""Unit tests of the stats() registry, the collector and the latency histogram (no sockets)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import LATENCY_BUCKETS, LatencyHistogram, Registry, StatsCollector, Value


class Source:
    def __init__(self, **stats: Value) -> None:
        self.values = stats

    def stats(self) -> Mapping[str, Value]:
        return self.values


class Broken:
    def stats(self) -> Mapping[str, Value]:
        raise KeyError("bug")


def exposition(reg: Registry) -> str:
    prom = CollectorRegistry(auto_describe=False)
    prom.register(StatsCollector(reg))
    return generate_latest(prom).decode()


def test_one_line_registers_a_source_and_labels_merge() -> None:
    reg = Registry()
    reg.register(Source(sqs_received_total=3), queue="a")
    reg.register(Source(sqs_received_total=4), queue="b")
    reg.register(Source(refused_total={"400": 2, "413": 1}, events_published_total=7))
    text = exposition(reg)
    assert 'pypubsub_sqs_received_total{queue="a"} 3.0' in text
    assert 'pypubsub_sqs_received_total{queue="b"} 4.0' in text
    assert 'pypubsub_refused_total{code="400"} 2.0' in text
    assert "# TYPE pypubsub_events_published_total counter" in text
    assert reg.snapshot() == {"sqs_received_total": {"a": 3, "b": 4},
                              "refused_total": {"400": 2, "413": 1}, "events_published_total": 7}


def test_an_unknown_name_is_still_exposed() -> None:
    reg = Registry()
    reg.register(Source(brand_new_total=1, brand_new_gauge=2))
    text = exposition(reg)
    assert "# TYPE pypubsub_brand_new_total counter" in text
    assert "# TYPE pypubsub_brand_new_gauge gauge" in text


def test_a_failing_source_is_logged_and_the_others_still_read(caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry()
    reg.register(Broken())
    reg.register(Source(events_published_total=1))
    with caplog.at_level(logging.ERROR):
        text = exposition(reg)
    assert "pypubsub_events_published_total 1.0" in text
    assert "stats() failed" in caplog.text


def test_unregister() -> None:
    reg, src = Registry(), Source(x=1)
    reg.register(src)
    reg.unregister(src)
    assert reg.snapshot() == {}


def test_latency_histogram_buckets_are_cumulative_in_the_exposition() -> None:
    h = LatencyHistogram()
    for s in (0.000001, 0.00003, 0.00003, 0.2, 99.0):
        h.observe(s)
    snap = h.snapshot()
    assert snap.count == 5 and len(snap.counts) == len(LATENCY_BUCKETS) + 1
    reg = Registry()
    reg.register(Source(publish_latency_seconds=snap))
    text = exposition(reg)
    assert 'pypubsub_publish_latency_seconds_bucket{le="1e-05"} 1.0' in text
    assert 'pypubsub_publish_latency_seconds_bucket{le="5e-05"} 3.0' in text
    assert 'pypubsub_publish_latency_seconds_bucket{le="0.25"} 4.0' in text
    assert 'pypubsub_publish_latency_seconds_bucket{le="+Inf"} 5.0' in text
    assert "pypubsub_publish_latency_seconds_count 5.0" in text
    # a value on a bound falls in that bucket (le: less than or equal)
    h2 = LatencyHistogram((1.0, 2.0))
    h2.observe(1.0)
    assert h2.snapshot().counts == (1, 0, 0)
