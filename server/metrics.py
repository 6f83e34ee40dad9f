"""Counters, read at scrape time: the ``stats()`` protocol, the registry and the collector.

Owns the one shape every counting object exposes (:class:`StatsSource`: ``stats()`` returns a
mapping of metric name to value), the registry the daemon's parts add themselves to (one
line: ``metrics.register(obj)``), the cheap publish-latency histogram, and the Prometheus
collector that turns all of it into ``pypubsub_*`` families when ``/metrics`` is scraped.

Why this shape: the publish and fan-out paths only increment plain integers the objects already
own; nothing here runs per event. prometheus-client is used for the exposition format only
(a custom collector), never as the counter store.

A new source takes one line where it is set up: ``state.metrics.register(obj)`` (with constant
labels if there are several of it: ``register(consumer.stats, queue=name)``); a new metric name
gets its help text in :data:`METRICS` (and a row in docs/operations.md). A part that can make
publishing impossible adds a check to ``State.readiness`` for ``/readyz``.

Knows nothing of HTTP or of the objects it reads beyond their ``stats()``.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "LATENCY_BUCKETS",
    "METRICS",
    "Histogram",
    "LatencyHistogram",
    "MetricSpec",
    "Registry",
    "StatsCollector",
    "StatsSource",
    "Value",
]

logger = logging.getLogger(__name__)

PREFIX = "pypubsub_"


@dataclass(frozen=True, slots=True)
class Histogram:
    """A histogram snapshot: cumulative counts per upper bound, the sum and the count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket (not cumulative); len(bounds) + 1 (the +Inf bucket)
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


#: A metric's value: a number; a mapping from the value of the metric's one label to a number
#: (e.g. ``{"403": 2, "413": 1}`` for ``code``); or a histogram.
Value = float | Mapping[str, float] | Histogram


@runtime_checkable
class StatsSource(Protocol):
    """Anything that counts: ``stats()`` returns metric name (without ``pypubsub_``) → value.

    Called only when someone reads the metrics (a scrape, ``/status``, SIGUSR1): it may walk
    its structures, it must not block.
    """

    def stats(self) -> Mapping[str, Value]: ...


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    #: the name of the label a mapping value is spread over ("" for plain numbers)
    label: str = ""


