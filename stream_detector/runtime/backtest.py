"""``stream-detector backtest``: score a stretch of the input topic, producing nothing.

The consumer is assign-based: it joins no group and commits nothing, so a backtest never
moves the daemon's offsets. Every partition of ``kafka.input_topic`` is read

* from ``--from-offset N`` (clamped to the partition's watermarks: the log start if older
  records are gone, the end if N is past it), or from the offset that ``offsets_for_times``
  gives for ``--from-timestamp`` (the first record at or after that time; a partition with
  none is skipped). Records before offset N, or before the first record whose timestamp is
  at or after the requested time, are also skipped on the client: a no-op on Kafka, and the
  start stays right on brokers whose offset lookups are imprecise (tansu 0.6 answers
  ListOffsets "latest" with the last batch's base offset + 1);
* until ``--until-offset M`` (exclusive) or the end of the partition, whichever comes first.
  "The end" is where the consumer first reaches the end of the partition (librdkafka's
  partition EOF), so on a topic that is still being written the backtest stops once it has
  caught up;
* and at most ``--limit K`` records in all.

Records are consumed ``processing.batch_size`` at a time, as the daemon does, decoded and
scored by ``score_batch`` with a freshly built pipeline per input partition, as the daemon
keeps one per partition it owns (with ``state.max_bytes`` shared between them), and, with
``scaling.share_calibration``, one calibration fit over every partition's window, so a
backtest raises what a daemon that started from the same offsets with no saved state would
raise (no saved model state: the first ``scoring.calibration_min_events`` events cannot raise
anomalies). With shared calibration the fit a batch is calibrated with depends on how far the
other partitions have got, so the two agree up to that timing; without it, exactly. Nothing is
produced: the summary says how many anomalies *would* have been raised and how often each
detector fired.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_detector.config import Settings, librdkafka_config, population_topic
from stream_detector.errors import ConfigError, StreamDetectorError
from stream_detector.events.decode import EventSchema
from stream_detector.events.event_time import iso_utc
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import ScoringPipeline
from stream_detector.scoring.shared_calibration import CalibrationPool

log = logging.getLogger("stream_detector.backtest")

METADATA_TIMEOUT_S = 10.0
# Stop (with a warning) when nothing at all arrives for this long, not even an end of partition.
IDLE_TIMEOUT_S = 30.0


@dataclass
class PartitionRange:
    partition: int
    start: int | None  # first offset to read; None: nothing to read
    end: int | None  # exclusive bound from --until-offset; None: the end of the partition
    first: int | None = None  # first offset actually scored
    last: int | None = None  # last offset actually scored
    records: int = 0
    skipped_before_start: int = 0  # records before the requested offset or time, skipped
    done: bool = False


@dataclass
class BacktestSummary:
    topic: str
    start: str  # "offset N" or "timestamp ISO"
    partitions: list[PartitionRange]
    records: int = 0
    events: int = 0
    invalid: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    anomalies: int = 0
    fired: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_by: str = "end of range"  # end of range | limit | idle
    threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "start": self.start,
            "records": self.records,
            "events": self.events,
            "invalid": self.invalid,
            "invalid_by_reason": self.invalid_by_reason,
            "anomalies": self.anomalies,
            "anomaly_rate": self.events and self.anomalies / self.events,
            "fired": self.fired,
            "fired_rate": {name: (self.events and n / self.events) for name, n in self.fired.items()},
            "threshold": self.threshold,
            "seconds": self.seconds,
            "stopped_by": self.stopped_by,
            "partitions": [vars(p).copy() for p in self.partitions],
        }

    def format(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"backtest of {self.topic} from {self.start}: {self.records:,} records in {self.seconds:.1f} s "
            f"({rate:,.0f} records/s); stopped by: {self.stopped_by}",
            "",
            f"{'partition':>9}{'start':>12}{'until':>12}{'first read':>12}{'last read':>12}{'records':>10}",
        ]
        for p in self.partitions:

            def num(v: int | None) -> str:
                return "-" if v is None else f"{v:,}"

            lines.append(
                f"{p.partition:>9}{num(p.start):>12}{num(p.end) if p.end is not None else 'end':>12}{num(p.first):>12}{num(p.last):>12}{p.records:>10,}"
            )
        skipped = sum(p.skipped_before_start for p in self.partitions)
        if skipped:
            lines.append(f"({skipped:,} records before the requested start skipped on the client)")
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(self.invalid_by_reason.items()))
        lines += [
            "",
            f"events scored: {self.events:,}    invalid: {self.invalid:,}{f' ({reasons})' if reasons else ''}",
            f"anomalies that would have been raised: {self.anomalies:,} ({_pct(self.anomalies, self.events)} of events, threshold {self.threshold})",
            "",
            f"{'detector':<14}{'fired':>10}{'rate':>10}",
        ]
        for name, n in self.fired.items():
            lines.append(f"{name:<14}{n:>10,}{_pct(n, self.events):>10}")
        lines += ["", "nothing was produced and no offsets were committed; the models started untrained."]
        return "\n".join(lines)


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.3f} %" if d else "-"


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds from an ISO-8601 time (naive means UTC)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--from-timestamp {text!r} is not an ISO-8601 time (e.g. 2026-01-05T12:00:00Z)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def backtest_consumer_config(settings: Settings) -> dict[str, Any]:
    """The user's consumer settings (security etc.), then ours, which a backtest needs."""
    return {
        **librdkafka_config(settings, "consumer"),
        # Required by the client; never joined (assign, no commits), so unique and harmless.
        "group.id": f"stream-detector-backtest-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # A start offset past the end: jump to the end (nothing to read) rather than rereading.
        "auto.offset.reset": "latest",
        "isolation.level": "read_committed",
    }


