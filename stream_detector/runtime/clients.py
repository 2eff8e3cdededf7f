"""The Kafka clients' configuration, the producer's creation and replacement, and the Kafka
error log (each error code at most once per interval, with a count of the repeats)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Producer

from stream_detector.config import Settings, librdkafka_config
from stream_detector.logs import RepeatFilter, librdkafka_kind

log = logging.getLogger("stream_detector.daemon")
# librdkafka's own log lines, through Python logging (structured like the rest).
KAFKA_LOG = logging.getLogger("stream_detector.librdkafka")
# While a broker is down every client logs the same failures many times a second: the first of
# a kind is logged, its repeats at most once per interval with a count.
ERROR_LOG_EVERY_S = 10.0
KAFKA_LOG.addFilter(RepeatFilter(ERROR_LOG_EVERY_S, kind=librdkafka_kind))
# Errors after which this producer may not go on: another instance took over.
FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


def consumer_config(settings: Settings) -> dict[str, Any]:
    conf = {
        "group.id": settings.kafka.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.kafka.auto_offset_reset,
        "isolation.level": "read_committed",
        "statistics.interval.ms": 5000,
        # Fetch in big chunks: the loop consumes thousands of records per call.
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 65536,
    }
    conf.update(librdkafka_config(settings, "consumer"))
    return conf


def producer_config(settings: Settings) -> dict[str, Any]:
    conf = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # Keep retrying while the broker is away rather than failing records (and then the
        # batch); the flush loop logs while it waits.
        "message.timeout.ms": 0,
        "compression.type": "lz4",
    }
    if settings.processing.guarantee == "exactly-once":
        instance = settings.processing.instance_id or socket.gethostname()
        conf["transactional.id"] = f"{settings.kafka.group_id}-{instance}"
        # librdkafka requires message.timeout.ms <= transaction.timeout.ms; an undelivered
        # record then aborts the transaction and the work is redone from the last checkpoint.
        conf["transaction.timeout.ms"] = 60000
        conf["message.timeout.ms"] = 55000
    conf.update(librdkafka_config(settings, "producer"))
    return conf


def new_producer(settings: Settings, on_error: Callable[[KafkaError], None]) -> Producer:
    """A producer for the daemon (transactions initialised under exactly-once)."""
    producer = Producer({**producer_config(settings), "error_cb": on_error, "logger": KAFKA_LOG})
    if settings.processing.guarantee == "exactly-once":
        producer.init_transactions(60)
    return producer


def discard_producer(producer: Producer) -> None:
    """Drop everything a producer that is being replaced still holds."""
    producer.purge(in_queue=True, in_flight=True)


def input_partition_count(bootstrap: str, topic: str, client_config: dict[str, Any]) -> int:
    """Partitions of the input topic (the changelog gets as many); 1 if it does not exist yet."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({**client_config, "bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        log.warning("input topic %s not found: creating the changelog with 1 partition", topic)
        return 1
    return len(found.partitions)


class ErrorLog:
    """Broker-down errors repeat every few ms: each code is logged at most once per
    ERROR_LOG_EVERY_S, with how many were left out since."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[float, int]] = {}  # error code -> (last logged, repeats since)

    def repeats(self, err: KafkaError) -> int | None:
        """None to leave this error out of the log (its code was logged less than
        ERROR_LOG_EVERY_S ago), else how many were left out since it was last logged."""
        now = time.monotonic()
        last, repeats = self._seen.get(err.code(), (float("-inf"), 0))
        if now - last < ERROR_LOG_EVERY_S:
            self._seen[err.code()] = (last, repeats + 1)
            return None
        self._seen[err.code()] = (now, 0)
        return repeats


def repeated(repeats: int) -> str:
    return f" ({repeats} more like it since the previous line)" if repeats else ""
