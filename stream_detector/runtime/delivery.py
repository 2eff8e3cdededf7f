"""Delivery tracking: the delivery reports of everything the daemon produces, grouped in
epochs a checkpoint waits for, plus producing with a full local queue and flushing."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message

from stream_detector.errors import DeliveryError
from stream_detector.metrics import Metrics

log = logging.getLogger("stream_detector.daemon")

FLUSH_LOG_EVERY_S = 10.0
# The final checkpoint gives up waiting for deliveries this long after the stop request.
SHUTDOWN_FLUSH_S = 10.0


class Producing(Protocol):
    """What the daemon needs of a producer to produce and wait for deliveries."""

    def produce(self, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def flush(self, timeout: float = ...) -> int: ...
    def __len__(self) -> int: ...


@dataclass
class DeliveryTracker:
    """Latches delivery failures; records consume-to-delivery latency of anomalies; counts the
    records of each epoch still waiting for their delivery report (a checkpoint closes an
    epoch and waits for it, without flushing the producer)."""

    metrics: Metrics
    failures: list[KafkaError] = field(default_factory=list)
    epoch: int = 0
    outstanding: collections.Counter[int] = field(default_factory=collections.Counter)

    def callback(self, consumed_at: float, is_anomaly: bool) -> Callable[[KafkaError | None, Message], None]:
        epoch = self.epoch
        self.outstanding[epoch] += 1

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            self.outstanding[epoch] -= 1
            if not self.outstanding[epoch]:
                del self.outstanding[epoch]
            if err is not None:
                self.failures.append(err)
            elif is_anomaly:
                self.metrics.latency.observe(time.monotonic() - consumed_at)

        return on_delivery

    def close_epoch(self) -> int:
        """End the current epoch (records produced from now on belong to the next); its number."""
        self.epoch += 1
        return self.epoch - 1

    def delivered_through(self, epoch: int) -> bool:
        """Every record of ``epoch`` and earlier has its delivery report."""
        return all(e > epoch for e in self.outstanding)

    def raise_failures(self) -> None:
        if self.failures:
            errors, self.failures = self.failures, []
            raise DeliveryError(f"{len(errors)} record(s) not delivered, first: {errors[0]}", errors[0])


def produce(producer: Producing, topic: str, key: bytes | None, value: bytes | None, headers: Any, on_delivery: Any, partition: int = -1) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery, partition=partition)
            return
        except BufferError:
            # Local queue full: let librdkafka send, then try again.
            producer.poll(0.05)


def flush(producer: Producing, tracker: DeliveryTracker, stopped_at: Callable[[], float | None], check: Callable[[], None]) -> None:
    """Wait until every record produced so far is delivered; raise if any failed. Gives up
    SHUTDOWN_FLUSH_S after the stop request (``stopped_at``); ``check`` runs every second."""
    waited = 0.0
    while producer.flush(1.0) > 0:
        waited += 1.0
        if waited % FLUSH_LOG_EVERY_S == 0:
            log.warning("waiting for the broker to acknowledge %d record(s) (%.0f s)", len(producer), waited)
        stop = stopped_at()
        if stop is not None and time.monotonic() - stop >= SHUTDOWN_FLUSH_S:
            raise DeliveryError(f"{len(producer)} record(s) not acknowledged within {SHUTDOWN_FLUSH_S:.0f} s of the stop request")
        check()
    tracker.raise_failures()