def backtest(
    settings: Settings,
    *,
    from_offset: int | None = None,
    from_timestamp: str | int | None = None,
    until_offset: int | None = None,
    limit: int | None = None,
    pipeline: ScoringPipeline | None = None,
    on_batch: Callable[[list[Message], Any, Any], None] | None = None,
    progress: Callable[[int], None] | None = None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> BacktestSummary:
    """Score ``kafka.input_topic`` from an offset or a time (module docstring); produce nothing.

    ``on_batch(records, decoded, result)`` is called after each scored batch (for tests and
    tools); a batch holds one partition's records. ``pipeline``: the fresh pipeline each
    partition starts from (default: built from ``settings``). ``from_timestamp`` is an ISO
    string or epoch milliseconds.
    """
    if (from_offset is None) == (from_timestamp is None):
        raise ConfigError("give exactly one of --from-offset and --from-timestamp")
    if from_offset is not None and from_offset < 0:
        raise ConfigError(f"--from-offset must be >= 0, got {from_offset}")
    if until_offset is not None and until_offset < 0:
        raise ConfigError(f"--until-offset must be >= 0, got {until_offset}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be > 0, got {limit}")
    ts_ms = None
    if from_timestamp is not None:
        ts_ms = from_timestamp if isinstance(from_timestamp, int) else parse_timestamp(from_timestamp)
    topic = settings.kafka.input_topic
    started = time.monotonic()
    pipeline = pipeline or build_pipeline(settings)
    schema = event_schema(settings)
    consumer = Consumer(backtest_consumer_config(settings))
    try:
        ranges = _plan(consumer, topic, from_offset, ts_ms, until_offset)
        start_text = f"offset {from_offset}" if from_offset is not None else f"timestamp {_iso_ms(ts_ms)}"
        summary = BacktestSummary(topic, start_text, list(ranges.values()), threshold=pipeline.threshold)
        summary.fired = dict.fromkeys(pipeline.detector_names, 0)
        # A partition with no start is done from the outset; the None test is for the type checker.
        active = [TopicPartition(topic, p.partition, p.start) for p in ranges.values() if not p.done and p.start is not None]
        if active:
            consumer.assign(active)
            pipelines = _per_partition(pipeline, ranges, settings.state.max_bytes)
            pool = None
            if population_topic(settings) is not None:  # as the daemon: one fit over every partition's window
                pool = CalibrationPool.from_settings(settings)
                for each in pipelines.values():
                    pool.attach(each)
            _consume(consumer, ranges, summary, pipelines, pool, schema, settings, ts_ms, from_offset, limit, on_batch, progress, idle_timeout_s)
    finally:
        consumer.close()
    summary.seconds = time.monotonic() - started
    return summary


def _per_partition(fresh: ScoringPipeline, ranges: dict[int, PartitionRange], max_bytes: int | None) -> dict[int, ScoringPipeline]:
    """A copy of ``fresh`` for every partition, with the daemon's share of the state budget
    (an instance that owns all of them)."""
    pipelines = {}
    for partition in ranges:
        pipelines[partition] = pipeline = copy.deepcopy(fresh)
        pipeline.max_state_bytes = None if max_bytes is None else max_bytes // len(ranges)
    return pipelines


def _plan(consumer: Consumer, topic: str, from_offset: int | None, ts_ms: int | None, until: int | None) -> dict[int, PartitionRange]:
    metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error if info is not None and info.error is not None else "not found"
        raise StreamDetectorError(f"input topic {topic!r}: {reason}")
    partitions = sorted(info.partitions)
    starts: dict[int, int | None] = {}
    if ts_ms is not None:
        found = consumer.offsets_for_times([TopicPartition(topic, p, ts_ms) for p in partitions], timeout=METADATA_TIMEOUT_S)
        for tp in found:
            if tp.error is not None:
                raise StreamDetectorError(f"offsets_for_times {topic}/{tp.partition}: {tp.error}")
            starts[tp.partition] = tp.offset if tp.offset >= 0 else None  # -1: no record that late
    else:
        assert from_offset is not None
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=METADATA_TIMEOUT_S)
            if from_offset < low:
                log.warning("partition %d starts at offset %d (older records are gone); reading from there", p, low)
            # Past the end: start at the end, which gives an end-of-partition at once.
            starts[p] = min(max(from_offset, low), max(high, low))
    ranges = {}
    for p in partitions:
        start = starts[p]
        done = start is None or (until is not None and start >= until)
        ranges[p] = PartitionRange(p, start, until, done=done)
    return ranges


