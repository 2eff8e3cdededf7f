"""The control and feedback topic reader, against a stand-in for the Kafka consumer (no broker).

What it promises (``runtime/control.py``): every partition of every control topic is read from
the beginning without joining a group and without committing; a poll never blocks; each record
comes back decoded, or with an error saying why it could not be (the daemon then counts it and
goes on); client errors and end-of-partition events are not records.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING

from stream_detector.runtime import control
from stream_detector.runtime.control import MAX_RECORD_BYTES, ControlReader, ControlRecord


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, error: Any = None) -> None:
        self._topic, self._partition, self._offset, self._value, self._error = topic, partition, offset, value, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> Any:
        return self._error


class FakeConsumer:
    """Records how it was configured and used; ``consume`` hands out the queued messages."""

    topics: dict[str, Any] = {}
    made: list[FakeConsumer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.assigned: list[Any] = []
        self.queue: list[FakeMessage] = []
        self.consume_calls: list[tuple[int, float]] = []
        self.closed = False
        FakeConsumer.made.append(self)

    def list_topics(self, timeout: float | None = None) -> Any:
        return SimpleNamespace(topics=self.topics)

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = list(partitions)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.consume_calls.append((num_messages, timeout))
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return out

    def close(self) -> None:
        self.closed = True


def topic(partitions: int, error: Any = None) -> Any:
    # Partition ids in the metadata dict in no particular order.
    return SimpleNamespace(error=error, partitions={p: SimpleNamespace(id=p) for p in reversed(range(partitions))})


@pytest.fixture
def consumer_class(monkeypatch: pytest.MonkeyPatch) -> type[FakeConsumer]:
    FakeConsumer.topics = {"alerts-control": topic(3), "alerts-feedback": topic(1), "other": topic(2)}
    FakeConsumer.made = []
    monkeypatch.setattr(control, "Consumer", FakeConsumer)
    return FakeConsumer


def make_reader(topics: list[str] | None = None, client_config: dict[str, Any] | None = None) -> tuple[ControlReader, FakeConsumer]:
    reader = ControlReader("broker:9092", topics or ["alerts-control", "alerts-feedback"], client_config or {}, "detector-control")
    return reader, FakeConsumer.made[-1]


def test_every_partition_is_assigned_from_the_beginning(consumer_class):
    reader, consumer = make_reader()
    assert reader.topics == ["alerts-control", "alerts-feedback"]
    assert sorted((tp.topic, tp.partition, tp.offset) for tp in consumer.assigned) == [
        ("alerts-control", 0, OFFSET_BEGINNING),
        ("alerts-control", 1, OFFSET_BEGINNING),
        ("alerts-control", 2, OFFSET_BEGINNING),
        ("alerts-feedback", 0, OFFSET_BEGINNING),
    ]


def test_the_consumer_never_commits_and_reads_only_committed_records(consumer_class):
    client = {"security.protocol": "SASL_SSL", "sasl.username": "detector", "enable.auto.commit": True, "isolation.level": "read_uncommitted"}
    _, consumer = make_reader(client_config=client)
    config = consumer.config
    assert config["bootstrap.servers"] == "broker:9092" and config["group.id"] == "detector-control"
    # The client settings pass through (credentials, TLS) ...
    assert config["security.protocol"] == "SASL_SSL" and config["sasl.username"] == "detector"
    # ... but never turn on commits or uncommitted reads.
    assert config["enable.auto.commit"] is False and config["enable.auto.offset.store"] is False
    assert config["isolation.level"] == "read_committed"
    assert client["enable.auto.commit"] is True  # the caller's dict is left alone


@pytest.mark.parametrize(
    "topics, message",
    [
        ({"alerts-feedback": topic(1)}, "'alerts-control' is not available: not found"),
        ({"alerts-control": topic(0, error="UNKNOWN_TOPIC_OR_PART"), "alerts-feedback": topic(1)}, "'alerts-control' is not available: UNKNOWN_TOPIC_OR_PART"),
    ],
)
def test_a_missing_topic_is_an_error_naming_it(consumer_class, topics, message):
    consumer_class.topics = topics
    with pytest.raises(RuntimeError, match=message):
        make_reader()


def test_poll_never_blocks_and_decodes_each_record(consumer_class):
    reader, consumer = make_reader()
    window = {"name": "black-friday", "start": "2026-11-27T00:00:00Z", "end": "2026-11-30T00:00:00Z", "action": "annotate"}
    consumer.queue = [
        FakeMessage("alerts-control", 2, 7, orjson.dumps(window)),
        FakeMessage("alerts-feedback", 0, 0, b'{"event_id": "e-1", "label": "false_positive"}'),
        FakeMessage("alerts-control", 0, 3, b'["not", "an", "object"]'),  # JSON, checked by the window book later
    ]
    records = reader.poll()
    assert consumer.consume_calls == [(500, 0)]
    assert records == [
        ControlRecord("alerts-control", 2, 7, window),
        ControlRecord("alerts-feedback", 0, 0, {"event_id": "e-1", "label": "false_positive"}),
        ControlRecord("alerts-control", 0, 3, ["not", "an", "object"]),
    ]
    assert all(r.error is None for r in records)
    assert reader.poll(max_records=20) == [] and consumer.consume_calls[-1] == (20, 0)


def test_records_that_cannot_be_decoded_come_back_with_the_reason(consumer_class):
    reader, consumer = make_reader()
    consumer.queue = [
        FakeMessage("alerts-control", 0, 1, b"{not json"),
        FakeMessage("alerts-control", 0, 2, None),  # a tombstone
        FakeMessage("alerts-control", 0, 3, b"\xff\xfe"),
        FakeMessage("alerts-control", 0, 4, b""),
    ]
    records = reader.poll()
    assert [(r.topic, r.partition, r.offset, r.value) for r in records] == [("alerts-control", 0, k, None) for k in (1, 2, 3, 4)]
    assert all(r.error is not None and r.error.startswith("not JSON: ") for r in records)
    assert "empty or larger than" in records[1].error


def test_the_size_limit_is_64_kib(consumer_class):
    reader, consumer = make_reader()
    padding = MAX_RECORD_BYTES - len(orjson.dumps({"name": "", "note": ""}))
    at_limit = orjson.dumps({"name": "", "note": "n" * padding})
    assert len(at_limit) == 64 * 1024
    consumer.queue = [
        FakeMessage("alerts-control", 0, 0, at_limit),
        FakeMessage("alerts-control", 0, 1, orjson.dumps({"name": "", "note": "n" * (padding + 1)})),
    ]
    kept, refused = reader.poll()
    assert kept.error is None and kept.value["note"] == "n" * padding
    assert refused.value is None and refused.error == f"not JSON: empty or larger than {64 * 1024} bytes"


def test_client_errors_and_partition_ends_are_not_records(consumer_class):
    reader, consumer = make_reader()
    consumer.queue = [
        FakeMessage("alerts-control", 0, 5, None, error="_PARTITION_EOF"),
        FakeMessage("alerts-control", 1, 0, b'{"action": "cancel", "name": "x"}'),
        FakeMessage("alerts-control", 0, -1, None, error="_TRANSPORT"),
    ]
    assert reader.poll() == [ControlRecord("alerts-control", 1, 0, {"action": "cancel", "name": "x"})]


def test_close_closes_the_consumer_and_records_are_frozen(consumer_class):
    reader, consumer = make_reader()
    reader.close()
    assert consumer.closed
    record = ControlRecord("t", 0, 0, {"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.offset = 1  # type: ignore[misc]
