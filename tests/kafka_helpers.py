"""Small Kafka helpers shared by the integration tests (imported by conftest and tests).

Only confluent-kafka is imported here, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

if TYPE_CHECKING:
    from stream_detector.embedded_broker import EmbeddedBroker

__all__ = [
    "KafkaTarget",
    "MakeTopics",
    "fast_group_config",
    "is_tansu",
    "produce_all",
    "read_all",
    "unique_name",
]

log = logging.getLogger(__name__)

Key = str | bytes | None
Value = str | bytes | None

#: The ``make_topics`` fixture: ``make_topics(partitions=1, n=1, prefix=None, config=None)``.
MakeTopics = Callable[..., list[str]]


@dataclass(frozen=True)
class KafkaTarget:
    """The broker the integration tests run against (the ``kafka_broker`` fixture)."""

    bootstrap_servers: str
    is_tansu: bool  # tansu has known gaps (see stream_detector.embedded_broker) tests may xfail
    embedded: EmbeddedBroker | None = None  # set when this session started the broker


def unique_name(prefix: str = "t") -> str:
    """A topic/group/transactional id no other test (or earlier run on a shared broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def fast_group_config() -> dict[str, Any]:
    """Consumer-group settings that make joins and rebalances quick on tansu.

    Measured on tansu 0.6.0: a join takes about session.timeout.ms / 2, i.e. ~23 s with the
    librdkafka default (45 s) and ~3 s with 6 s. A short heartbeat lets existing members
    notice a rebalance sooner (second member joining: ~3.5 s instead of ~6 s). librdkafka
    requires max.poll.interval.ms >= session.timeout.ms. metadata refresh settings made no
    difference. A member that dies without leaving holds the group until its session
    expires (rejoin ~11 s), so close consumers in tests. Keep the default (eager) assignor:
    cooperative-sticky rebalances were slower on tansu (~11 s for a second member).
    Note that a consumer must poll at least every 7 s with these settings.
    """
    return {
        "session.timeout.ms": 6000,
        "max.poll.interval.ms": 7000,
        "heartbeat.interval.ms": 500,
    }


def is_tansu(bootstrap_servers: str, timeout: float = 10.0) -> bool:
    """Whether the broker looks like tansu (default cluster id, or the embedded broker's)."""
    metadata = AdminClient({"bootstrap.servers": bootstrap_servers}).list_topics(timeout=timeout)
    return "tansu" in (metadata.cluster_id or "").lower()


def produce_all(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[tuple[Key, Value]],
    config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> int:
    """Produce (key, value) pairs, flush, and fail loudly if any delivery failed.

    Returns the number of records delivered.
    """
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 5, **(config or {})})
    count = 0
    for key, value in records:
        _produce_with_backpressure(producer, topic, key, value, on_delivery)
        count += 1
    left = producer.flush(timeout)
    if left or errors:
        raise AssertionError(f"{left} records undelivered, {len(errors)} failed: {errors[:3]}")
    return count


def _produce_with_backpressure(producer: Producer, topic: str, key: Key, value: Value, on_delivery: Any) -> None:
    """produce(), polling for delivery reports whenever the local queue is full."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            producer.poll(0)
            return
        except BufferError:
            producer.poll(0.1)


def read_all(
    bootstrap_servers: str,
    topic: str,
    expected: int | None = None,
    timeout: float = 30.0,
    idle: float = 2.0,
    isolation_level: str = "read_uncommitted",
    client_config: Mapping[str, Any] | None = None,
) -> list[Message]:
    """Read ``topic`` from the beginning of every partition, without a consumer group.

    ``client_config`` adds librdkafka settings (TLS, for example).

    assign() instead of subscribe() means no group join (seconds on tansu) and no commits.
    Stops once it has at least ``expected`` records (the last batch may bring extras, which
    are returned too); without ``expected``, once nothing arrived for ``idle`` seconds; in
    any case after ``timeout`` seconds. Returns the records in arrival order (ordered within
    each partition); the caller asserts on the count.
    """
    consumer = Consumer(
        {
            **(client_config or {}),
            "bootstrap.servers": bootstrap_servers,
            "group.id": unique_name("read-all"),  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": isolation_level,
        }
    )
    try:
        consumer.assign(_all_partitions(consumer, topic, timeout))
        return _drain(consumer, expected, timeout, idle)
    finally:
        consumer.close()


def _all_partitions(consumer: Consumer, topic: str, timeout: float) -> list[TopicPartition]:
    metadata = consumer.list_topics(timeout=timeout)
    topic_metadata = metadata.topics.get(topic)
    if topic_metadata is None or topic_metadata.error is not None:
        raise AssertionError(f"topic {topic!r} not in metadata: {topic_metadata}")
    return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(topic_metadata.partitions)]


def _drain(consumer: Consumer, expected: int | None, timeout: float, idle: float) -> list[Message]:
    records: list[Message] = []
    deadline = time.monotonic() + timeout
    last_arrival = time.monotonic()
    while time.monotonic() < deadline and (expected is None or len(records) < expected):
        if expected is None and time.monotonic() - last_arrival >= idle:
            break
        batch = consumer.consume(num_messages=1000, timeout=0.2)
        for message in batch:
            error = message.error()
            if error is None:
                records.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(f"consume error on {message.topic()}: {error}")
        if batch:
            last_arrival = time.monotonic()
    log.debug("read %d records (expected %s)", len(records), expected)
    return records
