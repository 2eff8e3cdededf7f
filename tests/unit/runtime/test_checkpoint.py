"""The checkpoint order (``runtime/checkpoint.py``) against small fake clients that record
every call in order, as quix-streams tests its ``Checkpoint``: no broker.

At-least-once: outputs delivered -> snapshots produced and delivered -> offsets committed,
nothing committed once a delivery failed. Exactly-once: snapshots and offsets in the open
transaction -> commit -> begin the next; a failure aborts the transaction (resumed while the
abort times out retriably, the producer replaced when it cannot abort).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_detector.errors import DeliveryError
from stream_detector.metrics import Metrics
from stream_detector.runtime import checkpoint as checkpoint_module
from stream_detector.runtime.checkpoint import AtLeastOnceCheckpoint, ExactlyOnceCheckpoint
from stream_detector.runtime.delivery import DeliveryTracker, produce
from stream_detector.runtime.partitions import PartitionWork

CHANGELOG = "detector-state"
FAILED = KafkaError(KafkaError._MSG_TIMED_OUT, "Message timed out")
TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish, retry call to resume", retriable=True)
FENCED = KafkaError(KafkaError._FENCED, "fenced", fatal=True)


class FakeProducer:
    """Records calls in ``calls``; a produced record is delivered at the next poll or flush
    (with ``fail`` as its error, if set), or held back while ``hold`` is set."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls
        self.queued: list[tuple[str, int, Any]] = []
        self.fail: KafkaError | None = None
        self.hold = False
        self.abort_errors: list[KafkaError] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **kwargs: Any) -> None:
        self.calls.append(("produce", topic, kwargs.get("partition", -1)))
        self.queued.append((topic, kwargs.get("partition", -1), kwargs["on_delivery"]))

    def _deliver(self) -> int:
        if self.hold:
            return 0
        delivered, self.queued = self.queued, []
        for _, _, on_delivery in delivered:
            on_delivery(self.fail, None)
        return len(delivered)

    def poll(self, timeout: float = -1) -> int:
        return self._deliver()

    def flush(self, timeout: float = -1) -> int:
        self.calls.append(("flush",))
        self._deliver()
        return len(self.queued)

    def __len__(self) -> int:
        return len(self.queued)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.calls.append(("purge", in_queue, in_flight))
        self.queued.clear()

    def begin_transaction(self) -> None:
        self.calls.append(("begin_transaction",))

    def send_offsets_to_transaction(self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1) -> None:
        self.calls.append(("send_offsets_to_transaction", [(tp.topic, tp.partition, tp.offset) for tp in positions], group_metadata))

    def commit_transaction(self, timeout: float = -1) -> None:
        self.calls.append(("commit_transaction",))

    def abort_transaction(self, timeout: float = -1) -> None:
        self.calls.append(("abort_transaction", timeout))
        if self.abort_errors:
            raise KafkaException(self.abort_errors.pop(0))


class FakeConsumer:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        assert asynchronous is False
        self.calls.append(("commit", [(tp.topic, tp.partition, tp.offset) for tp in offsets]))
        return offsets

    def consumer_group_metadata(self) -> str:
        return "group-metadata"


def _work(position: int) -> PartitionWork:
    # A base state and one shard of keys (state/changelog.py), both written by a checkpoint.
    shards = {"detector:zscore": {"store_id/0": {"keys": ["s1"]}}}
    pipeline: Any = SimpleNamespace(changelog_state=lambda changed_only: ({"seen": position}, shards))
    return PartitionWork(pipeline, position, dirty=True)


@pytest.fixture
def calls() -> list[tuple[Any, ...]]:
    return []


@pytest.fixture
def producer(calls):
    return FakeProducer(calls)


@pytest.fixture
def consumer(calls):
    return FakeConsumer(calls)


@pytest.fixture
def tracker():
    return DeliveryTracker(Metrics())


def _output(producer: FakeProducer, tracker: DeliveryTracker) -> None:
    produce(producer, "anomalies", b"k", b"v", None, tracker.callback(time.monotonic(), True))


def _steps(calls: list[tuple[Any, ...]]) -> list[Any]:
    """The calls, with runs of snapshot records folded into one step."""
    steps: list[Any] = []
    for call in calls:
        step = "produce snapshot" if call[:2] == ("produce", CHANGELOG) else call if call[0] != "produce" else f"produce {call[1]}"
        if not steps or steps[-1] != step or step != "produce snapshot":
            steps.append(step)
    return steps


