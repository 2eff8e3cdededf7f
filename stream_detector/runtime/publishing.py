"""Publishing what a batch produced: anomaly records (reviewed by the alert policy first),
silence records of the collective timers, level shift records, and dead-letter copies of
invalid input."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Message

from stream_detector import consumed
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.config import Settings
from stream_detector.events.decode import DecodedBatch
from stream_detector.events.event_time import iso_utc
from stream_detector.metrics import Metrics
from stream_detector.records import anomaly_records, dead_letter_headers, encode_record, level_shift_record, silence_record
from stream_detector.runtime.delivery import DeliveryTracker, Producing, produce
from stream_detector.scoring.batch import ScoredBatch
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

log = logging.getLogger("stream_detector.daemon")

# A dead-letter copy larger than this is cut (the headers keep the reason and source offset),
# so one huge record cannot make the dead-letter produce fail and stall the partition.
MAX_DEAD_LETTER_BYTES = 512 * 1024


class Sources:
    """Input position of record ``j`` of a batch, built only for the records that are asked for
    (the anomalies), not for every record."""

    def __init__(self, records: list[Message]) -> None:
        self._records = records

    def __getitem__(self, j: int) -> dict[str, Any]:
        return consumed.position(self._records[j])._asdict()


class Publisher:
    """Produces a scored batch's records, each with a delivery report for ``tracker``."""

    def __init__(self, settings: Settings, metrics: Metrics, policy: AlertPolicy, tracker: DeliveryTracker) -> None:
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self.tracker = tracker

    def anomalies(self, producer: Producing, pipeline: ScoringPipeline, records: list[Message], scored: ScoredBatch, consumed_at: float) -> None:
        result = scored.result
        if not result.is_anomaly.any():
            return
        topic = self.settings.kafka.output_topic
        fired = result.fired()
        event_time = scored.decoded.features.event_time
        for i, record in anomaly_records(pipeline, scored.decoded, result, Sources(records)):
            if not self.publishable(record, float(event_time[i]), pipeline):
                continue
            key, value = encode_record(record)
            produce(producer, topic, key, value, None, self.tracker.callback(consumed_at, True))
            self.metrics.anomalies.inc()
            for name, on in fired.items():
                if on[i]:
                    self.metrics.fired.labels(name).inc()

    def silences(self, producer: Producing, pipeline: ScoringPipeline, result: BatchResult, consumed_at: float) -> None:
        for timer in pipeline.collective:
            for alert in result.collective:
                record = silence_record(alert, timer.key_set, pipeline.threshold)
                if not self.publishable(record, alert.event_time, pipeline):
                    continue
                key, value = encode_record(record)
                produce(producer, self.settings.kafka.output_topic, key, value, None, self.tracker.callback(consumed_at, True))
                self.metrics.anomalies.inc()
                self.metrics.fired.labels(timer.name).inc()
                log.info("%s", record["reasons"][0])

    def level_shifts(self, producer: Producing, pipeline: ScoringPipeline, result: BatchResult, consumed_at: float) -> None:
        for shift in result.level_shifts:
            record = level_shift_record(shift, pipeline.threshold)
            if not self.publishable(record, shift.event_time, pipeline):
                continue
            key, value = encode_record(record)
            produce(producer, self.settings.kafka.output_topic, key, value, None, self.tracker.callback(consumed_at, True))
            self.metrics.anomalies.inc()
            self.metrics.fired.labels("level_shift").inc()
            log.info("%s", record["reasons"][0])

    def publishable(self, record: dict[str, Any], event_time: float, pipeline: ScoringPipeline) -> bool:
        """Windows and feedback decide whether an anomaly is published (and annotate it)."""
        verdict = self.policy.review(record, event_time, pipeline.feedback)
        if verdict.publish:
            if verdict.annotations:
                self.metrics.annotated.inc()
            return True
        self.metrics.suppressed.labels(verdict.suppressed_by).inc()
        log.debug("suppressed anomaly %s (%s)", record.get("event_id") or record.get("key"), verdict.suppressed_by, extra={"annotations": verdict.annotations})
        return False

    def dead_letters(self, producer: Producing, records: list[Message], decoded: DecodedBatch, consumed_at: float) -> None:
        topic = self.settings.kafka.dlq_topic
        for bad in decoded.invalid:
            msg = records[bad.index]
            source = consumed.position(msg)
            headers = dead_letter_headers(bad, *source)
            value = msg.value()
            if value is not None and len(value) > MAX_DEAD_LETTER_BYTES:
                value = value[:MAX_DEAD_LETTER_BYTES]
                headers.append(("dlq.truncated", b"true"))
            produce(producer, topic, msg.key(), value, headers, self.tracker.callback(consumed_at, False))
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
