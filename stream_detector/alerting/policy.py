"""Decide what becomes of an anomaly record: published, published with annotations, or
suppressed (by a window or by feedback). The pipeline's decision itself never changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stream_detector.alerting.feedback import FeedbackMemory, Pattern
from stream_detector.alerting.windows import WindowBook


@dataclass(frozen=True)
class Verdict:
    publish: bool
    suppressed_by: str | None = None  # "window" | "feedback"
    annotations: list[dict[str, Any]] = field(default_factory=list)


PUBLISH = Verdict(True)


class AlertPolicy:
    def __init__(self, windows: WindowBook) -> None:
        self.windows = windows

    def review(self, record: dict[str, Any], event_time: float, memory: FeedbackMemory | None) -> Verdict:
        """The verdict for one anomaly record; annotates ``record`` in place when it is kept.

        Every anomaly is remembered for feedback (a suppressed one too: an analyst may have
        seen it elsewhere), then windows are checked, then the feedback rules.
        """
        pattern: Pattern | None = None
        if memory is not None:
            pattern = Pattern.of(record, event_time)
            memory.remember(record.get("event_id"), pattern)
        windows = self.windows.matching(event_time, record.get("event") or _key_fields(record))
        suppressing = [w for w in windows if w.action == "suppress"]
        if suppressing:
            # Input data, cut short: this goes into a log line.
            what = f"event {record['event_id']}" if record.get("event_id") else f"key {record.get('key_set')}={record.get('key')}"
            what = what[:120]
            self.windows.suppressing(suppressing, what)
            return Verdict(False, "window", [w.annotation() for w in windows])
        if memory is not None and pattern is not None:
            rule = memory.matching_rule(pattern)
            if rule is not None:
                return Verdict(False, "feedback", [{"feedback": rule.event_id, "note": rule.note}])
        if windows:
            annotations = [w.annotation() for w in windows]
            record["annotations"] = annotations
            return Verdict(True, None, annotations)
        return PUBLISH


def _key_fields(record: dict[str, Any]) -> dict[str, Any] | None:
    """For an alert about a key (no event): its key fields, so scoped windows can match it."""
    key_set, key = record.get("key_set"), record.get("key")
    if not key_set or key is None:
        return None
    # Not strict: a key field's value may itself contain "|"; its extra parts are left out.
    return dict(zip(key_set.split("+"), str(key).split("|"), strict=False))