def test_at_least_once_order_outputs_then_snapshots_then_offsets(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    _output(producer, tracker)
    checkpoint.commit(producer, consumer, {("in", 0): _work(10), ("in", 3): _work(7)})
    assert _steps(calls) == [
        "produce anomalies",
        ("flush",),
        "produce snapshot",
        ("flush",),
        ("commit", [("in", 0, 10), ("in", 3, 7)]),
    ]
    assert {call[2] for call in calls if call[:2] == ("produce", CHANGELOG)} == {0, 3}  # by input partition


def test_at_least_once_commits_nothing_when_an_output_was_not_delivered(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    producer.fail = FAILED
    _output(producer, tracker)
    with pytest.raises(DeliveryError, match="1 record"):
        checkpoint.commit(producer, consumer, {("in", 0): _work(10)})
    assert _steps(calls) == ["produce anomalies", ("flush",)]  # no snapshot, no commit


def test_at_least_once_commits_nothing_when_a_snapshot_was_not_delivered(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    _output(producer, tracker)
    producer.poll(0)  # the output is delivered
    producer.fail = FAILED
    with pytest.raises(DeliveryError):
        checkpoint.commit(producer, consumer, {("in", 0): _work(10)})
    assert not [call for call in calls if call[0] == "commit"]


def test_at_least_once_without_state_commits_offsets_after_the_outputs(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=False)
    _output(producer, tracker)
    checkpoint.commit(producer, consumer, {("in", 0): _work(5)})
    assert _steps(calls) == ["produce anomalies", ("flush",), ("flush",), ("commit", [("in", 0, 5)])]


def test_a_pending_checkpoint_takes_each_step_once_its_deliveries_are_in(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    works = {("in", 0): _work(10), ("in", 1): _work(4)}
    producer.hold = True
    _output(producer, tracker)
    pending = checkpoint.capture(dict(works))
    assert not any(w.dirty for w in works.values())
    assert not checkpoint.advance(producer, consumer, pending, works)  # the output is not delivered
    assert pending.snapshots_epoch is None and _steps(calls) == ["produce anomalies"]
    _output(producer, tracker)  # produced after the capture: not waited for
    producer.hold = False
    producer.poll(0)
    producer.hold = True
    _output(producer, tracker)
    assert not checkpoint.advance(producer, consumer, pending, works)  # snapshots produced, not yet delivered
    assert pending.snapshots_epoch is not None and _steps(calls)[-1] == "produce snapshot"
    producer.hold = False
    del works[("in", 1)]  # lost meanwhile: its offset is not committed
    assert checkpoint.advance(producer, consumer, pending, works)
    assert calls[-1] == ("commit", [("in", 0, 10)])


def test_a_pending_checkpoint_commits_nothing_after_a_failed_delivery(producer, consumer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    works = {("in", 0): _work(10)}
    producer.fail = FAILED
    _output(producer, tracker)
    pending = checkpoint.capture(dict(works))
    with pytest.raises(DeliveryError):
        checkpoint.advance(producer, consumer, pending, works)
    assert not [call for call in calls if call[0] == "commit" or call[:2] == ("produce", CHANGELOG)]


def test_at_least_once_rollback_drops_what_is_not_sent(producer, tracker, calls):
    checkpoint = AtLeastOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    checkpoint.begin(producer)  # no transaction
    assert checkpoint.rollback(producer)
    assert calls == [("purge", True, False)]


def test_exactly_once_order_in_the_transaction(producer, consumer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    checkpoint.begin(producer)
    _output(producer, tracker)
    checkpoint.commit(producer, consumer, {("in", 2): _work(8)})
    assert _steps(calls) == [
        ("begin_transaction",),
        "produce anomalies",
        "produce snapshot",
        ("send_offsets_to_transaction", [("in", 2, 8)], "group-metadata"),
        ("commit_transaction",),
        ("begin_transaction",),
    ]
    assert ("flush",) not in calls and not [call for call in calls if call[0] == "commit"]


def test_exactly_once_with_nothing_to_commit_still_commits_the_transaction(producer, consumer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    checkpoint.commit(producer, consumer, {})
    assert calls == [("commit_transaction",), ("begin_transaction",)]


def test_exactly_once_failure_aborts_the_transaction(producer, consumer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)

    def refuse(*_: Any) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "not in a transaction"))

    producer.send_offsets_to_transaction = refuse  # type: ignore[method-assign]
    with pytest.raises(KafkaException):
        checkpoint.commit(producer, consumer, {("in", 0): _work(3)})
    assert ("commit_transaction",) not in calls
    assert checkpoint.rollback(producer)
    assert calls[-1] == ("abort_transaction", checkpoint_module.ABORT_ATTEMPT_S)


def test_a_timed_out_abort_is_resumed(producer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    producer.abort_errors = [TIMED_OUT, TIMED_OUT]
    assert checkpoint.rollback(producer)
    assert [call[0] for call in calls] == ["abort_transaction"] * 3


def test_a_producer_that_cannot_abort_must_be_replaced(producer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True)
    producer.abort_errors = [FENCED]
    assert not checkpoint.rollback(producer)
    assert len(calls) == 1


def test_a_stop_request_ends_the_abort_retries(producer, tracker, calls):
    checkpoint = ExactlyOnceCheckpoint(tracker, CHANGELOG, state_enabled=True, stopping=lambda: True)
    producer.abort_errors = [TIMED_OUT, TIMED_OUT]
    assert not checkpoint.rollback(producer)
    assert len(calls) == 1


def test_slices_stagger_only_at_least_once(tracker):
    assert [AtLeastOnceCheckpoint(tracker, CHANGELOG, True).slices(n) for n in (0, 1, 3, 12)] == [1, 1, 3, checkpoint_module.CHECKPOINT_SLICES]
    assert ExactlyOnceCheckpoint(tracker, CHANGELOG, True).slices(12) == 1
