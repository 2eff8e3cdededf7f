"""The alert policy: windows suppress or annotate, feedback rules suppress, every anomaly is
remembered for feedback, and the pipeline's decision itself never changes."""

from __future__ import annotations

from stream_detector.alerting.feedback import FeedbackMemory
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import AlertWindow, WindowBook
from tests.unit.alerting.helpers import T0, record


def test_windows_suppress_or_annotate_and_scope_collective_alerts():
    book = WindowBook(
        [
            AlertWindow(name="closed", start="2026-11-27", end="2026-11-28", scope={"store_id": ["s-001"]}),
            AlertWindow(name="promo", start="2026-11-27", end="2026-11-28", action="annotate", scope={"store_id": ["s-002"]}),
        ]
    )
    policy = AlertPolicy(book)
    assert policy.review(record("e-1", "s-001"), T0 + 60, None).suppressed_by == "window"
    kept = record("e-2", "s-002")
    verdict = policy.review(kept, T0 + 60, None)
    assert verdict.publish and kept["annotations"] == [{"window": "promo", "action": "annotate", "note": ""}]
    assert "annotations" not in (plain := record("e-3", "s-003")) and policy.review(plain, T0 + 60, None).publish
    # A store that went silent while closed for the day: the key fields stand in for the event.
    silence = {"event_id": None, "key": "s-001", "key_set": "store_id", "detectors": {"silence": {"fired": True, "tail_probability": 1e-6}}, "event": None}
    assert policy.review(silence, T0 + 60, None).suppressed_by == "window"


def test_an_anomaly_suppressed_by_a_window_is_still_remembered_for_feedback():
    """An analyst may have seen it elsewhere: feedback on it must find it."""
    policy = AlertPolicy(WindowBook([AlertWindow(name="closed", start="2026-11-27", end="2026-11-28")]))
    memory = FeedbackMemory()
    verdict = policy.review(record("e-1", "s-001"), T0 + 60, memory)
    assert not verdict.publish and verdict.suppressed_by == "window"
    assert verdict.annotations == [{"window": "closed", "action": "suppress", "note": ""}]
    assert memory.knows("e-1") and memory.apply("e-1", "false_positive") == "applied"


def test_windows_are_checked_before_feedback_and_feedback_before_annotations():
    memory = FeedbackMemory()
    policy = AlertPolicy(WindowBook())
    assert policy.review(record("e-1", "s-001"), T0, memory).publish
    assert memory.apply("e-1", "false_positive", "known") == "applied"

    suppress = AlertPolicy(WindowBook([AlertWindow(name="closed", start="2026-11-27", end="2026-11-28")]))
    assert suppress.review(record("e-2", "s-001"), T0 + 60, memory).suppressed_by == "window"

    annotate = AlertPolicy(WindowBook([AlertWindow(name="promo", start="2026-11-27", end="2026-11-28", action="annotate")]))
    again = record("e-3", "s-001")
    verdict = annotate.review(again, T0 + 60, memory)
    assert not verdict.publish and verdict.suppressed_by == "feedback"
    assert verdict.annotations == [{"feedback": "e-1", "note": "known"}]
    assert "annotations" not in again  # only a published record is annotated
    other_store = record("e-4", "s-002")
    assert annotate.review(other_store, T0 + 60, memory).publish
    assert other_store["annotations"] == [{"window": "promo", "action": "annotate", "note": ""}]


def test_without_a_feedback_memory_nothing_is_remembered_or_suppressed_by_feedback():
    policy = AlertPolicy(WindowBook())
    verdict = policy.review(record("e-1", "s-001"), T0, None)
    assert verdict.publish and verdict.suppressed_by is None and verdict.annotations == []


def test_a_collective_alert_of_a_multi_field_key_set_matches_each_field():
    """The key ``s-001|online`` of key set ``store_id+channel`` stands for both fields."""
    scope = {"store_id": ["s-001"], "channel": ["online"]}
    policy = AlertPolicy(WindowBook([AlertWindow(name="site-down", start="2026-11-27", end="2026-11-28", scope=scope)]))

    def silence(key: str) -> dict:
        detectors = {"silence": {"fired": True, "tail_probability": 1e-6}}
        return {"event_id": None, "key": key, "key_set": "store_id+channel", "detectors": detectors, "event": None}

    assert policy.review(silence("s-001|online"), T0 + 60, None).suppressed_by == "window"
    assert policy.review(silence("s-001|store"), T0 + 60, None).publish
    assert policy.review(silence("s-002|online"), T0 + 60, None).publish