#: Every metric the daemon exposes, by name (``_total`` names are counters). A source may
#: return a name missing here: it is exposed as a gauge (a counter when it ends in ``_total``)
#: with its name as help, so adding a counter never needs more than its ``stats()`` line.
METRICS: dict[str, MetricSpec] = {
    "subscribers": MetricSpec("gauge", "Open subscriptions, by transport.", "transport"),
    "subscriptions": MetricSpec("gauge", "Distinct subscription topic sets (with their formats)."),
    "streams_opened_total": MetricSpec("counter", "HTTP streams opened since start."),
    "disconnects_total": MetricSpec(
        "counter", "Streams ended, by reason: client (the client left), overflow (too slow: "
        "its buffer passed server.stream_buffer), shutdown (drain), limit.", "reason"),
    "events_published_total": MetricSpec("counter", "Events accepted (answered 2xx / kept) and routed."),
    "publish_failures_total": MetricSpec("counter", "Events the log failed to keep (publisher got 503)."),
    "publish_duplicates_total": MetricSpec(
        "counter", "Events not kept because the log had them already (SQS redelivery)."),
    "events_routed_total": MetricSpec(
        "counter", "Events the log handed to the hub (in a cluster: from every node)."),
    "publishes_in_progress": MetricSpec("gauge", "Publishes being received or answered by the "
                                        "full HTTP stack (uploads, durable commits)."),
    "publish_pending": MetricSpec("gauge", "Events appended to a durable log, not yet committed."),
    "publish_latency_seconds": MetricSpec(
        "histogram", "Time from a publish entering the ingest path to its acceptance (the 2xx)."),
    "delivery_batches_total": MetricSpec(
        "counter", "Batches of events written to subscription families (one joined write each)."),
    "deliveries_total": MetricSpec(
        "counter", "Events written to subscribers (one event to 10 subscribers counts 10)."),
    "refused_total": MetricSpec("counter", "Requests refused with a 4xx/5xx, by status code.", "code"),
    "auth_failures_total": MetricSpec("counter", "Requests with credentials that did not authenticate."),
    "replay_requests_total": MetricSpec("counter", "Subscriptions asking for a replay (X-Fetch-Since*)."),
    "replay_truncated_total": MetricSpec("counter", "Replays cut to server.backlog.max_replay."),
    "replay_unknown_cursors_total": MetricSpec(
        "counter", "Replays asked from a cursor unknown or evicted (continued live)."),
    "replay_events_total": MetricSpec("counter", "Events sent by replays."),
    "replay_pauses_total": MetricSpec(
        "counter", "Waits of a replay for a subscriber's connection to resume writing (its send "
        "buffer past the high-water mark), ended by the connection resuming writing."),
    "replays_paused": MetricSpec(
        "gauge", "Replays waiting now for their subscriber's connection to resume writing."),
    "backlog_events": MetricSpec("gauge", "Events retained in the backlog."),
    "backlog_oldest_timestamp_seconds": MetricSpec("gauge", "Publish time of the oldest retained event."),
    "backlog_newest_timestamp_seconds": MetricSpec("gauge", "Publish time of the newest retained event."),
    "log_appends_total": MetricSpec("counter", "Events written to the event log."),
    "log_commits_total": MetricSpec("counter", "Transactions committed by a persistent log."),
    "fastlane_served_total": MetricSpec("counter", "Requests served by the fast lane."),
    "fastlane_handed_over_total": MetricSpec("counter", "Connections handed to the full HTTP stack."),
    "acl_reloads_total": MetricSpec("counter", "ACL file reloads applied (SIGHUP, SIGUSR2)."),
    "acl_reload_failures_total": MetricSpec("counter", "ACL reloads refused (previous ACL kept)."),
    "auth_cache_hits_total": MetricSpec("counter", "Credential look-ups answered from the cache.", "cache"),
    "auth_cache_misses_total": MetricSpec("counter", "Credential look-ups sent to the backend.", "cache"),
    "ldap_binds_total": MetricSpec("counter", "LDAP bind attempts."),
    "ldap_failures_total": MetricSpec("counter", "LDAP look-ups that failed (server down, timeout)."),
    "sqs_received_total": MetricSpec("counter", "SQS messages received, by queue.", "queue"),
    "sqs_accepted_total": MetricSpec("counter", "SQS messages published as events.", "queue"),
    "sqs_malformed_total": MetricSpec("counter", "SQS messages that were not a valid event.", "queue"),
    "sqs_duplicates_total": MetricSpec("counter", "SQS messages received again (skipped).", "queue"),
    "sqs_deleted_total": MetricSpec("counter", "SQS messages deleted after publishing.", "queue"),
    "sqs_failed_total": MetricSpec("counter", "SQS messages whose event was not accepted.", "queue"),
    "sqs_outages_total": MetricSpec("counter", "SQS receive errors (retried with backoff).", "queue"),
    "presence_events_total": MetricSpec("counter", "Presence (join/leave) events published."),
    "cluster_entries_read_total": MetricSpec("counter", "Cluster: entries read back from the Redis stream."),
    "cluster_unreadable_entries_total": MetricSpec(
        "counter", "Cluster: stream entries that were not events (skipped)."),
    "cluster_resets_total": MetricSpec(
        "counter", "Cluster: the Redis stream was found deleted, reset or gone back (FLUSHALL, "
        "failover), or this node missed entries: its replay history was dropped."),
    "cluster_missed_entries_total": MetricSpec(
        "counter", "Cluster: stream entries removed (trimmed, deleted) before this node read them."),
    "cluster_outages_total": MetricSpec("counter", "Cluster: times Redis became unreachable."),
    "cluster_batches_resent_total": MetricSpec(
        "counter", "Cluster: appends sent to Redis again after their connection was lost before "
        "the answer (Redis answers one it stored with the ids it gave)."),
    "cluster_redis_up": MetricSpec("gauge", "Cluster: 1 while Redis answers, 0 during an outage."),
    "cluster_read_lag_seconds": MetricSpec(
        "gauge", "Cluster: how far this node's reading lags the stream's newest entry (seconds)."),
    "connections": MetricSpec("gauge", "Open client connections, all listeners (server.max_connections)."),
    "connections_refused_total": MetricSpec(
        "counter", "New connections answered 503 (WebSocket: 1013), by the limit reached: "
        "max_connections, max_connections_per_ip, file_descriptors.", "reason"),
    "header_timeouts_total": MetricSpec(
        "counter", "Connections closed for not sending a complete request head within "
        "server.header_timeout."),
    "accept_errors_total": MetricSpec(
        "counter", "accept() calls that failed for lack of a resource (descriptors, memory)."),
    "uptime_seconds": MetricSpec("gauge", "Seconds since the daemon started."),
    "draining": MetricSpec("gauge", "1 while the daemon drains for shutdown."),
}

