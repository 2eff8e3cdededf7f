"""The daemon without a broker: the abort of a failed transaction (resumed while librdkafka says
it may be, the producer replaced only when it cannot abort; the producer is scripted), the
series it declares at start, and its alerting gauges."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client.parser import text_string_to_metric_families

from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import AlertWindow, WindowBook
from stream_detector.config import load_settings
from stream_detector.runtime import checkpoint as checkpoint_module
from stream_detector.runtime import daemon as daemon_module
from stream_detector.runtime.daemon import Daemon, PartitionWork

TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish, retry call to resume", retriable=True)
FATAL = KafkaError(KafkaError._FENCED, "fenced", fatal=True)


class ScriptedProducer:
    """abort_transaction raises the scripted errors in turn, then succeeds."""

    def __init__(self, errors: list[KafkaError], forever: KafkaError | None = None) -> None:
        self.errors = list(errors)
        self.forever = forever
        self.aborts = 0
        self.purged = False

    def abort_transaction(self, timeout: float) -> None:
        self.aborts += 1
        assert timeout == daemon_module.ABORT_ATTEMPT_S
        if self.errors:
            raise KafkaException(self.errors.pop(0))
        if self.forever is not None:
            time.sleep(0.01)
            raise KafkaException(self.forever)

    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        self.purged = True


@pytest.fixture(scope="module")
def daemon():
    return Daemon(load_settings(environ={"STREAM_DETECTOR_PROCESSING__GUARANTEE": "exactly-once"}))


@pytest.fixture
def replacements(daemon, monkeypatch):
    made = []
    monkeypatch.setattr(daemon, "_new_producer", lambda: made.append(object()) or made[-1])
    return made


def test_a_timed_out_abort_is_resumed_not_given_up(daemon, replacements):
    producer = daemon._producer = ScriptedProducer([TIMED_OUT, TIMED_OUT])
    daemon._abort_transaction()
    assert producer.aborts == 3
    assert replacements == [] and daemon._producer is producer


def test_a_producer_that_cannot_abort_is_replaced_at_once(daemon, replacements):
    producer = daemon._producer = ScriptedProducer([FATAL])
    daemon._abort_transaction()
    assert producer.aborts == 1 and producer.purged
    assert daemon._producer is replacements[0]


def test_an_abort_that_never_finishes_is_given_up_after_the_timeout(daemon, replacements, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "ABORT_TIMEOUT_S", 0.2)
    producer = daemon._producer = ScriptedProducer([], forever=TIMED_OUT)
    started = time.monotonic()
    daemon._abort_transaction()
    assert 0.2 <= time.monotonic() - started < 5
    assert producer.aborts > 2 and producer.purged
    assert daemon._producer is replacements[0]


def _samples(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(daemon.metrics.exposition().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_the_enabled_detectors_series_exist_at_zero_from_the_start(daemon):
    samples = _samples(daemon)
    detectors = daemon.pipeline.detector_names
    timers = [timer.name for timer in daemon.pipeline.collective]
    assert detectors and timers == ["silence"]  # the defaults: every detector and the silence timer on
    for name in [*detectors, *timers]:
        assert samples[("stream_detector_detector_fired_total", (("detector", name),))] == 0, name
    for name in [*detectors, "fused"]:
        assert samples[("stream_detector_score_count", (("detector", name),))] == 0, name
        assert samples[("stream_detector_score_bucket", (("detector", name), ("le", "+Inf")))] == 0, name
    assert samples[("stream_detector_dlq_total", (("reason", "invalid_json"),))] == 0


def test_the_active_windows_gauge_skips_partitions_that_scored_nothing_yet(daemon, monkeypatch):
    window = AlertWindow(name="black-friday", start="2026-11-27", end="2026-11-28")
    monkeypatch.setattr(daemon, "policy", AlertPolicy(WindowBook([window])))
    during = datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp()
    partitions = {
        ("sales", 0): PartitionWork(daemon.pipeline, None),  # assigned, nothing scored yet
        ("sales", 1): PartitionWork(daemon.pipeline, 10, last_event_time=during),
        ("sales", 2): PartitionWork(daemon.pipeline, None),
    }
    monkeypatch.setattr(daemon, "_partitions", partitions)
    daemon._observe_alerting()
    samples = _samples(daemon)
    assert samples[("stream_detector_alert_windows", (("state", "known"),))] == 1
    assert samples[("stream_detector_alert_windows", (("state", "active"),))] == 1
