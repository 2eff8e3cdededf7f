"""The Kafka loop: consume a micro-batch, score it, publish anomalies and dead letters, commit.

At-least-once, in this order for every checkpoint (nothing is committed after a failure):
every output produced before it is delivered -> the partitions' state snapshots are delivered
-> their offsets are committed. A crash before the commit replays the work since the previous
checkpoint: its anomalies may be published twice, never lost. The loop does not wait for those
deliveries: it captures the state (a few ms), keeps consuming and scoring, and takes each next
step once the delivery reports it depends on are in (``_PendingCheckpoint``).

The loop is single-threaded: librdkafka does the network I/O, buffering and compression in its
own threads, so consuming the next batch overlaps with the broker sending it, and delivery
reports are served on the loop's thread by ``poll``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from stream_detector import consumed
from stream_detector.alerting.feedback import parse_feedback
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import ControlError, WindowBook
from stream_detector.config import Settings, librdkafka_config
from stream_detector.errors import DeliveryError, StalledError, StateError, StreamDetectorError, UnrestorableStateError
from stream_detector.events.decode import DecodedBatch
from stream_detector.logs import RepeatFilter, librdkafka_kind
from stream_detector.metrics import FUSED, Metrics
from stream_detector.metrics_server import MetricsServer
from stream_detector.records import anomaly_records, dead_letter_headers, encode_record, iso_utc, silence_record
from stream_detector.runtime.control import ControlReader
from stream_detector.runtime.topics import ensure_topics
from stream_detector.scoring.batch import ScoredBatch, score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline
from stream_detector.state.changelog import COMPACTED, read_latest_snapshots, snapshot_records

log = logging.getLogger("stream_detector.daemon")
# librdkafka's own log lines, through Python logging (structured like the rest).
KAFKA_LOG = logging.getLogger("stream_detector.librdkafka")
# While a broker is down every client logs the same failures many times a second: the first of
# a kind is logged, its repeats at most once per interval with a count.
ERROR_LOG_EVERY_S = 10.0
KAFKA_LOG.addFilter(RepeatFilter(ERROR_LOG_EVERY_S, kind=librdkafka_kind))

# A dead-letter copy larger than this is cut (the headers keep the reason and source offset),
# so one huge record cannot make the dead-letter produce fail and stall the partition.
MAX_DEAD_LETTER_BYTES = 512 * 1024
FLUSH_LOG_EVERY_S = 10.0
# At-least-once checkpoints are staggered: every commit_interval_ms / slices, the partitions
# longest without one are captured, so the loop stalls for a few partitions' snapshots at a
# time instead of all of them at once (the stall adds to the latency of every record waiting
# behind it). At most this many slices, so many partitions do not mean many commit requests.
CHECKPOINT_SLICES = 4
# While waiting for input, delivery reports are served at least this often.
REPORT_EVERY_S = 0.005
# The gauges over every key of every pipeline (keys, learning keys, calibrated) are refreshed at
# most this often: walking 20,000 keys per partition after every consume took about 5 % of the
# loop at 20,000 events/s, for gauges scraped every few seconds.
STATE_GAUGES_EVERY_S = 1.0
# Feedback naming an event no owned partition remembers waits here (another instance may own
# it, or its partition is being restored); oldest dropped first.
MAX_PENDING_FEEDBACK = 10_000
# An abort is resumed while it times out retriably, for at most ABORT_TIMEOUT_S in all, before
# the transactional producer is replaced. Each attempt returns to the loop's checks (a stop
# request) and logs that the abort is still going on.
ABORT_ATTEMPT_S = 10.0
ABORT_TIMEOUT_S = 30.0
# Shutdown is bounded, so a daemon whose broker is gone never lingers: the final checkpoint
# gives up after SHUTDOWN_FLUSH_S, and past SHUTDOWN_TIMEOUT_S after the stop the process
# exits 1 whatever it is waiting for (the uncommitted work is redone by the next start).
SHUTDOWN_FLUSH_S = 10.0
SHUTDOWN_TIMEOUT_S = 30.0
# /readyz says 503 once work has waited this long for a checkpoint (or 3 commit intervals).
NOT_READY_AFTER_S = 10.0
# Errors after which this producer may not go on: another instance took over.
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


@dataclass
class _DeliveryTracker:
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


@dataclass
class _PendingCheckpoint:
    """An at-least-once checkpoint on its way: the state captured at one moment, then each step
    taken once the deliveries it depends on are reported (see the module docstring)."""

    started: float
    works: dict[tuple[str, int], PartitionWork]  # the partitions captured (still ours at commit?)
    offsets: list[TopicPartition]
    snapshots: list[tuple[int, bytes, bytes]]  # (changelog partition, key, value), encoded at capture
    outputs_epoch: int  # outputs produced before the capture
    snapshots_epoch: int | None = None  # set once the snapshots are produced
    last_log: float = 0.0


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


@dataclass
class PartitionWork:
    """One input partition owned by this instance: its own pipeline (all per-key and global
    model state for the events of that partition) and the next offset to process."""

    pipeline: ScoringPipeline
    position: int | None  # None until the first record (or a restored snapshot) says
    dirty: bool = False  # processed since the last checkpoint
    # Offset of the first record processed while the partition has no checkpoint: where a
    # rewind goes back to when there is neither a snapshot nor a committed offset.
    origin: int | None = None
    last_event_time: float | None = None  # of the latest scored event (active windows gauge)
    # Monotonic time of its last checkpoint capture (or of its assignment): staggered
    # checkpoints take the partitions longest without one first.
    checkpointed_at: float = field(default_factory=time.monotonic)


class _Sources:
    """Input position of record ``j`` of a batch, built only for the records that are asked for
    (the anomalies), not for every record."""

    def __init__(self, records: list[Message]) -> None:
        self._records = records

    def __getitem__(self, j: int) -> dict[str, Any]:
        return consumed.position(self._records[j])._asdict()


class Daemon:
    """``stream-detector run``: owns the clients, the per-partition pipelines and the metrics server.

    State ownership: every assigned input partition has its own pipeline, restored from the
    changelog topic on assignment and checkpointed on revocation, so partitions (and their
    per-key state) move between instances of the group without loss.

    Checkpoint (every ``processing.commit_interval_ms``, on revocation and at shutdown):
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
        self._error_log: dict[int, tuple[float, int]] = {}  # error code -> (last logged, repeats since)
        # Liveness: "progress" is a checkpoint committed, or nothing uncommitted with the input
        # caught up. Rewinds and waiting work are counted from the last progress.
        self._progress_at = time.monotonic()
        self._rewinds_without_progress = 0
        self._heartbeat = time.monotonic()  # the loop's last turn (or wait step)
        self._failed: str | None = None  # why the loop stopped, if it failed
        self._closing = False
        self._shutdown_timer: threading.Timer | None = None
        self._stopped_at: float | None = None  # monotonic time of the stop request
        self._in_run = False
        self._last_checkpoint = time.monotonic()
        self._records_since_checkpoint = 0  # consumed since the last checkpoint started
        self._state_gauges_stale = False  # processed since the state gauges were last set
        self._state_gauges_at = 0.0  # monotonic time they were last set
        self._tracker = _DeliveryTracker(self.metrics)
        self._pending: _PendingCheckpoint | None = None
        self.policy = AlertPolicy(WindowBook(settings.alerts.windows, max_seconds=settings.alerts.max_window_seconds))
        self._control: ControlReader | None = None
        self._pending_feedback: dict[str, tuple[str, str]] = {}  # event_id -> (label, note)
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
        if self.exactly_once:
            self._producer.begin_transaction()
        if self._control_topics:
            self._control = ControlReader(k.bootstrap_servers, self._control_topics, librdkafka_config(self.settings, "consumer"), f"{k.group_id}-control")
        self._consumer = Consumer({**consumer_config(self.settings), "error_cb": self._on_kafka_error, "stats_cb": self._on_stats, "logger": KAFKA_LOG})
        self._consumer.subscribe([k.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("consuming %s as group %s from %s (%s)", k.input_topic, k.group_id, k.bootstrap_servers, self.settings.processing.guarantee)
        self._running = True
        self.metrics.up.set(1)
        self._progress_at = self._heartbeat = time.monotonic()
        try:
            self._loop()
        except StreamDetectorError as exc:
            self._failed = str(exc)  # the caller logs it and exits 1
            raise
        except KafkaException as exc:
            self._failed = str(exc)
            self._exit_code = 1
            log.error("the consume loop stopped on a Kafka error it cannot recover from: %s; exiting (exit code 1)", exc.args[0] if exc.args else exc)
        except Exception as exc:
            self._failed = repr(exc)
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
        if self._control_topics:  # small topics every instance reads whole: one partition each
            ensure_topics(k.bootstrap_servers, dict.fromkeys(self._control_topics, 1), client_config=admin_config)

    @property
    def _control_topics(self) -> list[str]:
        a = self.settings.alerts
        return [t for t in (a.control_topic, a.feedback_topic) if t]

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

    def readiness(self) -> tuple[bool, str]:
        if not self._running:
            return False, "not running"
        if not self._partitions:
            return False, "no partitions assigned (or state not restored) yet"
        rewinds = self._rewinds_without_progress
        if rewinds:
            bound = self.settings.processing.max_rewinds_without_progress
            return False, f"rewinding without progress: {rewinds} rewind(s) since the last checkpoint (processing.max_rewinds_without_progress: {bound})"
        waited = time.monotonic() - self._progress_at
        if waited > self._not_ready_after_s:
            return False, f"no checkpoint for {waited:.0f} s: waiting for the broker"
        return True, f"ready: {len(self._partitions)} partition(s) assigned, state restored"

    @property
    def _not_ready_after_s(self) -> float:
        """Work waiting this long for a checkpoint makes /readyz say 503: NOT_READY_AFTER_S or 3
        commit intervals, and at most half of processing.max_stall_s (503 before the exit)."""
        p = self.settings.processing
        after = max(NOT_READY_AFTER_S, 3 * p.commit_interval_ms / 1000.0)
        return after if p.max_stall_s is None else min(after, p.max_stall_s / 2)

    def liveness(self) -> tuple[bool, str]:
        """/healthz: fails once the loop has stopped on a failure, or when it has not turned for
        processing.max_stall_s (blocked); the process then exits, or should be restarted."""
        if self._failed is not None:
            return False, f"the consume loop stopped: {self._failed}"
        limit = self.settings.processing.max_stall_s
        blocked = time.monotonic() - self._heartbeat
        if self._running and limit is not None and blocked > limit:
            return False, f"the consume loop has not turned for {blocked:.0f} s (processing.max_stall_s: {limit:g})"
        return True, "ok"

    def _made_progress(self) -> None:
        self._progress_at = time.monotonic()
        self._rewinds_without_progress = 0

    def _settled(self) -> None:
        """Nothing arrived: with nothing uncommitted and (after a rewind) the input read up to
        its end, there is nothing left to do, which counts as progress."""
        if self._pending is not None or any(w.dirty for w in self._partitions.values()):
            return
        if self._rewinds_without_progress and not self._caught_up():
            return
        self._made_progress()

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
        """Raise StalledError when work has waited processing.max_stall_s for progress."""
        self._heartbeat = now = time.monotonic()
        limit = self.settings.processing.max_stall_s
        if limit is not None and now - self._progress_at > limit and not self._stop.is_set():
            raise StalledError(
                f"no progress for {now - self._progress_at:.0f} s (processing.max_stall_s: {limit:g}): "
                "nothing committed while work waits; exiting so that a restart reconnects"
            )

    def _loop(self) -> None:
        assert self._consumer is not None
        batch_size = self.settings.processing.batch_size
        max_wait_s = self.settings.processing.max_wait_ms / 1000.0
        interval_s = self.settings.processing.commit_interval_ms / 1000.0
        while not self._stop.is_set():
            if self._control is not None:
                self._read_control()
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
            if since >= interval_s / self._checkpoint_slices():
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
            if isinstance(error, KafkaError) and (error.fatal() or error.code() in _FENCED):
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

    def _close(self) -> None:
        if self._producer is not None and not self.exactly_once:
            # After a failure nothing more is committed: what is still queued is not waited for.
            remaining = self._producer.flush(0 if self._exit_code or self._failed else SHUTDOWN_FLUSH_S)
            if remaining:
                log.warning("%d records still undelivered at shutdown; their offsets were not committed", remaining)
        if self._consumer is not None:
            self._consumer.close()
        if self._control is not None:
            self._control.close()
        if self._server is not None:
            self._server.stop()
        log.info("stopped")

    # -- one batch -------------------------------------------------------------------------

    def _process(self, messages: list[Message], consumed_at: float) -> None:
        # Grouped by the accessors' own values, checked once per partition below, not per record.
        by_partition: dict[tuple[str | None, int | None], list[Message]] = {}
        for msg in messages:
            if msg.error() is None or self._is_record(msg):
                by_partition.setdefault((msg.topic(), msg.partition()), []).append(msg)
        batch_size = self.settings.processing.batch_size
        for (topic, partition), all_records in by_partition.items():
            assert topic is not None and partition is not None, "a consumed record without a topic or partition"
            work = self._partitions.get((topic, partition))
            if work is None:  # fetched before a revocation; the new owner reads it again
                continue
            for start in range(0, len(all_records), batch_size):
                records = all_records[start : start + batch_size]
                started = time.perf_counter()
                scored = score_batch(work.pipeline, self.schema, [m.value() for m in records])
                self._produce_anomalies(work.pipeline, records, scored, consumed_at)
                self._produce_silences(work.pipeline, scored.result, consumed_at)
                self._produce_dead_letters(records, scored.decoded, consumed_at)
                if work.position is None and work.origin is None:
                    work.origin = consumed.offset(records[0])
                work.position = consumed.offset(records[-1]) + 1
                work.dirty = True
                features = scored.decoded.features
                if features.n:
                    work.last_event_time = float(features.event_time[-1])
                self._observe(work.pipeline, scored, time.perf_counter() - started)
        if by_partition:
            self._state_gauges_stale = True
        # Serve delivery reports now (end-to-end latency is observed there), not at the checkpoint.
        if self._producer is not None:
            self._producer.poll(0)

    def _is_record(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            raise KafkaException(err)
        repeats = self._repeats(err)
        if repeats is not None:
            log.warning("consume error: %s%s", err, _repeated(repeats), extra={"topic": msg.topic(), "partition": msg.partition()})
        return False

    def _produce_anomalies(self, pipeline: ScoringPipeline, records: list[Message], scored: ScoredBatch, consumed_at: float) -> None:
        result = scored.result
        if not result.is_anomaly.any():
            return
        topic = self.settings.kafka.output_topic
        fired = result.fired()
        event_time = scored.decoded.features.event_time
        for i, record in anomaly_records(pipeline, scored.decoded, result, _Sources(records)):
            if not self._publishable(record, float(event_time[i]), pipeline):
                continue
            key, value = encode_record(record)
            self._produce(topic, key, value, None, self._tracker.callback(consumed_at, True))
            self.metrics.anomalies.inc()
            for name, on in fired.items():
                if on[i]:
                    self.metrics.fired.labels(name).inc()

    def _produce_silences(self, pipeline: ScoringPipeline, result: BatchResult, consumed_at: float) -> None:
        for timer in pipeline.collective:
            for alert in result.collective:
                record = silence_record(alert, timer.key_set, pipeline.threshold)
                if not self._publishable(record, alert.event_time, pipeline):
                    continue
                key, value = encode_record(record)
                self._produce(self.settings.kafka.output_topic, key, value, None, self._tracker.callback(consumed_at, True))
                self.metrics.anomalies.inc()
                self.metrics.fired.labels(timer.name).inc()
                log.info("%s", record["reasons"][0])

    def _publishable(self, record: dict[str, Any], event_time: float, pipeline: ScoringPipeline) -> bool:
        """Windows and feedback decide whether an anomaly is published (and annotate it)."""
        verdict = self.policy.review(record, event_time, pipeline.feedback)
        if verdict.publish:
            if verdict.annotations:
                self.metrics.annotated.inc()
            return True
        self.metrics.suppressed.labels(verdict.suppressed_by).inc()
        log.debug("suppressed anomaly %s (%s)", record.get("event_id") or record.get("key"), verdict.suppressed_by, extra={"annotations": verdict.annotations})
        return False

    # -- control and feedback topics -------------------------------------------------------

    def _read_control(self) -> None:
        assert self._control is not None
        feedback_topic = self.settings.alerts.feedback_topic
        for rec in self._control.poll():
            try:
                if rec.error is not None:
                    raise ControlError("not_json", rec.error)
                if rec.topic == feedback_topic:
                    self._take_feedback(*parse_feedback(rec.value))
                else:
                    # WindowBook logs what it added, replaced or cancelled, with this source.
                    outcome = self.policy.windows.apply_control(rec.value, source=f"{rec.topic}[{rec.partition}]@{rec.offset}")
                    self.metrics.control.labels(outcome).inc()
                    if outcome == "unknown_window":
                        log.info("alert window %s: nothing to cancel", rec.value.get("name"))
            except ControlError as exc:
                if rec.topic == feedback_topic:
                    self.metrics.feedback.labels("unknown", "invalid").inc()
                else:
                    self.metrics.control.labels(exc.reason).inc()
                log.warning("ignored %s record at offset %d: %s", rec.topic, rec.offset, exc)
        self._observe_alerting()

    def _take_feedback(self, event_id: str, label: str, note: str) -> None:
        """Apply feedback in the partition that remembers the event, or keep it pending."""
        for work in self._partitions.values():
            memory = work.pipeline.feedback
            if memory is not None and memory.knows(event_id):
                outcome = memory.apply(event_id, label, note)
                self.metrics.feedback.labels(label, outcome).inc()
                work.dirty = True  # the new rule goes into the next snapshot
                self._pending_feedback.pop(event_id, None)
                log.info("feedback %s on %s: %s", label, event_id, outcome)
                return
        if event_id not in self._pending_feedback:
            self.metrics.feedback.labels(label, "pending").inc()
        self._pending_feedback[event_id] = (label, note)
        while len(self._pending_feedback) > MAX_PENDING_FEEDBACK:
            old_id, (old_label, _) = next(iter(self._pending_feedback.items()))
            del self._pending_feedback[old_id]
            self.metrics.feedback.labels(old_label, "expired").inc()

    def _retry_pending_feedback(self) -> None:
        for event_id, (label, note) in list(self._pending_feedback.items()):
            if any(w.pipeline.feedback is not None and w.pipeline.feedback.knows(event_id) for w in self._partitions.values()):
                self._take_feedback(event_id, label, note)

    def _observe_alerting(self) -> None:
        m = self.metrics
        windows = self.policy.windows
        m.windows.labels("known").set(len(windows))
        # Partitions that have not scored an event yet have no event time to compare.
        latest = max((w.last_event_time for w in self._partitions.values() if w.last_event_time is not None), default=None)
        m.windows.labels("active").set(windows.active(latest) if latest is not None else 0)
        rules = 0
        for work in self._partitions.values():
            memory = work.pipeline.feedback
            if memory is not None:
                if work.last_event_time is not None:
                    memory.expire(work.last_event_time)  # "in force": drop rules past their TTL
                rules += len(memory)
        m.feedback_rules.set(rules)

    def _produce_dead_letters(self, records: list[Message], decoded: DecodedBatch, consumed_at: float) -> None:
        topic = self.settings.kafka.dlq_topic
        for bad in decoded.invalid:
            msg = records[bad.index]
            source = consumed.position(msg)
            headers = dead_letter_headers(bad, *source)
            value = msg.value()
            if value is not None and len(value) > MAX_DEAD_LETTER_BYTES:
                value = value[:MAX_DEAD_LETTER_BYTES]
                headers.append(("dlq.truncated", b"true"))
            self._produce(topic, msg.key(), value, headers, self._tracker.callback(consumed_at, False))
            self.metrics.dlq.labels(bad.reason).inc()
            log.warning(
                "dead-lettered record: %s",
                bad.reason,
                extra={**source._asdict(), "detail": bad.detail[:200]},
            )
        for i, original in decoded.clamped.items():  # processing.future_timestamps: clamp
            source = consumed.position(records[int(decoded.source_index[i])])
            scored_at = iso_utc(float(decoded.features.event_time[i]))
            log.warning("clamped event time %s to %s", iso_utc(original), scored_at, extra=source._asdict())

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any, on_delivery: Any, partition: int = -1) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery, partition=partition)
                return
            except BufferError:
                # Local queue full: let librdkafka send, then try again.
                self._producer.poll(0.05)

    def _flush(self) -> None:
        """Wait until every record produced so far is delivered; raise if any failed."""
        assert self._producer is not None
        waited = 0.0
        while self._producer.flush(1.0) > 0:
            waited += 1.0
            if waited % FLUSH_LOG_EVERY_S == 0:
                log.warning("waiting for the broker to acknowledge %d record(s) (%.0f s)", len(self._producer), waited)
            if self._stopped_at is not None and time.monotonic() - self._stopped_at >= SHUTDOWN_FLUSH_S:
                raise DeliveryError(f"{len(self._producer)} record(s) not acknowledged within {SHUTDOWN_FLUSH_S:.0f} s of the stop request")
            self._check_progress()
        self._tracker.raise_failures()

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_slices(self) -> int:
        """How many staggered checkpoints make up one commit interval (see CHECKPOINT_SLICES).
        Exactly-once commits every partition in one transaction: one per interval."""
        if self.exactly_once:
            return 1
        return max(1, min(CHECKPOINT_SLICES, len(self._partitions)))

    def _due(self, everything: bool) -> dict[tuple[str, int], PartitionWork]:
        """The dirty partitions a periodic checkpoint captures: this slice's share of the owned
        partitions, longest without a checkpoint first, plus any whose last one is an interval
        old (a slice skipped while the previous checkpoint waited for its deliveries)."""
        dirty = self._dirty()
        slices = self._checkpoint_slices()
        if everything or slices == 1 or not dirty:
            return dirty
        share = -(-len(self._partitions) // slices)
        overdue = time.monotonic() - self.settings.processing.commit_interval_ms / 1000.0
        ranked = sorted(dirty.items(), key=lambda item: item[1].checkpointed_at)
        return {tp: work for k, (tp, work) in enumerate(ranked) if k < share or work.checkpointed_at <= overdue}

    def _checkpoint(self, everything: bool = False) -> None:
        """Start a checkpoint of the work since the last one (periodic: the partitions that are
        due, see ``_due``; ``everything``: every dirty partition). At-least-once: capture and
        move on (``_advance_checkpoint`` finishes it); exactly-once: commit the transaction."""
        self._last_checkpoint = time.monotonic()
        if self.exactly_once:
            self._checkpoint_now()
            return
        if self._pending is not None:  # one at a time; it still waits for deliveries
            return
        self._records_since_checkpoint = 0
        dirty = self._due(everything)
        if not dirty:
            return
        snapshots: list[tuple[int, bytes, bytes]] = []
        if self.settings.state.enabled:
            for (topic, partition), work in dirty.items():
                assert work.position is not None
                # Encoded now: the models keep learning while the records wait their turn.
                records = snapshot_records(topic, partition, work.position, work.pipeline.state_dict())
                snapshots.extend((partition, key, value) for key, value in records)
        offsets = _offsets(dirty)
        captured_at = time.monotonic()
        for work in dirty.values():
            work.dirty = False
            work.checkpointed_at = captured_at
        self._pending = _PendingCheckpoint(captured_at, dirty, offsets, snapshots, self._tracker.close_epoch())
        self._advance_checkpoint()

    def _advance_checkpoint(self) -> None:
        """Take the pending checkpoint's next step if the deliveries it waits for are in:
        outputs delivered -> produce the snapshots; snapshots delivered -> commit the offsets."""
        assert self._producer is not None and self._consumer is not None
        pending = self._pending
        if pending is None:
            return
        self._producer.poll(0)
        self._tracker.raise_failures()
        if pending.snapshots_epoch is None:
            if not self._waited_for(pending, pending.outputs_epoch):
                return
            for partition, key, value in pending.snapshots:
                self._produce(self.changelog_topic, key, value, None, self._tracker.callback(0.0, False), partition=partition)
            pending.snapshots_epoch = self._tracker.close_epoch()
            self._producer.poll(0)
        if not self._waited_for(pending, pending.snapshots_epoch):
            return
        # Only partitions still owned by the same work: a lost partition has another owner now.
        offsets = [tp for tp in pending.offsets if self._partitions.get((tp.topic, tp.partition)) is pending.works[(tp.topic, tp.partition)]]
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        self._pending = None
        self._made_progress()
        self.metrics.commits.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(time.monotonic() - pending.started)

    def _waited_for(self, pending: _PendingCheckpoint, epoch: int) -> bool:
        if self._tracker.delivered_through(epoch):
            return True
        now = time.monotonic()
        if now - pending.started >= FLUSH_LOG_EVERY_S and now - pending.last_log >= FLUSH_LOG_EVERY_S:
            pending.last_log = now
            assert self._producer is not None  # a checkpoint is only ever pending with a producer
            log.warning("checkpoint waiting for the broker to acknowledge %d record(s) (%.0f s)", len(self._producer), now - pending.started)
        return False

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
        dirty = self._dirty()
        if not dirty and not self.exactly_once:
            return
        started = time.perf_counter()
        offsets = _offsets(dirty)
        if self.exactly_once:
            self._produce_snapshots(dirty)
            if offsets:
                self._producer.send_offsets_to_transaction(offsets, self._consumer.consumer_group_metadata(), 30)
            self._producer.commit_transaction(60)
            self._producer.begin_transaction()
        else:
            self._flush()
            self._produce_snapshots(dirty)
            self._flush()
            self._consumer.commit(offsets=offsets, asynchronous=False)
        for work in dirty.values():
            work.dirty = False
            work.checkpointed_at = self._last_checkpoint
        self._made_progress()
        self.metrics.commits.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)

    def _dirty(self) -> dict[tuple[str, int], PartitionWork]:
        return {tp: w for tp, w in self._partitions.items() if w.dirty and w.position is not None}

    def _produce_snapshots(self, parts: dict[tuple[str, int], PartitionWork]) -> None:
        if not self.settings.state.enabled:
            return
        for (topic, partition), work in parts.items():
            assert work.position is not None
            for key, value in snapshot_records(topic, partition, work.position, work.pipeline.state_dict()):
                self._produce(self.changelog_topic, key, value, None, self._tracker.callback(0.0, False), partition=partition)

    def _recover(self) -> None:
        """Abort what is in flight and rewind every owned partition to its last checkpoint.

        Retried with backoff while the broker is unreachable; a stop request ends the retries
        (the uncommitted work is then redone by the next start).
        """
        self.metrics.recoveries.inc()
        self._rewinds_without_progress += 1
        bound = self.settings.processing.max_rewinds_without_progress
        if self._rewinds_without_progress > bound:
            raise StalledError(
                f"{bound} rewind(s) in a row without a checkpoint committed (processing.max_rewinds_without_progress): "
                "the same records fail every time; exiting so that a restart reconnects"
            )
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
            # Records not yet sent would only add duplicates of what is redone.
            self._producer.purge(in_queue=True, in_flight=False)
            self._producer.poll(0)
        self._tracker.failures.clear()
        self._pending = None  # its snapshots may be half sent; the state is read back below
        before = dict(self._partitions)
        self._partitions.update(self._restore(list(before)))
        unrestored = [tp for tp, work in self._partitions.items() if work.position is None]
        committed = self._committed_many(unrestored) if unrestored else {}
        for (topic, partition), work in self._partitions.items():
            position = work.position if work.position is not None else committed[(topic, partition)]
            if position is None:
                # No checkpoint of this partition yet: redo it from where its processing began.
                # Left where it is, the consumer would go on after the undone records.
                position = work.origin = before[(topic, partition)].origin
            if position is not None:
                self._consumer.seek(TopicPartition(topic, partition, position))
        if self.exactly_once:
            self._producer.begin_transaction()
        self._last_checkpoint = time.monotonic()

    def _abort_transaction(self) -> None:
        assert self._producer is not None
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        while True:
            try:
                self._producer.abort_transaction(ABORT_ATTEMPT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                # A timed-out abort goes on in the background and may be called again
                # (librdkafka: "retry call to resume"), e.g. while the broker is still away or
                # the producer bumps its epoch after timed-out messages (KIP-360).
                if error.retriable() and not error.fatal() and time.monotonic() < deadline and not self._stop.is_set():
                    log.warning("abort not finished yet (%s): resuming it", error.str())
                    continue
                # The producer cannot abort (fatal, or still stuck): a new producer with the
                # same transactional.id fences it, and the broker aborts the old transaction.
                log.warning("abort failed (%s): replacing the transactional producer", exc)
                self._replace_producer()
                return

    def _replace_producer(self) -> None:
        assert self._producer is not None
        self._producer.purge(in_queue=True, in_flight=True)
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        producer = Producer({**producer_config(self.settings), "error_cb": self._on_kafka_error, "logger": KAFKA_LOG})
        if self.exactly_once:
            producer.init_transactions(60)
        return producer

    def _committed_many(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        assert self._consumer is not None
        found = self._consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=30)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in found}

    def _restore(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], PartitionWork]:
        """Each partition's pipeline from its newest snapshot, or a fresh one. The partitions
        are read together: one committed-offset lookup and one changelog reader in all."""
        if not self.settings.state.enabled:
            return {tp: PartitionWork(copy.deepcopy(self.pipeline), None) for tp in partitions}
        started = time.perf_counter()
        committed = self._committed_many(partitions)
        wanted: dict[str, dict[int, int | None]] = {}
        for (topic, partition), offset in committed.items():
            if self.exactly_once and offset is None:
                log.info("no committed offset for %s/%d: starting from fresh models", topic, partition)
                continue
            # Exactly-once: the snapshot that belongs to the committed offset (see read_latest_snapshots).
            wanted.setdefault(topic, {})[partition] = offset if self.exactly_once else None
        restored = {
            (topic, partition): found
            for topic, positions in wanted.items()
            for partition, found in read_latest_snapshots(
                librdkafka_config(self.settings, "consumer"),
                self.changelog_topic,
                topic,
                positions,
                # The setting bounds one partition's restore; these are read together.
                timeout_s=self.settings.state.restore_timeout_s * len(positions),
                on_unreadable=functools.partial(self._unreadable_state, topic),
            ).items()
        }
        if wanted:
            self.metrics.restore_seconds.observe(time.perf_counter() - started)
        works = {}
        for tp in partitions:
            pipeline = copy.deepcopy(self.pipeline)
            found = restored.get(tp)
            if found is None:
                if tp in restored:
                    log.info("no saved state for %s/%d: starting from fresh models", *tp)
                works[tp] = PartitionWork(pipeline, None)
                continue
            try:
                failures = pipeline.load_state_dict(found.state)
            except StateError as exc:  # not a pipeline state at all: every part starts fresh
                self._state_failure(tp, "snapshot", exc.reason, str(exc))
                works[tp] = PartitionWork(copy.deepcopy(self.pipeline), None)
                continue
            for failure in failures:
                self._state_failure(tp, failure.part, failure.reason, failure.message)
            work = works[tp] = PartitionWork(pipeline, found.header.position)
            if committed[tp] != work.position:
                # At-least-once: the snapshot was delivered but the commit after it was not (a
                # crash, a lost group membership). Commit its position at the next checkpoint
                # even if no record arrives: otherwise the group's offset stays behind until one does.
                work.dirty = True
        return works

    def _unreadable_state(self, topic: str, partition: int, error: StateError, offset: int | None) -> None:
        """A changelog record (``offset``) or a whole snapshot (None) of ``topic``/``partition``
        that cannot be read: skipped (a partition left without a snapshot starts fresh)."""
        if offset is None:
            self._state_failure((topic, partition), "snapshot", error.reason, str(error))
        else:
            part = f"changelog record {self.changelog_topic}/{partition}@{offset}"
            self._state_failure((topic, partition), part, error.reason, str(error), "skipped")

    def _state_failure(self, tp: tuple[str, int], part: str, reason: str, message: str, outcome: str = "it starts fresh") -> None:
        """Count and log a part of a partition's state that is not restored; under
        ``state.on_unreadable: fail`` stop instead of starting it fresh."""
        self.metrics.restore_failures.labels(reason).inc()
        fields = {"topic": tp[0], "partition": tp[1], "part": part, "reason": reason}
        if self.settings.state.on_unreadable == "fail":
            log.error("state of %s/%d: %s cannot be restored (%s): %s; stopping (state.on_unreadable: fail)", *tp, part, reason, message, extra=fields)
            raise UnrestorableStateError(f"state of {tp[0]}/{tp[1]}: {part} cannot be restored ({reason}): {message} (state.on_unreadable: fail)")
        log.warning("state of %s/%d: %s not restored (%s): %s; %s (state.on_unreadable: reset)", *tp, part, reason, message, outcome, extra=fields)

    # -- metrics and callbacks ---------------------------------------------------------------

    def _init_metrics(self) -> None:
        m = self.metrics
        m.threshold.set(self.pipeline.threshold)
        names = self.pipeline.detector_names
        for name in names:
            m.detector_enabled.labels(name).set(1)
            m.calibrated.labels(name).set(0)
        # The series of the enabled detectors exist from the start, at 0 (see Metrics): what
        # may fire (detectors and collective timers) and the score histograms.
        for name in [*names, *(timer.name for timer in self.pipeline.collective)]:
            m.fired.labels(name)
        for name in [*names, FUSED]:
            m.score.labels(name)
        for detector in self.pipeline.detectors:
            if detector.device is not None:
                m.device.info({"device": detector.device})

    def _observe(self, pipeline: ScoringPipeline, scored: ScoredBatch, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.batch_size.observe(scored.records)
        m.rounds.observe(scored.result.rounds)
        m.events.labels("scored").inc(scored.decoded.features.n)
        m.events.labels("invalid").inc(len(scored.decoded.invalid))
        m.clamped.inc(len(scored.decoded.clamped))
        observe_scores(m, scored.result)
        for detector in pipeline.detectors:
            loss = detector.last_train_loss
            if loss is not None:
                m.train_loss.set(loss)
                m.train_steps.set(detector.train_steps_total)

    def _observe_state(self) -> None:
        """Gauges over every partition's pipeline (calibrated, keys): at most every
        STATE_GAUGES_EVERY_S, since they walk every key of every pipeline."""
        m = self.metrics
        self._state_gauges_stale, self._state_gauges_at = False, time.monotonic()
        keys: dict[str, int] = {}
        learning: dict[str, int] = {}
        works = list(self._partitions.values())
        for name in self.pipeline.detector_names:
            ready = all(w.pipeline.calibrators[name].ready for w in works)
            m.calibrated.labels(name).set(1 if ready else 0)
        for work in works:
            for detector in work.pipeline.detectors:
                for ks, n in detector.n_keys().items():
                    keys[ks] = keys.get(ks, 0) + n
                for ks, n in detector.learning_keys().items():
                    learning[ks] = learning.get(ks, 0) + n
        for ks, n in keys.items():
            m.keys.labels(ks).set(n)
            m.learning_keys.labels(ks).set(learning.get(ks, 0))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Restore before the first event of these partitions is scored, then start each one
        # at the position its state reflects.
        started = time.monotonic()
        restored = self._restore([(tp.topic, tp.partition) for tp in partitions])
        # The time spent restoring is not a stall of the work waiting for a checkpoint.
        self._progress_at += time.monotonic() - started
        self._heartbeat = time.monotonic()
        for tp in partitions:
            work = restored[(tp.topic, tp.partition)]
            if work.position is not None:
                tp.offset = work.position
        # Ready (/readyz) only once every partition of the assignment is restored.
        self._partitions.update(restored)
        consumer.assign(partitions)
        self.metrics.assigned.set(len(self._partitions))
        self._state_gauges_stale = True
        self._retry_pending_feedback()
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
        for tp in partitions:
            self._partitions.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):  # no lag reported for it yet
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        self.metrics.assigned.set(len(self._partitions))
        self._state_gauges_stale = True  # the keys of the partitions that left no longer count

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.metrics.kafka_errors.labels(err.name()).inc()
        if err.fatal():
            log.error("fatal Kafka error: %s; stopping (exit code 1)", err)
            self._exit_code = 1
            self.stop()
            return
        # Broker-down errors repeat every few ms: each code at most once per ERROR_LOG_EVERY_S.
        repeats = self._repeats(err)
        if repeats is not None:
            log.warning("Kafka: %s (librdkafka keeps retrying)%s", err, _repeated(repeats))

    def _repeats(self, err: KafkaError) -> int | None:
        """None to leave this error out of the log (its code was logged less than
        ERROR_LOG_EVERY_S ago), else how many were left out since it was last logged."""
        now = time.monotonic()
        last, repeats = self._error_log.get(err.code(), (float("-inf"), 0))
        if now - last < ERROR_LOG_EVERY_S:
            self._error_log[err.code()] = (last, repeats + 1)
            return None
        self._error_log[err.code()] = (now, 0)
        return repeats

    def _on_stats(self, stats_json: str) -> None:
        stats = orjson.loads(stats_json)
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                if pid == "-1" or (topic, int(pid)) not in self._partitions:
                    continue
                lag = p.get("consumer_lag", -1)
                if lag >= 0:
                    self.metrics.lag.labels(topic, pid).set(lag)


def _repeated(repeats: int) -> str:
    return f" ({repeats} more like it since the previous line)" if repeats else ""


def input_partition_count(bootstrap: str, topic: str, client_config: dict[str, Any]) -> int:
    """Partitions of the input topic (the changelog gets as many); 1 if it does not exist yet."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({**client_config, "bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        log.warning("input topic %s not found: creating the changelog with 1 partition", topic)
        return 1
    return len(found.partitions)


def observe_scores(metrics: Metrics, result: BatchResult) -> None:
    """Add a batch's calibrated scores to the score histograms, per detector and fused."""
    series = {name: 1.0 - p for name, p in result.probability.items()}
    series[FUSED] = result.fused
    for name, values in series.items():
        metrics.score.labels(name).observe_many(np.asarray(values, dtype=np.float64))


def _offsets(parts: dict[tuple[str, int], PartitionWork]) -> list[TopicPartition]:
    """The offsets to commit for checkpointed partitions (``_dirty`` keeps only those with a position)."""
    offsets = []
    for (topic, partition), work in parts.items():
        assert work.position is not None, "a checkpointed partition without a position"
        offsets.append(TopicPartition(topic, partition, work.position))
    return offsets
