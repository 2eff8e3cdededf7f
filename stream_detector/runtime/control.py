"""Read the control topic (alert windows) and the feedback topic (analysts' verdicts).

Both are small topics that every instance reads whole, from the beginning, without a
consumer group: a restarted instance rebuilds its windows from the control topic, and
feedback is applied idempotently (a rule per marked event_id), so nothing here needs
offsets. The consume loop polls this reader without blocking between batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_detector.consumed import position

log = logging.getLogger("stream_detector.control")

MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ControlRecord:
    topic: str
    partition: int
    offset: int
    value: Any  # decoded JSON, or None with ``error`` set
    error: str | None = None


class ControlReader:
    def __init__(self, bootstrap_servers: str, topics: list[str], client_config: dict[str, Any], group_id: str) -> None:
        self.topics = topics
        self._consumer = Consumer(
            {
                **client_config,
                "bootstrap.servers": bootstrap_servers,
                # Required by the client, never joined: partitions are assigned by hand.
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
            }
        )
        assignment = []
        metadata = self._consumer.list_topics(timeout=10)
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise RuntimeError(f"control topic {topic!r} is not available: {meta.error if meta else 'not found'}")
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        self._consumer.assign(assignment)
        log.info("reading %s from the beginning", ", ".join(topics))

    def poll(self, max_records: int = 500) -> list[ControlRecord]:
        """Whatever arrived since the last call; never blocks."""
        out = []
        for msg in self._consumer.consume(max_records, timeout=0):
            if msg.error() is not None:
                continue  # partition EOF and transient errors: the client retries by itself
            value, source = msg.value(), position(msg)
            try:
                if value is None or len(value) > MAX_RECORD_BYTES:
                    raise ValueError(f"empty or larger than {MAX_RECORD_BYTES} bytes")
                out.append(ControlRecord(*source, orjson.loads(value)))
            except (orjson.JSONDecodeError, ValueError) as exc:
                out.append(ControlRecord(*source, None, f"not JSON: {exc}"))
        return out

    def close(self) -> None:
        self._consumer.close()
