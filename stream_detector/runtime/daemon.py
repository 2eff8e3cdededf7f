"""The Kafka loop: consume a micro-batch, score it, publish anomalies and dead letters, commit.

At-least-once, in this order for every checkpoint (nothing is committed after a failure):
every output produced before it is delivered -> the partitions' state snapshots are delivered
-> their offsets are committed. A crash before the commit replays the work since the previous
checkpoint: its anomalies may be published twice, never lost. The loop does not wait for those
deliveries: it captures the state (a few ms), keeps consuming and scoring, and takes each next
step once the delivery reports it depends on are in (``PendingCheckpoint``).

The loop is single-threaded: librdkafka does the network I/O, buffering and compression in its
own threads, so consuming the next batch overlaps with the broker sending it, and delivery
reports are served on the loop's thread by ``poll``.

This module wires the parts, each in its own module: ``clients`` (configuration, the producer
and its replacement), ``delivery`` (delivery reports), ``checkpoint`` (the checkpoint order,
one class per guarantee), ``partitions`` (assign, restore, rewind, forget), ``publishing``
(anomaly, silence and dead-letter records), ``control_loop`` (control and feedback topics)
and ``observe`` (metric updates).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from stream_detector import consumed
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import WindowBook
from stream_detector.config import Settings, librdkafka_config
from stream_detector.errors import DeliveryError, StateError, StreamDetectorError
from stream_detector.metrics import Metrics
from stream_detector.metrics_server import MetricsServer
from stream_detector.runtime import partitions as parts
from stream_detector.runtime.checkpoint import (
    ABORT_ATTEMPT_S,
    ABORT_TIMEOUT_S,
    CHECKPOINT_SLICES,
    AtLeastOnceCheckpoint,
    ExactlyOnceCheckpoint,
    PendingCheckpoint,
)
from stream_detector.runtime.clients import (
    ERROR_LOG_EVERY_S,
    FENCED,
    KAFKA_LOG,
    ErrorLog,
    consumer_config,
    discard_producer,
    input_partition_count,
    new_producer,
    producer_config,
    repeated,
)
from stream_detector.runtime.control import ControlReader
from stream_detector.runtime.control_loop import MAX_PENDING_FEEDBACK, ControlTopics
from stream_detector.runtime.delivery import SHUTDOWN_FLUSH_S, DeliveryTracker
from stream_detector.runtime.liveness import NOT_READY_AFTER_S, Liveness
from stream_detector.runtime.observe import STATE_GAUGES_EVERY_S, init_metrics, observe_alerting, observe_batch, observe_lag, observe_scores, observe_state
from stream_detector.runtime.partitions import PartitionWork, Restorer
from stream_detector.runtime.population import TOPIC_CONFIG as POPULATION_TOPIC_CONFIG
from stream_detector.runtime.population import exchange_for, source_of
from stream_detector.runtime.publishing import MAX_DEAD_LETTER_BYTES, Publisher
from stream_detector.runtime.topics import ensure_topics
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import ScoringPipeline
from stream_detector.state.changelog import COMPACTED

__all__ = [
    "ABORT_ATTEMPT_S",
    "ABORT_TIMEOUT_S",
    "CHECKPOINT_SLICES",
    "ERROR_LOG_EVERY_S",
    "KAFKA_LOG",
    "MAX_DEAD_LETTER_BYTES",
    "MAX_PENDING_FEEDBACK",
    "NOT_READY_AFTER_S",
    "REPORT_EVERY_S",
    "SHUTDOWN_FLUSH_S",
    "SHUTDOWN_TIMEOUT_S",
    "STATE_GAUGES_EVERY_S",
    "Daemon",
    "PartitionWork",
    "consumer_config",
    "input_partition_count",
    "observe_scores",
    "producer_config",
]

log = logging.getLogger("stream_detector.daemon")

# While waiting for input, delivery reports are served at least this often.
REPORT_EVERY_S = 0.005
# Shutdown is bounded, so a daemon whose broker is gone never lingers: the final checkpoint
# gives up after SHUTDOWN_FLUSH_S, and past SHUTDOWN_TIMEOUT_S after the stop the process
# exits 1 whatever it is waiting for (the uncommitted work is redone by the next start).
SHUTDOWN_TIMEOUT_S = 30.0


class Daemon:
    """``stream-detector run``: owns the clients, the per-partition pipelines and the metrics server.

    State ownership: every assigned input partition has its own pipeline, restored from the
    changelog topic on assignment and checkpointed on revocation, so partitions (and their
    per-key state) move between instances of the group without loss.

    Checkpoint (every ``processing.commit_interval_ms``, on revocation and at shutdown; the
    order is in ``checkpoint``):
    * at-least-once, staggered (``CHECKPOINT_SLICES``): capture the due dirty partitions'
      snapshots and positions -> once every
      output produced before the capture is delivered, produce the snapshots -> once they are
      delivered, commit the offsets. The loop goes on scoring meanwhile; on revocation and at
      shutdown the same steps run to the end before returning (outputs flushed first);
    * exactly-once: snapshots and ``send_offsets_to_transaction`` inside the open transaction
      -> commit it -> begin the next one.
    A failure inside a checkpoint interval aborts (exactly-once) and rewinds every partition to
    its last snapshot and offset, then carries on.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None, pipeline: ScoringPipeline | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        # A fresh pipeline, copied for every partition that has no snapshot yet.
        self.pipeline = pipeline or build_pipeline(settings)
        self.schema = event_schema(settings)
        self.exactly_once = settings.processing.guarantee == "exactly-once"
        self.changelog_topic = settings.state.changelog_topic or f"{settings.kafka.group_id}-state"
        self._partitions: dict[tuple[str, int], PartitionWork] = {}
        self._stop = threading.Event()
        self._errors = ErrorLog()
        self._liveness = Liveness(settings.processing)  # progress, rewinds, the loop's turns
        self._closing = False
        self._shutdown_timer: threading.Timer | None = None
        self._stopped_at: float | None = None  # monotonic time of the stop request
        self._in_run = False
        self._last_checkpoint = time.monotonic()
        self._records_since_checkpoint = 0  # consumed since the last checkpoint started
        self._state_gauges_stale = False  # processed since the state gauges were last set
        self._state_gauges_at = 0.0  # monotonic time they were last set
        self._tracker = DeliveryTracker(self.metrics)
        checkpoint = ExactlyOnceCheckpoint if self.exactly_once else AtLeastOnceCheckpoint
        self._checkpoints = checkpoint(
            self._tracker,
            self.changelog_topic,
            settings.state.enabled,
            lambda: self._stopped_at,
            self._check_progress,
            self._stop.is_set,
            self.metrics.changelog_bytes.inc,
        )
        self._pending: PendingCheckpoint | None = None
        self._restorer = Restorer(settings, self.pipeline, self.metrics, self.changelog_topic)
        self.policy = AlertPolicy(WindowBook(settings.alerts.windows, max_seconds=settings.alerts.max_window_seconds))
        self._publisher = Publisher(settings, self.metrics, self.policy, self._tracker)
        self._controls = ControlTopics(settings, self.metrics, self.policy)
        # Calibration shared by every partition (runtime/population.py); None: not shared.
        self._population = exchange_for(settings, self.metrics, self._tracker)
        self._control: ControlReader | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._server: MetricsServer | None = None
        self._running = False
        self._exit_code = 0
        if any("debug" in conf for conf in (settings.kafka.client_config, settings.kafka.consumer_config, settings.kafka.producer_config)):
            KAFKA_LOG.setLevel(logging.DEBUG)  # librdkafka's debug contexts were asked for: show them
        self._init_metrics()
        for detector in self.pipeline.detectors if settings.state.enabled else []:
            if not detector.saves_state:
                log.warning("the state of detector %s is not saved (no state.signing_key): it restarts fresh", detector.name)

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the current batch, checkpoint and exit."""
        if not self._stop.is_set():
            log.info("stopping: finishing the current batch")
        self._stop.set()
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._arm_shutdown_deadline()

    def _arm_shutdown_deadline(self) -> None:
        """From the stop request (or the loop's failure) on, the process ends within
        SHUTDOWN_TIMEOUT_S whatever it is blocked on."""
        if self._shutdown_timer is None:
            self._shutdown_timer = threading.Timer(SHUTDOWN_TIMEOUT_S, self._force_exit)
            self._shutdown_timer.daemon = True
            self._shutdown_timer.start()

    def _force_exit(self) -> None:
        if not self._in_run:  # finished meanwhile (or never started)
            return
        log.error("shutdown did not finish within %.0f s: exiting now (exit code 1); uncommitted work will be redone on restart", SHUTDOWN_TIMEOUT_S)
        os._exit(1)  # the handlers flush every line they write

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        """Serve until stopped; the exit code (1 where the loop failed or work was left uncommitted)."""
        self._in_run = True
        try:
            return self._run()
        finally:
            self._in_run = False
            if self._shutdown_timer is not None:
                self._shutdown_timer.cancel()

    def _run(self) -> int:
        k = self.settings.kafka
        # Health first: /healthz answers while the broker is still out of reach.
        if self.settings.metrics.enabled:
            self._server = MetricsServer(self.metrics, self.settings.metrics.host, self.settings.metrics.port, self.readiness, alive=self.liveness).start()
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics.host, self._server.port)
        if not self._until_done(self._prepare_topics, "preparing topics"):
            self._close()
            return self._exit_code
        self._producer = self._new_producer()
        self._checkpoints.begin(self._producer)
        if self._population is not None:
            self._population.open()
        control_topics = self._controls.topics
        if control_topics:
            self._control = ControlReader(k.bootstrap_servers, control_topics, librdkafka_config(self.settings, "consumer"), f"{k.group_id}-control")
        self._consumer = Consumer({**consumer_config(self.settings), "error_cb": self._on_kafka_error, "stats_cb": self._on_stats, "logger": KAFKA_LOG})
        self._consumer.subscribe([k.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("consuming %s as group %s from %s (%s)", k.input_topic, k.group_id, k.bootstrap_servers, self.settings.processing.guarantee)
        self._running = True
        self.metrics.up.set(1)
        self._liveness.started()
        try:
            self._loop()
        except StreamDetectorError as exc:
            self._liveness.failed = str(exc)  # the caller logs it and exits 1
            raise
        except KafkaException as exc:
            self._liveness.failed = str(exc)
            self._exit_code = 1
            log.error("the consume loop stopped on a Kafka error it cannot recover from: %s; exiting (exit code 1)", exc.args[0] if exc.args else exc)
        except Exception as exc:
            self._liveness.failed = repr(exc)
            self._exit_code = 1
            log.exception("the consume loop stopped: %r; exiting (exit code 1)", exc)
        finally:
            self._running = False
            self._closing = True
            self.metrics.up.set(0)
            self._arm_shutdown_deadline()
            self._close()
        return self._exit_code

    def _prepare_topics(self) -> None:
        k = self.settings.kafka
        admin_config = librdkafka_config(self.settings, "admin")
        if k.create_topics:
            partitions = k.topic_partitions
            ensure_topics(k.bootstrap_servers, {k.input_topic: partitions, k.output_topic: partitions, k.dlq_topic: partitions}, client_config=admin_config)
        if self.settings.state.enabled:
            partitions = input_partition_count(k.bootstrap_servers, k.input_topic, admin_config)
            ensure_topics(k.bootstrap_servers, {self.changelog_topic: partitions}, client_config=admin_config, config=COMPACTED)
        control_topics = self._controls.topics
        if control_topics:  # small topics every instance reads whole: one partition each
            ensure_topics(k.bootstrap_servers, dict.fromkeys(control_topics, 1), client_config=admin_config)
        if self._population is not None:  # read whole by every instance; one record per partition
            ensure_topics(k.bootstrap_servers, {self._population.topic: 1}, client_config=admin_config, config=POPULATION_TOPIC_CONFIG)

    def _until_done(self, step: Callable[[], object], what: str) -> bool:
        """Retry ``step`` with backoff while the broker is unreachable; False if asked to stop."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                step()
                return True
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s failed, retrying in %.0f s: %s", what, delay, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        return False

    @property
    def metrics_port(self) -> int | None:
        return self._server.port if self._server else None

    def _close(self) -> None:
        if self._producer is not None and not self.exactly_once:
            # After a failure nothing more is committed: what is still queued is not waited for.
            remaining = self._producer.flush(0 if self._exit_code or self._liveness.failed else SHUTDOWN_FLUSH_S)
            if remaining:
                log.warning("%d records still undelivered at shutdown; their offsets were not committed", remaining)
        if self._consumer is not None:
            self._consumer.close()
        if self._control is not None:
            self._control.close()
        if self._population is not None:
            self._population.close()
        if self._server is not None:
            self._server.stop()
        log.info("stopped")

    # -- liveness --------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        return self._liveness.readiness(self._running, len(self._partitions))

    def liveness(self) -> tuple[bool, str]:
        return self._liveness.liveness(self._running)

    def _settled(self) -> None:
        """Nothing arrived: with nothing uncommitted and (after a rewind) the input read up to
        its end, there is nothing left to do, which counts as progress."""
        if self._pending is not None or any(w.dirty for w in self._partitions.values()):
            return
        if self._liveness.rewinds and not self._caught_up():
            return
        self._liveness.made_progress()

    def _caught_up(self) -> bool:
        """Every owned partition read up to its (last known) end."""
        assert self._consumer is not None
        tps = [TopicPartition(t, p) for t, p in self._partitions]
        if not tps:
            return True
        try:
            positions = self._consumer.position(tps)
            for tp in positions:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset < 0 or high < 0 or tp.offset < high:
                    return False
        except KafkaException:
            return False
        return True

    def _check_progress(self) -> None:
        """A turn of the loop: StalledError when work has waited processing.max_stall_s for progress."""
        self._liveness.check(self._stop.is_set())

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_size = self.settings.processing.batch_size
        max_wait_s = self.settings.processing.max_wait_ms / 1000.0
        interval_s = self.settings.processing.commit_interval_ms / 1000.0
        while not self._stop.is_set():
            if self._control is not None:
                self._read_control()
            if self._population is not None:
                self._population.read(self._partitions)
            # Every assigned partition has its own pipeline: ask for batch_size records per
            # partition, so each pipeline scores batches of up to batch_size (fewer, bigger
            # batches), not batch_size / partitions.
            wanted = batch_size * max(1, len(self._partitions))
            messages = self._arrived(wanted, max_wait_s)
            if messages:
                self._records_since_checkpoint += len(messages)
                self._guarded(self._process, messages, time.monotonic())
            if self._pending is not None:
                self._guarded(self._advance_checkpoint)
            if self._state_gauges_stale and time.monotonic() - self._state_gauges_at >= STATE_GAUGES_EVERY_S:
                self._observe_state()
            since = time.monotonic() - self._last_checkpoint
            if since >= interval_s / self._checkpoints.slices(len(self._partitions)):
                self._guarded(self._checkpoint)
            elif not messages and self._caught_up_after_burst(since, interval_s):
                self._guarded(self._checkpoint, True)
            if not messages:
                self._settled()
            self._check_progress()
        self._guarded(self._checkpoint_now)

    def _caught_up_after_burst(self, since_last_s: float, interval_s: float) -> bool:
        """Checkpoint now rather than at the end of the interval: the input went quiet (nothing
        arrived for max_wait_ms) after a burst of at least batch_size records. A backlog that
        was just worked off is then committed at once instead of up to an interval later (and
        not redone after a restart). A steady trickle never qualifies, and early checkpoints
        are at least a quarter of the interval apart, so they stay rare."""
        return (
            self.settings.processing.checkpoint_when_caught_up
            and self._pending is None
            and self._records_since_checkpoint >= self.settings.processing.batch_size
            and since_last_s >= interval_s / 4
        )

    def _arrived(self, wanted: int, max_wait_s: float) -> list[Message]:
        """Up to ``wanted`` records of what has arrived, without waiting for more; when nothing
        has, up to ``max_wait_s`` for the first one. Batches never wait to fill: at low rates
        events are scored as they come, and when the loop falls behind the fetched backlog
        fills them (bigger batches, cheaper per event), so the batch size follows the load.
        """
        assert self._consumer is not None and self._producer is not None
        messages = self._consumer.consume(wanted, timeout=0)
        if messages:
            return messages
        deadline = time.monotonic() + max_wait_s
        while True:
            # In slices: delivery reports (latency, the pending checkpoint) are served between.
            first = self._consumer.poll(min(REPORT_EVERY_S, max(0.0, deadline - time.monotonic())))
            self._producer.poll(0)
            if first is not None:
                return [first, *self._consumer.consume(wanted - 1, timeout=0)] if wanted > 1 else [first]
            if time.monotonic() >= deadline:
                return []

    def _guarded(self, step: Callable[..., object], *args: Any) -> None:
        """Run one step; on a Kafka or delivery failure, abort and rewind to the last checkpoint."""
        try:
            step(*args)
        except (KafkaException, DeliveryError) as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else getattr(exc, "kafka_error", None)
            if isinstance(error, KafkaError) and (error.fatal() or error.code() in FENCED):
                if self.exactly_once or not isinstance(exc, DeliveryError):
                    raise  # exactly-once: a newer instance owns our transactional.id; stop
                # At-least-once has no transactional.id, so no other instance can own this
                # producer's identity, but a broker may still fence an idempotent producer
                # (tansu 0.6.0 does after message timeouts). Its undelivered records are
                # redone below by a new producer, like any other delivery failure.
                log.warning("the producer was fenced (%s): replacing it", error)
                self._replace_producer()
            if self._stop.is_set():
                # Shutting down: leave the work uncommitted; the next start redoes it.
                log.error("final checkpoint failed; uncommitted work will be redone on restart: %s", exc)
                self._exit_code = 1
                return
            log.error("processing failed, rewinding to the last checkpoint: %s", exc)
            self._recover()

    # -- one batch -------------------------------------------------------------------------

    def _process(self, messages: list[Message], consumed_at: float) -> None:
        assert self._producer is not None
        producer, publish = self._producer, self._publisher
        # Grouped by the accessors' own values, checked once per partition below, not per record.
        by_partition: dict[tuple[str | None, int | None], list[Message]] = {}
        for msg in messages:
            if msg.error() is None or self._is_record(msg):
                by_partition.setdefault((msg.topic(), msg.partition()), []).append(msg)
        batch_size = self.settings.processing.batch_size
        budget = self.settings.state.max_bytes
        for (topic, partition), all_records in by_partition.items():
            assert topic is not None and partition is not None, "a consumed record without a topic or partition"
            work = self._partitions.get((topic, partition))
            if work is None:  # fetched before a revocation; the new owner reads it again
                continue
            # The process's state budget, shared by the partitions it owns now.
            work.pipeline.max_state_bytes = None if budget is None else budget // len(self._partitions)
            for start in range(0, len(all_records), batch_size):
                records = all_records[start : start + batch_size]
                started = time.perf_counter()
                scored = score_batch(work.pipeline, self.schema, [m.value() for m in records])
                publish.anomalies(producer, work.pipeline, records, scored, consumed_at)
                publish.silences(producer, work.pipeline, scored.result, consumed_at)
                publish.level_shifts(producer, work.pipeline, scored.result, consumed_at)
                publish.dead_letters(producer, records, scored.decoded, consumed_at)
                if work.position is None and work.origin is None:
                    work.origin = consumed.offset(records[0])
                work.position = consumed.offset(records[-1]) + 1
                work.dirty = True
                features = scored.decoded.features
                if features.n:
                    work.last_event_time = float(features.event_time[-1])
                observe_batch(self.metrics, work.pipeline, scored, time.perf_counter() - started)
            if self._population is not None:
                self._population.contribute(topic, partition, work.pipeline)
        if self._population is not None:
            self._population.publish(producer, consumed_at)
        if by_partition:
            self._state_gauges_stale = True
        # Serve delivery reports now (end-to-end latency is observed there), not at the checkpoint.
        producer.poll(0)

    def _is_record(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            raise KafkaException(err)
        repeats = self._errors.repeats(err)
        if repeats is not None:
            log.warning("consume error: %s%s", err, repeated(repeats), extra={"topic": msg.topic(), "partition": msg.partition()})
        return False

    # -- control and feedback topics -------------------------------------------------------

    def _read_control(self) -> None:
        assert self._control is not None
        self._controls.read(self._control, self._partitions)
        self._observe_alerting()

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint(self, everything: bool = False) -> None:
        """Start a checkpoint of the work since the last one (periodic: the partitions that are
        due, see ``partitions.due``; ``everything``: every dirty partition). At-least-once:
        capture and move on (``_advance_checkpoint`` finishes it); exactly-once: commit now."""
        self._last_checkpoint = time.monotonic()
        checkpoints = self._checkpoints
        if not isinstance(checkpoints, AtLeastOnceCheckpoint):
            self._checkpoint_now()
            return
        if self._pending is not None:  # one at a time; it still waits for deliveries
            return
        self._records_since_checkpoint = 0
        interval_s = self.settings.processing.commit_interval_ms / 1000.0
        dirty = parts.due(self._partitions, checkpoints.slices(len(self._partitions)), everything, interval_s)
        if not dirty:
            return
        self._pending = checkpoints.capture(dirty)
        self._advance_checkpoint()

    def _advance_checkpoint(self) -> None:
        """Take the pending checkpoint's next step if the deliveries it waits for are in."""
        assert self._producer is not None and self._consumer is not None
        pending = self._pending
        if pending is None:
            return
        assert isinstance(self._checkpoints, AtLeastOnceCheckpoint)
        if not self._checkpoints.advance(self._producer, self._consumer, pending, self._partitions):
            return
        self._pending = None
        self._liveness.made_progress()
        self.metrics.commits.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(time.monotonic() - pending.started)

    def _checkpoint_now(self) -> None:
        """Commit the work so far before returning (revocation, shutdown, exactly-once):
        outputs, state snapshots, offsets. A pending checkpoint is folded into this one."""
        assert self._producer is not None and self._consumer is not None
        self._last_checkpoint = time.monotonic()
        self._records_since_checkpoint = 0
        if self._pending is not None:
            for tp, work in self._pending.works.items():
                if self._partitions.get(tp) is work:
                    work.dirty = True
            self._pending = None
        dirty = parts.dirty(self._partitions)
        if not dirty and not self.exactly_once:
            return
        started = time.perf_counter()
        self._checkpoints.commit(self._producer, self._consumer, dirty)
        for work in dirty.values():
            work.dirty = False
            work.checkpointed_at = self._last_checkpoint
        self._liveness.made_progress()
        self.metrics.commits.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)

    # -- failures: abort and rewind ----------------------------------------------------------

    def _recover(self) -> None:
        """Abort what is in flight and rewind every owned partition to its last checkpoint.

        Retried with backoff while the broker is unreachable; a stop request ends the retries
        (the uncommitted work is then redone by the next start).
        """
        self.metrics.recoveries.inc()
        self._liveness.rewound()
        delay = 0.5
        while True:
            try:
                self._rewind()
                return
            except (KafkaException, DeliveryError, StateError) as exc:
                if self._stop.is_set():
                    log.error("recovery abandoned at shutdown: %s", exc)
                    self._exit_code = 1
                    return
                self._check_progress()
                log.warning("recovery failed, retrying in %.1f s: %s", delay, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _rewind(self) -> None:
        assert self._producer is not None and self._consumer is not None
        if self.exactly_once:
            self._abort_transaction()
        else:
            self._checkpoints.rollback(self._producer)
        self._tracker.failures.clear()
        self._pending = None  # its snapshots may be half sent; the state is read back below
        before = dict(self._partitions)
        self._partitions.update(self._restorer.restore(self._consumer, list(before)))
        self._attach_population()
        parts.rewind(self._consumer, self._partitions, before)
        self._checkpoints.begin(self._producer)
        self._last_checkpoint = time.monotonic()

    def _abort_transaction(self) -> None:
        assert self._producer is not None
        if not self._checkpoints.rollback(self._producer):
            self._replace_producer()

    def _replace_producer(self) -> None:
        assert self._producer is not None
        discard_producer(self._producer)
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        return new_producer(self.settings, self._on_kafka_error)

    def _attach_population(self) -> None:
        """Restored pipelines are copies: point their calibrators at the shared fits."""
        if self._population is not None:
            self._population.attach(work.pipeline for work in self._partitions.values())

    # -- metrics ---------------------------------------------------------------------------

    def _init_metrics(self) -> None:
        init_metrics(self.metrics, self.pipeline)

    def _observe_state(self) -> None:
        """Gauges over every partition's pipeline: at most every STATE_GAUGES_EVERY_S."""
        self._state_gauges_stale, self._state_gauges_at = False, time.monotonic()
        observe_state(self.metrics, self.pipeline.detector_names, self._partitions)

    def _observe_alerting(self) -> None:
        observe_alerting(self.metrics, self.policy, self._partitions)

    # -- client callbacks --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Restore before the first event of these partitions is scored, then start each one
        # at the position its state reflects.
        started = time.monotonic()
        restored = self._restorer.restore(consumer, [(tp.topic, tp.partition) for tp in partitions])
        self._liveness.paused(time.monotonic() - started)
        for tp in partitions:
            work = restored[(tp.topic, tp.partition)]
            if work.position is not None:
                tp.offset = work.position
        # Ready (/readyz) only once every partition of the assignment is restored.
        self._partitions.update(restored)
        self._attach_population()
        consumer.assign(partitions)
        self.metrics.assigned.set(len(self._partitions))
        self._state_gauges_stale = True
        self._controls.retry_pending_feedback(self._partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}/{tp.partition}@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing is in flight between consume() calls: checkpoint, then let the partitions go.
        # Not while closing: the final checkpoint is done (or failed, and must not be retried).
        if not self._closing:
            self._guarded(self._checkpoint_now)
        self._forget(partitions)
        log.info("revoked %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them now: committing their offsets would be wrong. Drop their
        # work; under exactly-once the open transaction included them, so rewind the rest.
        self._forget(partitions)
        log.warning("lost %s", ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions))
        if self.exactly_once:
            self._recover()

    def _forget(self, partitions: list[TopicPartition]) -> None:
        parts.forget(self._partitions, partitions, self.metrics)
        if self._population is not None:
            self._population.forget(source_of(tp.topic, tp.partition) for tp in partitions)
        self._state_gauges_stale = True  # the keys of the partitions that left no longer count

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            log.error("fatal Kafka error: %s; stopping (exit code 1)", err)
            self._exit_code = 1
            self.stop()
            return
        # Broker-down errors repeat every few ms: each code at most once per ERROR_LOG_EVERY_S.
        repeats = self._errors.repeats(err)
        if repeats is not None:
            log.warning("Kafka: %s (librdkafka keeps retrying)%s", err, repeated(repeats))

    def _on_stats(self, stats_json: str) -> None:
        observe_lag(self.metrics, stats_json, self._partitions)
