"""The Kafka loop: consume a micro-batch, score it, publish anomalies and dead letters, commit.

At-least-once, in this order for every batch (nothing is committed after a failure):
produce anomalies and dead letters -> flush, raising on any undelivered record -> commit the
batch's offsets synchronously. A crash between flush and commit replays the batch: its
anomalies may be published twice, never lost.

The loop is single-threaded: librdkafka does the network I/O and buffering in its own
threads, so consuming the next batch overlaps with the broker sending it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from stream_detector.config import Settings, librdkafka_config
from stream_detector.errors import DeliveryError
from stream_detector.events.decode import DecodedBatch, decode_batch
from stream_detector.metrics import Metrics, MetricsServer, observe_many
from stream_detector.records import dead_letter_headers, encode_anomalies
from stream_detector.runtime.topics import ensure_topics
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

log = logging.getLogger("stream_detector.daemon")

# A dead-letter copy larger than this is cut (the headers keep the reason and source offset),
# so one huge record cannot make the dead-letter produce fail and stall the partition.
MAX_DEAD_LETTER_BYTES = 512 * 1024
FLUSH_LOG_EVERY_S = 10.0


@dataclass
class _DeliveryTracker:
    """Latches delivery failures; records consume-to-delivery latency of anomalies."""

    metrics: Metrics
    failures: list[KafkaError] = field(default_factory=list)

    def callback(self, consumed_at: float, is_anomaly: bool):
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.failures.append(err)
            elif is_anomaly:
                self.metrics.latency.observe(time.monotonic() - consumed_at)

        return on_delivery


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
    conf.update(librdkafka_config(settings, "producer"))
    return conf


class Daemon:
    """``stream-detector run``: owns the clients, the pipeline and the metrics server."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, pipeline: ScoringPipeline | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.pipeline = pipeline or build_pipeline(settings)
        self.schema = event_schema(settings)
        self._stop = threading.Event()
        self._assigned: set[tuple[str, int]] = set()
        self._last_error_log = 0.0
        self._tracker = _DeliveryTracker(self.metrics)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._server: MetricsServer | None = None
        self._running = False
        self._init_metrics()

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the current batch, flush, commit and exit."""
        if not self._stop.is_set():
            log.info("stopping: finishing the current batch")
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        k = self.settings.kafka
        if k.create_topics:
            partitions = k.topic_partitions
            ensure_topics(
                k.bootstrap_servers,
                {k.input_topic: partitions, k.output_topic: partitions, k.dlq_topic: partitions},
                client_config=librdkafka_config(self.settings, "admin"),
            )
        if self.settings.metrics.enabled:
            self._server = MetricsServer(self.metrics, self.settings.metrics.host, self.settings.metrics.port, self.readiness).start()
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics.host, self._server.port)
        self._producer = Producer({**producer_config(self.settings), "error_cb": self._on_kafka_error})
        self._consumer = Consumer({**consumer_config(self.settings), "error_cb": self._on_kafka_error, "stats_cb": self._on_stats})
        self._consumer.subscribe([k.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("consuming %s as group %s from %s", k.input_topic, k.group_id, k.bootstrap_servers)
        self._running = True
        self.metrics.up.set(1)
        try:
            self._loop()
        finally:
            self._running = False
            self.metrics.up.set(0)
            self._close()
        return 0

    @property
    def metrics_port(self) -> int | None:
        return self._server.port if self._server else None

    def readiness(self) -> tuple[bool, str]:
        if not self._running:
            return False, "not running"
        if not self._assigned:
            return False, "no partitions assigned yet"
        return True, f"ready: {len(self._assigned)} partition(s) assigned"

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_size = self.settings.processing.batch_size
        max_wait_s = self.settings.processing.max_wait_ms / 1000.0
        while not self._stop.is_set():
            messages = self._consumer.consume(batch_size, timeout=max_wait_s)
            if messages:
                self._process(messages, consumed_at=time.monotonic())

    def _close(self) -> None:
        if self._producer is not None:
            remaining = self._producer.flush(10)
            if remaining:
                log.warning("%d records still undelivered at shutdown; their offsets were not committed", remaining)
        if self._consumer is not None:
            self._consumer.close()
        if self._server is not None:
            self._server.stop()
        log.info("stopped")

    # -- one batch -------------------------------------------------------------------------

    def _process(self, messages: list[Message], consumed_at: float) -> None:
        started = time.perf_counter()
        records = [m for m in messages if self._is_record(m)]
        if not records:
            return
        decoded = decode_batch([m.value() for m in records], self.schema)
        result = self.pipeline.process(decoded.features)
        self._produce_anomalies(records, decoded, result, consumed_at)
        self._produce_dead_letters(records, decoded, consumed_at)
        self._flush()
        self._commit(records)
        self._observe(decoded, result, len(records), time.perf_counter() - started)

    def _is_record(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            raise KafkaException(err)
        log.warning("consume error: %s", err, extra={"topic": msg.topic(), "partition": msg.partition()})
        return False

    def _produce_anomalies(self, records: list[Message], decoded: DecodedBatch, result: BatchResult, consumed_at: float) -> None:
        assert self._producer is not None
        topic = self.settings.kafka.output_topic
        names = self.pipeline.detector_names
        for i, key, value in encode_anomalies(self.pipeline, decoded, result):
            self._produce(topic, key, value, None, self._tracker.callback(consumed_at, True))
            self.metrics.anomalies.inc()
            k = len(names)
            for name in names:
                if 1.0 - min(1.0, k * result.probability[name][i]) > result.threshold:
                    self.metrics.fired.labels(name).inc()

    def _produce_dead_letters(self, records: list[Message], decoded: DecodedBatch, consumed_at: float) -> None:
        topic = self.settings.kafka.dlq_topic
        for bad in decoded.invalid:
            msg = records[bad.index]
            headers = dead_letter_headers(bad, msg.topic(), msg.partition(), msg.offset())
            value = msg.value()
            if value is not None and len(value) > MAX_DEAD_LETTER_BYTES:
                value = value[:MAX_DEAD_LETTER_BYTES]
                headers.append(("dlq.truncated", b"true"))
            self._produce(topic, msg.key(), value, headers, self._tracker.callback(consumed_at, False))
            self.metrics.dlq.labels(bad.reason).inc()
            log.warning(
                "dead-lettered record: %s",
                bad.reason,
                extra={"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(), "detail": bad.detail[:200]},
            )

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any, on_delivery: Any) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                # Local queue full: let librdkafka send, then try again.
                self._producer.poll(0.05)

    def _flush(self) -> None:
        """Wait until every record of the batch is delivered; raise if any failed."""
        assert self._producer is not None
        waited = 0.0
        while self._producer.flush(1.0) > 0:
            waited += 1.0
            if waited % FLUSH_LOG_EVERY_S == 0:
                log.warning("waiting for the broker to acknowledge %d record(s) (%.0f s)", len(self._producer), waited)
        if self._tracker.failures:
            errors, self._tracker.failures = self._tracker.failures, []
            raise DeliveryError(f"{len(errors)} record(s) not delivered, first: {errors[0]}", errors[0])

    def _commit(self, records: list[Message]) -> None:
        assert self._consumer is not None
        next_offsets: dict[tuple[str, int], int] = {}
        for msg in records:
            tp = (msg.topic(), msg.partition())
            next_offsets[tp] = max(next_offsets.get(tp, -1), msg.offset() + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
            self.metrics.commits.labels("ok").inc()
        except KafkaException as exc:
            # Typically a rebalance took the partitions away: the new owner re-reads from the
            # last committed offset (at-least-once), so log and go on.
            self.metrics.commits.labels("failed").inc()
            log.warning("offset commit failed: %s", exc.args[0], extra={"offsets": [f"{t}/{p}@{o}" for (t, p), o in next_offsets.items()]})

    # -- metrics and callbacks ---------------------------------------------------------------

    def _init_metrics(self) -> None:
        m = self.metrics
        m.threshold.set(self.pipeline.threshold)
        for name in self.pipeline.detector_names:
            m.detector_enabled.labels(name).set(1)
            m.calibrated.labels(name).set(0)
            m.fired.labels(name)
        for detector in self.pipeline.detectors:
            device = getattr(detector, "device", None)
            if device is not None:
                m.device.info({"device": str(device)})

    def _observe(self, decoded: DecodedBatch, result: BatchResult, n_records: int, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.batch_size.observe(n_records)
        m.rounds.observe(result.rounds)
        m.events.labels("scored").inc(decoded.features.n)
        m.events.labels("invalid").inc(len(decoded.invalid))
        observe_scores(m, result)
        for detector in self.pipeline.detectors:
            m.calibrated.labels(detector.name).set(1 if self.pipeline.calibrators[detector.name].ready else 0)
            if hasattr(detector, "n_keys"):
                for ks, n in detector.n_keys().items():
                    m.keys.labels(ks).set(n)
                for ks, n in detector.learning_keys().items():
                    m.learning_keys.labels(ks).set(n)
            loss = getattr(detector, "last_train_loss", None)
            if loss is not None:
                m.train_loss.set(loss)
                m.train_steps.set(detector.train_steps_total)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self.metrics.assigned.set(len(self._assigned))
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are processed synchronously between consume() calls, so nothing is in
        # flight here: every consumed offset was committed or will be re-read by the next owner.
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            try:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        self.metrics.assigned.set(len(self._assigned))
        log.info("revoked %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions))

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            log.error("fatal Kafka error: %s", err)
            self.stop()
            return
        now = time.monotonic()
        # Broker-down errors repeat every few ms; log them at most every 10 s.
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.warning("Kafka: %s (librdkafka keeps retrying)", err)

    def _on_stats(self, stats_json: str) -> None:
        stats = orjson.loads(stats_json)
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                if pid == "-1" or (topic, int(pid)) not in self._assigned:
                    continue
                lag = p.get("consumer_lag", -1)
                if lag >= 0:
                    self.metrics.lag.labels(topic, pid).set(lag)


def observe_scores(metrics: Metrics, result: BatchResult) -> None:
    """Add a batch's calibrated scores to the score histograms, per detector and fused."""
    series = {name: 1.0 - p for name, p in result.probability.items()}
    series["fused"] = result.fused
    for name, values in series.items():
        observe_many(metrics.score.labels(name), np.asarray(values, dtype=np.float64))
