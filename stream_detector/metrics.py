"""Every Prometheus metric the daemon exports, in one place, on a registry of its own.

Labels stay bounded: topic, partition, detector, outcome, reason. Never a sale key. A label
whose values are known in advance (a closed set) has all its series from the start, at 0, as
client_python advises: a healthy instance then shows "0 dead letters", not "No data", and
``rate()`` sees the first increment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from stream_detector.errors import STATE_FAILURE_REASONS
from stream_detector.events.decode import REASONS

SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)
# The score histogram's series for the fused score (the others are named after their detector).
FUSED = "fused"

# Closed label sets, declared at 0 by ``Metrics``. The detector label is declared by the daemon,
# which knows the enabled detectors (``Daemon._init_metrics``).
EVENT_OUTCOMES = ("scored", "invalid")
DLQ_REASONS = REASONS  # every reason decode_batch gives; the daemon dead-letters for no other
COMMIT_RESULTS = ("ok",)
SUPPRESSED_BY = ("window", "feedback")  # alerting/policy.py
# What the control topic's records did: WindowBook.apply_control's results and ControlError
# reasons, and the daemon's own "not_json".
CONTROL_OUTCOMES = ("added", "replaced", "cancelled", "unknown_window", "invalid_window", "too_long", "not_an_object", "not_json")
# What happened to the calibration summaries of the population topic (runtime/population.py):
# sent by this instance, applied from another, or refused (unreadable, or made by another
# scoring configuration).
POPULATION_OUTCOMES = ("sent", "applied", "corrupt", "unsupported_format", "incompatible")
# Feedback outcomes by label (alerting/feedback.py's LABELS): FeedbackMemory.apply's for a
# remembered event, the daemon's pending and expired for the others, and an unreadable record
# counted as unknown/invalid.
FEEDBACK_OUTCOMES = {
    "false_positive": ("applied", "duplicate", "pending", "expired"),
    "true_positive": ("recorded", "duplicate", "pending", "expired"),
    # level_shift records (scoring/level_shift.py); on an anomaly, recorded like a true positive
    "accept": ("recorded", "duplicate", "pending", "expired"),
    "reject": ("applied", "recorded", "duplicate", "pending", "expired"),
    "unknown": ("invalid",),
}
WINDOW_STATES = ("known", "active")
# Why the metrics endpoint dropped a connection (each explained in metrics_server.py).
HTTP_DROP_REASONS = ("timeout", "evicted", "too_large", "bad_request", "disconnected")
STATE_RESTORE_FAILURE_REASONS = STATE_FAILURE_REASONS  # errors.py: why a snapshot or part was refused


class Metrics:
    """The daemon's metrics. Pass a fresh ``CollectorRegistry`` per test."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ns = "stream_detector"
        self.events = Counter(f"{ns}_events", "Input records by outcome: scored (valid) or invalid (dead-lettered).", ["outcome"], registry=r)
        self.anomalies = Counter(f"{ns}_anomalies", "Anomalies published to the output topic.", registry=r)
        self.fired = Counter(f"{ns}_detector_fired", "Anomalies each detector fired on (one anomaly can count for several).", ["detector"], registry=r)
        self.dlq = Counter(f"{ns}_dlq", "Records sent to the dead-letter topic, by reason.", ["reason"], registry=r)
        self.clamped = Counter(
            f"{ns}_event_time_clamped",
            "Events dated past max(watermark, clock) + processing.max_future_skew, scored at the partition's watermark (future_timestamps: clamp).",
            registry=r,
        )
        self.batch_seconds = Histogram(f"{ns}_batch_seconds", "Time to decode, score and publish one micro-batch.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{ns}_batch_size_events", "Records per micro-batch.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.latency = Histogram(
            f"{ns}_end_to_end_latency_seconds",
            "From consuming an anomalous event to its record being delivered to the output topic.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(f"{ns}_consumer_lag", "Records behind the end of each assigned input partition.", ["topic", "partition"], registry=r)
        self.score = ArrayHistogram(f"{ns}_score", "Calibrated scores (1 - tail probability), per detector and fused.", ["detector"], SCORE_BUCKETS, r)
        self.threshold = Gauge(f"{ns}_threshold", "Fused-score threshold above which an event is an anomaly.", registry=r)
        self.keys = Gauge(f"{ns}_keys", "Keys with per-key state, per key set.", ["key_set"], registry=r)
        self.learning_keys = Gauge(f"{ns}_learning_keys", "Keys still in warm-up (scored by the global model), per key set.", ["key_set"], registry=r)
        self.train_loss = Gauge(f"{ns}_autoencoder_train_loss", "Last autoencoder training loss (MSE, standardised).", registry=r)
        self.train_steps = Gauge(f"{ns}_autoencoder_train_steps", "Autoencoder optimiser steps taken.", registry=r)
        self.device = Info(f"{ns}_autoencoder", "Where the autoencoder runs.", registry=r)
        self.rounds = Histogram(
            f"{ns}_scoring_rounds", "Fixed-point rounds a batch needed to settle its learn mask.", buckets=(1, 2, 3, 4, 6, 8, 9), registry=r
        )
        self.commits = Counter(f"{ns}_commits", "Checkpoints (outputs, state snapshots and offsets committed), by result.", ["result"], registry=r)
        self.checkpoint_seconds = Histogram(
            f"{ns}_checkpoint_seconds",
            "Time from capturing a checkpoint to committing its offsets (the loop goes on scoring meanwhile, except on revocation and shutdown).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recoveries = Counter(f"{ns}_recoveries", "Rewinds to the last checkpoint after a failure.", registry=r)
        self.restore_seconds = Histogram(
            f"{ns}_state_restore_seconds",
            "Time to restore the state of newly assigned partitions from the changelog (the partitions of one assignment are read together).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.restore_failures = Counter(
            f"{ns}_state_restore_failures",
            "Changelog records, snapshots and snapshot parts (a detector, calibrator, timer, feedback) not restored, by reason; "
            "what was not restored started fresh (state.on_unreadable: reset) or the daemon stopped (fail).",
            ["reason"],
            registry=r,
        )
        self.state_bytes = Gauge(
            f"{ns}_state_bytes",
            "Estimated bytes held by the per-key state of this instance's partitions (z-score statistics, silence timers, duplicate "
            "fingerprints), bounded by state.max_bytes.",
            registry=r,
        )
        self.keys_forgotten = Counter(
            f"{ns}_state_keys_forgotten", "Keys forgotten (least recently seen first) to keep the per-key state within state.max_bytes.", registry=r
        )
        self.changelog_bytes = Counter(
            f"{ns}_changelog_bytes",
            "Bytes of state records written to the changelog by checkpoints: the shards of keys that changed and each partition's snapshot of the rest.",
            registry=r,
        )
        self.kafka_errors = Counter(f"{ns}_kafka_errors", "Errors reported by librdkafka, by code.", ["code"], registry=r)
        self.assigned = Gauge(f"{ns}_assigned_partitions", "Input partitions assigned to this instance.", registry=r)
        self.up = Gauge(f"{ns}_up", "1 while the consume loop runs.", registry=r)
        self.detector_enabled = Gauge(f"{ns}_detector_enabled", "1 for each enabled detector.", ["detector"], registry=r)
        self.calibrated = Gauge(f"{ns}_detector_calibrated", "1 once a detector's calibrator has enough scores to alert.", ["detector"], registry=r)
        self.suppressed = Counter(
            f"{ns}_alerts_suppressed", "Anomalies not published, by what suppressed them: a window or analysts' feedback.", ["reason"], registry=r
        )
        self.annotated = Counter(f"{ns}_alerts_annotated", "Anomalies published with a window annotation.", registry=r)
        self.feedback = Counter(
            f"{ns}_feedback",
            "Feedback records read, by label and outcome (applied, recorded, duplicate, pending, invalid, expired).",
            ["label", "outcome"],
            registry=r,
        )
        self.feedback_rules = Gauge(f"{ns}_feedback_rules", "False-positive rules in force on this instance's partitions.", registry=r)
        self.control = Counter(
            f"{ns}_control_records",
            "Control-topic records read, by outcome (added, replaced, cancelled, unknown_window, invalid_window, too_long, not_an_object, not_json).",
            ["outcome"],
            registry=r,
        )
        self.windows = Gauge(
            f"{ns}_alert_windows", "Alert windows known (config and control topic), and those containing the latest event time.", ["state"], registry=r
        )
        self.population = Counter(
            f"{ns}_population_records",
            "Calibration summaries of the population topic, by outcome (sent, applied, corrupt, unsupported_format, incompatible).",
            ["outcome"],
            registry=r,
        )
        self.calibration_partitions = Gauge(
            f"{ns}_calibration_partitions",
            "Input partitions whose reference windows the shared calibration holds (1 or 0: each partition calibrates alone).",
            registry=r,
        )
        self.http_dropped = Counter(
            f"{ns}_metrics_connections_dropped",
            "Connections to the metrics endpoint closed without an answer, by reason "
            "(timeout, evicted at the connection bound, too_large, bad_request, disconnected).",
            ["reason"],
            registry=r,
        )
        self._declare_closed_label_sets()

    def _declare_closed_label_sets(self) -> None:
        """Every series of a closed label set, at 0 (see the module docstring)."""
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)
        for reason in DLQ_REASONS:
            self.dlq.labels(reason)
        for result in COMMIT_RESULTS:
            self.commits.labels(result)
        for reason in SUPPRESSED_BY:
            self.suppressed.labels(reason)
        for outcome in CONTROL_OUTCOMES:
            self.control.labels(outcome)
        for label, outcomes in FEEDBACK_OUTCOMES.items():
            for outcome in outcomes:
                self.feedback.labels(label, outcome)
        for state in WINDOW_STATES:
            self.windows.labels(state).set(0)
        for outcome in POPULATION_OUTCOMES:
            self.population.labels(outcome)
        for reason in HTTP_DROP_REASONS:
            self.http_dropped.labels(reason)
        for reason in STATE_RESTORE_FAILURE_REASONS:
            self.restore_failures.labels(reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ArrayHistogram(Collector):
    """A labelled histogram fed a whole array of values at a time (the score distributions:
    thousands of scores per batch, which ``Histogram.observe`` would take one lock round-trip
    each for).

    Exposed through client_python's custom-collector API as a histogram with the given name,
    labels and buckets, like a ``Histogram``: a value counts in the first bucket whose upper
    bound is >= it (+Inf is added), NaN is not counted. tests/unit/test_metrics.py compares
    the exposition with a ``Histogram`` fed value by value. There is no ``_created`` series.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets must be sorted, got {buckets}")
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = np.asarray(bounds)
        self._le = [floatToGoString(b) for b in bounds]
        # Guards the series and their counts: batches are added on the loop's thread while the
        # metrics server's thread collects.
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        """The series of one label value set (created empty, so it is exposed at 0)."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name}: {len(self._labelnames)} label value(s) expected ({', '.join(self._labelnames)}), got {key}")
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = HistogramSeries(self._bounds, self._lock)
        return series

    def describe(self) -> Iterable[HistogramMetricFamily]:
        """The family without samples: lets the registry refuse a second metric of this name."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            taken = [(key, series.counts.copy(), series.total) for key, series in self._series.items()]
        for key, counts, total in taken:
            family.add_metric(list(key), list(zip(self._le, np.cumsum(counts).tolist(), strict=True)), total)
        return [family]


class HistogramSeries:
    """One label value set of an ``ArrayHistogram``: per-bucket counts (not cumulative) and the sum."""

    def __init__(self, bounds: np.ndarray, lock: threading.Lock) -> None:
        self._bounds = bounds
        self._lock = lock
        self.counts = np.zeros(len(bounds), dtype=np.int64)
        self.total = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of ``values`` (NaN left out) in its bucket and add it to the sum."""
        values = values[~np.isnan(values)]
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        total = float(values.sum())
        with self._lock:
            self.counts += counts
            self.total += total
