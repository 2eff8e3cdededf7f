"""Where a record read from Kafka came from, typed.

confluent-kafka's ``Message`` accessors return Optional values, because the same class carries
client errors and records that are not yet delivered. A record a consumer returned without an
error always has its topic, partition and offset (and an end-of-partition event its topic
and partition), so these helpers check that once, here, instead of at every use.
"""

from __future__ import annotations

from typing import NamedTuple

from confluent_kafka import Message


class RecordPosition(NamedTuple):
    topic: str
    partition: int
    offset: int


def position(msg: Message) -> RecordPosition:
    """Topic, partition and offset of a consumed record (``msg.error()`` is None)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None, "a consumed record without a topic, partition or offset"
    return RecordPosition(topic, partition, offset)


def topic_partition(msg: Message) -> tuple[str, int]:
    """Topic and partition of a consumed record or of an end-of-partition event."""
    topic, partition = msg.topic(), msg.partition()
    assert topic is not None and partition is not None, "a consumed record without a topic or partition"
    return topic, partition


def offset(msg: Message) -> int:
    """Offset of a consumed record."""
    found = msg.offset()
    assert found is not None, "a consumed record without an offset"
    return found