#: Upper bounds of the publish-latency buckets, in seconds: from an in-memory publish (a few
#: microseconds) to a durable commit on a slow disk.
LATENCY_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """A fixed-bucket histogram kept as a list of integers: ``observe`` is one bisect and one
    increment (no locks, no labels, no objects), read by the collector at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> Histogram:
        return Histogram(self.bounds, tuple(self.counts), self.total)


class Registry:
    """The sources of one daemon, each with constant labels (e.g. ``queue``)."""

    def __init__(self) -> None:
        self._sources: list[tuple[StatsSource, tuple[tuple[str, str], ...]]] = []

    def register(self, source: StatsSource, **labels: str) -> None:
        self._sources.append((source, tuple(sorted(labels.items()))))

    def unregister(self, source: StatsSource) -> None:
        self._sources = [(s, lb) for s, lb in self._sources if s is not source]

    def read(self) -> Iterator[tuple[str, tuple[tuple[str, str], ...], Value]]:
        """(name, constant labels, value) of every stat of every source, now. A source whose
        ``stats()`` fails is logged and left out: the others are still read."""
        for source, labels in list(self._sources):
            try:
                stats = source.stats()
            except Exception:  # a reader's bug must not blank every metric
                logger.exception("metrics: %r.stats() failed", source)
                continue
            for name, value in stats.items():
                yield name, labels, value

    def snapshot(self) -> dict[str, float | dict[str, float]]:
        """The metrics as plain JSON-able numbers (for /status and the status page): a labelled
        metric becomes ``{label value: number}`` (constant labels joined by ``,``), a histogram
        its count."""
        out: dict[str, float | dict[str, float]] = {}
        for name, const, value in self.read():
            if isinstance(value, Histogram):
                value = float(value.count)
            prefix = ",".join(v for _, v in const)
            if isinstance(value, Mapping):
                items = [(f"{prefix},{k}" if prefix else str(k), v) for k, v in value.items()]
            elif prefix:
                items = [(prefix, value)]
            else:
                prev = out.get(name, 0.0)
                out[name] = (prev if not isinstance(prev, dict) else 0.0) + value
                continue
            d = out.get(name)
            if not isinstance(d, dict):
                d = out[name] = {}
            for k, v in items:
                d[k] = d.get(k, 0.0) + v
        return out


def _spec(name: str) -> MetricSpec:
    spec = METRICS.get(name)
    if spec is None:
        spec = MetricSpec("counter" if name.endswith("_total") else "gauge", name)
    return spec


class StatsCollector(Collector):
    """prometheus-client collector over a :class:`Registry` (register it in a
    ``CollectorRegistry``; every scrape reads the sources afresh)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, const, value in self.registry.read():
            spec = _spec(name)
            fam = families.get(name)
            cnames = [k for k, _ in const]
            cvalues = [v for _, v in const]
            if isinstance(value, Histogram):
                if fam is None:
                    fam = families[name] = HistogramMetricFamily(PREFIX + name, spec.help,
                                                                 labels=cnames)
                cum = 0
                buckets: list[tuple[str, float]] = []
                for bound, n in zip((*value.bounds, float("inf")), value.counts, strict=True):
                    cum += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
                if not isinstance(fam, HistogramMetricFamily):
                    continue  # a name is one kind of metric: a clash is the source's bug
                fam.add_metric(cvalues, buckets, value.total)
                continue
            labelled = isinstance(value, Mapping)
            labels = cnames + ([spec.label or "label"] if labelled else [])
            if fam is None:
                base = PREFIX + (name[:-6] if name.endswith("_total") else name)
                if spec.kind == "counter":
                    fam = CounterMetricFamily(base, spec.help, labels=labels)
                else:
                    fam = GaugeMetricFamily(base, spec.help, labels=labels)
                families[name] = fam
            if isinstance(value, Mapping):
                for lv, v in sorted(value.items()):
                    fam.add_metric([*cvalues, str(lv)], float(v))  # type: ignore[attr-defined]
            else:
                fam.add_metric(cvalues, float(value))  # type: ignore[attr-defined]
        return list(families.values())
