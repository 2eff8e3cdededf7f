"""The population topic: calibration summaries exchanged by every instance of the group.

Each partition's pipeline contributes a summary of its calibrators' reference windows each
time they have learned ``calibration_refresh`` more scores (scoring/shared_calibration.py); the
daemon produces it, keyed by ``<topic>/<partition>``, to a compacted topic of one partition
that every instance reads whole, from the beginning, without a consumer group (as the control
topic). So every instance calibrates with the same merged fit, and a restarted one has it as
soon as it has read the topic, before its own partitions have scored anything.

A record is cumulative: the partition's whole window, not a change. Under at-least-once one
lost or repeated is harmless (the next replaces it); under exactly-once they are produced in
the checkpoint's transaction and read ``read_committed``, so a summary of work that is rolled
back is never seen. A record made by another scoring configuration is counted and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_detector.config import Settings, librdkafka_config, population_topic
from stream_detector.errors import StateError
from stream_detector.metrics import Metrics
from stream_detector.runtime.delivery import DeliveryTracker, Producing, produce
from stream_detector.scoring.pipeline import ScoringPipeline
from stream_detector.scoring.shared_calibration import CalibrationPool

log = logging.getLogger("stream_detector.daemon")

# Records read per turn of the loop at most (the rest on the next turns).
MAX_RECORDS_PER_TURN = 500
# The topic is created compacted, in small segments: compaction only cleans closed segments,
# and a starting instance reads the uncompacted rest. At 60,000 events/s over 12 partitions the
# summaries are about 4 MB/s, so Kafka's default 1 GiB segment would hold minutes of them.
TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.bytes": str(16 * 1024 * 1024), "min.cleanable.dirty.ratio": "0.1"}


def source_of(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


class PopulationExchange:
    """The process's ``CalibrationPool``, fed by its partitions and by the population topic."""

    def __init__(self, settings: Settings, metrics: Metrics, tracker: DeliveryTracker) -> None:
        topic = population_topic(settings)
        assert topic is not None, "calibration is not shared"
        self.topic = topic
        self.settings = settings
        self.metrics = metrics
        self.tracker = tracker
        self.pool = CalibrationPool.from_settings(settings)
        self._reader: Consumer | None = None

    def open(self) -> None:
        """Start reading the topic from its beginning (it exists: the daemon created it)."""
        k = self.settings.kafka
        self._reader = Consumer(
            {
                **librdkafka_config(self.settings, "consumer"),
                "bootstrap.servers": k.bootstrap_servers,
                # Required by the client, never joined: the partition is assigned by hand.
                "group.id": f"{k.group_id}-population",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                # The broker answers a fetch as soon as a summary arrives; this bounds how often
                # an idle reader asks. With 10 ms (and float64 summaries) the broker used about
                # twice the CPU and the daemons 0.8x the events/s (docs/benchmarks.md, section 9).
                "fetch.wait.max.ms": 100,
            }
        )
        self._reader.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        log.info("reading calibration summaries from %s", self.topic)

    def attach(self, pipelines: Iterable[ScoringPipeline]) -> None:
        for pipeline in pipelines:
            self.pool.attach(pipeline)

    def read(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Apply what other instances sent since the last call; never blocks. A summary of a
        partition this process owns (``partitions``) is its own (older, or its previous
        owner's): skipped. Called every turn of the loop, so nothing is done when nothing came."""
        if self._reader is None:
            return
        messages = self._reader.consume(MAX_RECORDS_PER_TURN, timeout=0)
        if not messages:
            return
        owned = {source_of(topic, partition) for topic, partition in partitions}
        for msg in messages:
            if msg.error() is not None:
                continue  # partition EOF and transient errors: the client retries by itself
            key = msg.key()
            source = key.decode("utf-8", "replace") if key else ""
            if source in owned:
                continue
            try:
                self.pool.receive(source, msg.value())
                self.metrics.population.labels("applied").inc()
            except StateError as exc:
                self.metrics.population.labels(exc.reason).inc()
                log.warning("ignored calibration summary %r at offset %d of %s: %s", source, msg.offset(), self.topic, exc)
        self.metrics.calibration_partitions.set(self.pool.sources())

    def contribute(self, topic: str, partition: int, pipeline: ScoringPipeline) -> None:
        self.pool.contribute(source_of(topic, partition), pipeline)

    def publish(self, producer: Producing, consumed_at: float) -> None:
        """Produce the summaries taken since the last call (tracked like every output, so a
        checkpoint waits for them; under exactly-once they are part of its transaction)."""
        outbox = self.pool.take_outbox()
        if not outbox:
            return
        for source, value in outbox.items():
            produce(producer, self.topic, source.encode(), value, None, self.tracker.callback(consumed_at, False))
            self.metrics.population.labels("sent").inc()
        self.metrics.calibration_partitions.set(self.pool.sources())

    def forget(self, sources: Iterable[str]) -> None:
        for source in sources:
            self.pool.forget(source)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def exchange_for(settings: Settings, metrics: Metrics, tracker: DeliveryTracker) -> PopulationExchange | None:
    return PopulationExchange(settings, metrics, tracker) if population_topic(settings) is not None else None