def _consume(
    consumer: Consumer,
    ranges: dict[int, PartitionRange],
    summary: BacktestSummary,
    pipelines: dict[int, ScoringPipeline],
    pool: CalibrationPool | None,
    schema: EventSchema,
    settings: Settings,
    ts_ms: int | None,
    from_offset: int | None,
    limit: int | None,
    on_batch: Callable[..., None] | None,
    progress: Callable[[int], None] | None,
    idle_timeout_s: float,
) -> None:
    batch_size = settings.processing.batch_size
    max_wait_s = settings.processing.max_wait_ms / 1000.0
    names = next(iter(pipelines.values())).detector_names
    reasons: Counter[str] = Counter()
    # Until a partition has given a record at or after the start time, skip earlier ones.
    reached_time = {p: ts_ms is None for p in ranges}
    last_activity = time.monotonic()
    while not all(p.done for p in ranges.values()):
        if limit is not None and summary.records >= limit:
            summary.stopped_by = "limit"
            return
        want = batch_size if limit is None else min(batch_size, limit - summary.records)
        messages = consumer.consume(want, timeout=max(max_wait_s, 0.1))
        if messages:
            last_activity = time.monotonic()
        elif time.monotonic() - last_activity > idle_timeout_s:
            log.warning("nothing received for %.0f s; stopping before the end of %s", idle_timeout_s, [p.partition for p in ranges.values() if not p.done])
            summary.stopped_by = "idle"
            return
        records: dict[int, list[Message]] = {}
        for msg in messages:
            err = msg.error()
            partition = msg.partition()  # None only on errors that concern no partition
            part = ranges.get(partition) if partition is not None else None
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if part is not None:
                        part.done = True
                    continue
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consume error: %s", err, extra={"topic": msg.topic(), "partition": msg.partition()})
                continue
            if part is None or part.done:
                continue
            offset = msg.offset()
            assert offset is not None  # a consumed record (not an error) always has one
            if part.end is not None and offset >= part.end:
                part.done = True
                continue
            if from_offset is not None and offset < from_offset:
                part.skipped_before_start += 1
                continue
            # reached_time is False only with a start time (ts_ms), until that time is reached.
            if ts_ms is not None and not reached_time[part.partition]:
                _kind, ts = msg.timestamp()
                if ts < ts_ms:
                    part.skipped_before_start += 1
                    continue
                reached_time[part.partition] = True
            records.setdefault(part.partition, []).append(msg)
            part.records += 1
            part.first = offset if part.first is None else part.first
            part.last = offset
            if part.end is not None and offset >= part.end - 1:
                part.done = True
        for partition, batch in records.items():
            scored = score_batch(pipelines[partition], schema, [m.value() for m in batch])
            if pool is not None:
                pool.contribute(str(partition), pipelines[partition])
                pool.take_outbox()  # nothing is published: the summaries only feed the shared fits
            decoded, result = scored.decoded, scored.result
            summary.records += len(batch)
            summary.events += decoded.features.n
            summary.invalid += len(decoded.invalid)
            reasons.update(bad.reason for bad in decoded.invalid)
            summary.invalid_by_reason = dict(reasons)
            summary.anomalies += int(result.is_anomaly.sum())
            fired = result.fired()
            for name in names:
                summary.fired[name] += int(fired[name].sum())
            if on_batch is not None:
                on_batch(batch, decoded, result)
        if records and progress is not None:
            progress(summary.records)
    if limit is not None and summary.records >= limit:
        summary.stopped_by = "limit"


def _iso_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return iso_utc(ms / 1000)
