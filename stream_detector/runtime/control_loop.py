"""Applying what the control topic (alert windows) and the feedback topic (analysts' verdicts)
say, between batches: ``ControlReader`` reads them, this applies them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from stream_detector.alerting.feedback import parse_feedback
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import ControlError
from stream_detector.config import Settings
from stream_detector.metrics import Metrics
from stream_detector.runtime.control import ControlReader
from stream_detector.runtime.partitions import PartitionWork
from stream_detector.scoring.pipeline import ScoringPipeline

log = logging.getLogger("stream_detector.daemon")

# Feedback naming an event no owned partition remembers waits here (another instance may own
# it, or its partition is being restored); oldest dropped first.
MAX_PENDING_FEEDBACK = 10_000

Partitions = Mapping[tuple[str, int], PartitionWork]


class ControlTopics:
    """Alert windows into the policy; feedback into the partition that remembers the event."""

    def __init__(self, settings: Settings, metrics: Metrics, policy: AlertPolicy) -> None:
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self.pending_feedback: dict[str, tuple[str, str]] = {}  # event_id -> (label, note)

    @property
    def topics(self) -> list[str]:
        a = self.settings.alerts
        return [t for t in (a.control_topic, a.feedback_topic) if t]

    def read(self, reader: ControlReader, partitions: Partitions) -> None:
        feedback_topic = self.settings.alerts.feedback_topic
        for rec in reader.poll():
            try:
                if rec.error is not None:
                    raise ControlError("not_json", rec.error)
                if rec.topic == feedback_topic:
                    self.take_feedback(partitions, *parse_feedback(rec.value))
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

    def take_feedback(self, partitions: Partitions, event_id: str, label: str, note: str) -> None:
        """Apply feedback in the partition that remembers the event, or keep it pending."""
        for work in partitions.values():
            shifts = work.pipeline.level_shifts
            if shifts is not None and shifts.knows(event_id):  # a level_shift record's id
                outcome = work.pipeline.level_shift_feedback(event_id, label)
                self.metrics.feedback.labels(label, outcome).inc()
                work.dirty = True  # the restored baseline goes into the next snapshot
                self.pending_feedback.pop(event_id, None)
                log.info("feedback %s on %s: %s", label, event_id, outcome)
                return
            memory = work.pipeline.feedback
            if memory is not None and memory.knows(event_id):
                outcome = memory.apply(event_id, label, note)
                self.metrics.feedback.labels(label, outcome).inc()
                work.dirty = True  # the new rule goes into the next snapshot
                self.pending_feedback.pop(event_id, None)
                log.info("feedback %s on %s: %s", label, event_id, outcome)
                return
        if event_id not in self.pending_feedback:
            self.metrics.feedback.labels(label, "pending").inc()
        self.pending_feedback[event_id] = (label, note)
        while len(self.pending_feedback) > MAX_PENDING_FEEDBACK:
            old_id, (old_label, _) = next(iter(self.pending_feedback.items()))
            del self.pending_feedback[old_id]
            self.metrics.feedback.labels(old_label, "expired").inc()

    def retry_pending_feedback(self, partitions: Partitions) -> None:
        for event_id, (label, note) in list(self.pending_feedback.items()):
            if any(_knows(w.pipeline, event_id) for w in partitions.values()):
                self.take_feedback(partitions, event_id, label, note)


def _knows(pipeline: ScoringPipeline, event_id: str) -> bool:
    """Whether the pipeline remembers the anomaly or the level shift that ``event_id`` names."""
    shifts, memory = pipeline.level_shifts, pipeline.feedback
    return (shifts is not None and shifts.knows(event_id)) or (memory is not None and memory.knows(event_id))
