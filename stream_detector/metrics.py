"""Every Prometheus metric the daemon exports, in one place, on a registry of its own.

Labels stay bounded: topic, partition, detector, outcome, reason. Never a sale key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)


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
        self.batch_seconds = Histogram(f"{ns}_batch_seconds", "Time to decode, score and publish one micro-batch.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{ns}_batch_size_events", "Records per micro-batch.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.latency = Histogram(
            f"{ns}_end_to_end_latency_seconds",
            "From consuming an anomalous event to its record being delivered to the output topic.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(f"{ns}_consumer_lag", "Records behind the end of each assigned input partition.", ["topic", "partition"], registry=r)
        self.score = Histogram(
            f"{ns}_score", "Calibrated scores (1 - tail probability), per detector and fused.", ["detector"], buckets=SCORE_BUCKETS, registry=r
        )
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
            "Control-topic records read, by outcome (added, replaced, cancelled, unknown_window, invalid_window, not_json).",
            ["outcome"],
            registry=r,
        )
        self.windows = Gauge(
            f"{ns}_alert_windows", "Alert windows known (config and control topic), and those containing the latest event time.", ["state"], registry=r
        )
        for reason in ("window", "feedback"):
            self.suppressed.labels(reason)
        # Known label values start at 0, so dashboards and rate() see the series from the start.
        for label, outcome in (("false_positive", "applied"), ("false_positive", "pending"), ("true_positive", "recorded"), ("unknown", "invalid")):
            self.feedback.labels(label, outcome)
        for state in ("known", "active"):
            self.windows.labels(state).set(0)
        for outcome in ("scored", "invalid"):
            self.events.labels(outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe`` for a whole array at once (one bucket update per bucket).

    Uses the client's per-bucket counters the way ``Histogram.observe`` does (a value counts in
    the first bucket whose upper bound is >= it); a unit test checks both give the same
    exposition. Thousands of scores per batch would otherwise cost a lock round-trip each.
    """
    values = values[~np.isnan(values)]
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> None:
        self.metrics = metrics
        self._ready = ready
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok, why = server._ready()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # quiet: scrapes are frequent
                return

        return Handler
