"""The daemon's liveness bookkeeping without a broker (runtime/liveness.py, on a fake clock,
and how the daemon reports to it): rewinds without progress are bounded, readiness says why it
is not ready, /healthz fails once the loop stopped or is blocked, and repeated Kafka errors are
logged once per interval with a count."""

from __future__ import annotations

import copy
import logging
import time

import pytest
from confluent_kafka import KafkaError

from stream_detector.config import load_settings
from stream_detector.errors import StalledError
from stream_detector.runtime import daemon as daemon_module
from stream_detector.runtime.daemon import Daemon, PartitionWork
from stream_detector.runtime.liveness import Liveness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def liveness(clock: Clock) -> Liveness:
    settings = load_settings(environ={"STREAM_DETECTOR_PROCESSING__MAX_REWINDS_WITHOUT_PROGRESS": "3", "STREAM_DETECTOR_PROCESSING__MAX_STALL_S": "20"})
    return Liveness(settings.processing, clock)


@pytest.fixture
def daemon(monkeypatch):
    d = Daemon(
        load_settings(
            environ={
                "STREAM_DETECTOR_PROCESSING__MAX_REWINDS_WITHOUT_PROGRESS": "3",
                "STREAM_DETECTOR_PROCESSING__MAX_STALL_S": "20",
                "STREAM_DETECTOR_METRICS__ENABLED": "false",
            }
        )
    )
    d._running = True
    d._partitions[("in", 0)] = PartitionWork(copy.deepcopy(d.pipeline), 10)
    rewinds = []
    monkeypatch.setattr(d, "_rewind", lambda: rewinds.append(1))
    d.rewinds = rewinds
    return d


def test_rewinds_without_progress_are_bounded_and_make_readiness_fail(daemon):
    assert daemon.readiness()[0]
    for n in range(1, 4):
        daemon._recover()
        ok, why = daemon.readiness()
        assert not ok and f"{n} rewind(s)" in why and "processing.max_rewinds_without_progress" in why
    with pytest.raises(StalledError, match="processing.max_rewinds_without_progress"):
        daemon._recover()
    assert len(daemon.rewinds) == 3


def test_a_committed_checkpoint_resets_the_count(daemon):
    for _ in range(3):
        daemon._recover()
    daemon._liveness.made_progress()
    assert daemon.readiness()[0]
    for _ in range(3):
        daemon._recover()  # three more: the bound counts rewinds in a row


def test_work_waiting_without_progress_turns_readiness_then_raises(liveness, clock):
    assert liveness.readiness(True, 1)[0]
    clock.now += 11
    ok, why = liveness.readiness(True, 1)
    assert not ok and "no checkpoint for 11 s" in why  # after min(10 s, max_stall_s / 2)
    liveness.check(stopping=False)  # 11 s < max_stall_s
    clock.now += 10
    with pytest.raises(StalledError, match="processing.max_stall_s"):
        liveness.check(stopping=False)
    liveness.check(stopping=True)  # stopping: the shutdown has its own bound


def test_time_spent_restoring_is_not_a_stall(liveness, clock):
    clock.now += 15
    liveness.paused(15)
    assert liveness.readiness(True, 1)[0] and liveness.liveness(True) == (True, "ok")


def test_readiness_needs_a_running_loop_and_partitions(liveness):
    assert liveness.readiness(False, 1) == (False, "not running")
    assert liveness.readiness(True, 0) == (False, "no partitions assigned (or state not restored) yet")
    assert liveness.readiness(True, 2) == (True, "ready: 2 partition(s) assigned, state restored")


def test_idle_with_nothing_uncommitted_is_progress(daemon, monkeypatch):
    daemon._liveness.progress_at = time.monotonic() - 15
    daemon._partitions[("in", 0)].dirty = True
    daemon._settled()
    assert not daemon.readiness()[0]
    daemon._partitions[("in", 0)].dirty = False
    daemon._settled()
    assert daemon.readiness()[0]
    # After a rewind, only once the input is read up to its end.
    daemon._recover()
    monkeypatch.setattr(daemon, "_caught_up", lambda: False)
    daemon._settled()
    assert not daemon.readiness()[0]
    monkeypatch.setattr(daemon, "_caught_up", lambda: True)
    daemon._settled()
    assert daemon.readiness()[0]


def test_liveness_fails_when_the_loop_stopped_or_is_blocked(liveness, clock):
    assert liveness.liveness(True) == (True, "ok")
    clock.now += 25
    ok, why = liveness.liveness(True)
    assert not ok and "has not turned for 25 s" in why
    assert liveness.liveness(False) == (True, "ok")  # not started yet, or stopped cleanly
    liveness.check(stopping=True)  # a turn
    liveness.failed = "boom"
    assert liveness.liveness(True) == (False, "the consume loop stopped: boom")


def test_a_fatal_kafka_error_stops_with_exit_code_1(daemon):
    daemon._on_kafka_error(KafkaError(KafkaError._FATAL, "fatal", fatal=True))
    assert daemon._stop.is_set() and daemon._exit_code == 1


def test_repeated_kafka_errors_are_logged_once_per_interval_with_a_count(daemon, monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(daemon_module.time, "monotonic", lambda: clock[0])
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    with caplog.at_level(logging.WARNING, logger="stream_detector.daemon"):
        for i in range(220):  # 22 a second for 10 s
            clock[0] = 1000.0 + i * 0.045
            daemon._on_kafka_error(down)
        daemon._on_kafka_error(KafkaError(KafkaError._TRANSPORT, "reset"))
        clock[0] = 1010.0
        daemon._on_kafka_error(down)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "(219 more like it since the previous line)" in messages[2]
