"""Alert windows, feedback rules and the policy that applies them (no broker)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest

from stream_detector.alerting.feedback import FeedbackMemory, Pattern, parse_feedback
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import AlertWindow, ControlError, WindowBook
from stream_detector.config import load_settings
from stream_detector.errors import ConfigError

T0 = datetime(2026, 11, 27, tzinfo=UTC).timestamp()  # Black Friday, 00:00 UTC
DAY = 86400.0


def record(event_id: str, key: str, *, z: float = 9.0, feature: str = "log_amount", p_z: float = 1e-8, hst: float | None = None) -> dict:
    detectors = {
        "zscore": {"fired": True, "tail_probability": p_z, "feature": feature, "z": z, "warm": True},
        "duplicates": {"fired": False, "tail_probability": 1.0},
        "hst": {"fired": hst is not None, "tail_probability": hst if hst is not None else 0.5},
    }
    return {"event_id": event_id, "key": key, "detectors": detectors, "event": {"event_id": event_id, "store_id": key}}


def test_window_covers_its_span_and_scope():
    w = AlertWindow(name="black-friday", start="2026-11-27T00:00:00Z", end="2026-11-28T00:00:00", scope={"store_id": ["s-001"]})
    assert w.end.tzinfo is not None  # naive means UTC
    assert w.covers(T0, {"store_id": "s-001"})
    assert not w.covers(T0, {"store_id": "s-002"})
    assert not w.covers(T0 - 1, {"store_id": "s-001"})
    assert not w.covers(T0 + DAY, {"store_id": "s-001"})  # end is exclusive
    everywhere = AlertWindow(name="xmas", start="2026-12-25", end="2026-12-26")
    assert everywhere.covers(T0 + 28 * DAY + 5, None)


def test_control_records_add_replace_cancel_and_reject_bad_ones():
    book = WindowBook()
    promo = {"name": "promo-42", "start": "2026-11-27T00:00:00Z", "end": "2026-11-29T00:00:00Z", "action": "annotate", "scope": {"product_id": ["p-0042"]}}
    assert book.apply_control(promo) == "added"
    assert book.apply_control({**promo, "action": "suppress"}) == "replaced"
    assert book.windows[0].action == "suppress"
    assert book.active(T0 + 3600) == 1
    assert book.apply_control({"action": "cancel", "name": "promo-42"}) == "cancelled"
    assert book.apply_control({"action": "cancel", "name": "promo-42"}) == "unknown_window"
    with pytest.raises(ControlError, match="end.*must be after start"):
        book.apply_control({**promo, "end": "2026-11-26T00:00:00Z"})
    with pytest.raises(ControlError, match="action"):
        book.apply_control({**promo, "action": "mute"})
    with pytest.raises(ControlError, match="not_an_object"):
        book.apply_control(["promo"])
    assert len(book) == 0


def test_config_windows_are_validated_with_the_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("alerts:\n  windows:\n    - name: sale\n      start: 2026-11-27\n      end: 2026-11-20\n")
    with pytest.raises(ConfigError, match=r"alerts\.windows\.0.*must be after start"):
        load_settings(path, environ={})
    path.write_text("alerts:\n  windows:\n    - {name: a, start: 2026-11-27, end: 2026-11-28}\n    - {name: a, start: 2026-11-27, end: 2026-11-28}\n")
    with pytest.raises(ConfigError, match="repeated"):
        load_settings(path, environ={})


def test_feedback_silences_the_same_pattern_for_the_same_key_only():
    memory = FeedbackMemory(ttl_seconds=7 * DAY, margin=10.0)
    policy = AlertPolicy(WindowBook())
    marked = record("e-1", "s-001", p_z=1e-8)
    assert policy.review(marked, T0, memory).publish
    assert memory.apply("e-1", "false_positive", "a wholesale customer") == "applied"
    assert memory.apply("e-1", "false_positive") == "duplicate"

    again = policy.review(record("e-2", "s-001", p_z=5e-9), T0 + 3600, memory)
    assert not again.publish and again.suppressed_by == "feedback"
    assert again.annotations == [{"feedback": "e-1", "note": "a wholesale customer"}]
    # Another key, the other direction, another feature, another detector joining in, or far
    # more extreme than what the analyst saw: still alerts.
    assert policy.review(record("e-3", "s-002"), T0 + 3600, memory).publish
    assert policy.review(record("e-4", "s-001", z=-9.0), T0 + 3600, memory).publish
    assert policy.review(record("e-5", "s-001", feature="log_quantity"), T0 + 3600, memory).publish
    assert policy.review(record("e-6", "s-001", hst=1e-6), T0 + 3600, memory).publish
    assert policy.review(record("e-7", "s-001", p_z=1e-10), T0 + 3600, memory).publish
    # The rule expires after its TTL of event time.
    assert policy.review(record("e-8", "s-001"), T0 + 8 * DAY, memory).publish


def test_feedback_outcomes_and_state_round_trip():
    memory = FeedbackMemory()
    assert memory.apply("nope", "false_positive") == "unknown_event"
    memory.remember("e-1", Pattern.of(record("e-1", "s-001"), T0))
    memory.remember("e-2", Pattern.of(record("e-2", "s-009"), T0))
    assert memory.apply("e-2", "true_positive") == "recorded"
    assert memory.apply("e-1", "false_positive") == "applied"
    clone = FeedbackMemory()
    clone.load_state_dict(pickle.loads(pickle.dumps(memory.state_dict())))
    assert len(clone) == 1 and clone.knows("e-1") and clone.knows("e-2")
    assert clone.matching_rule(Pattern.of(record("e-3", "s-001"), T0 + 1)) is not None


def test_memory_is_bounded():
    memory = FeedbackMemory(max_recent=3, max_rules=2)
    for i in range(5):
        memory.remember(f"e-{i}", Pattern.of(record(f"e-{i}", f"s-{i}"), T0))
    assert not memory.knows("e-0") and not memory.knows("e-1") and memory.knows("e-4")
    for i in (2, 3, 4):
        assert memory.apply(f"e-{i}", "false_positive") == "applied"
    assert len(memory) == 2
    assert memory.matching_rule(Pattern.of(record("x", "s-2"), T0)) is None  # oldest rule dropped
    assert memory.matching_rule(Pattern.of(record("x", "s-4"), T0)) is not None


def test_parse_feedback():
    assert parse_feedback({"event_id": "e-1"}) == ("e-1", "false_positive", "")
    assert parse_feedback({"event_id": "e-1", "label": "true_positive", "note": "fraud"}) == ("e-1", "true_positive", "fraud")
    with pytest.raises(ControlError, match="event_id"):
        parse_feedback({"label": "false_positive"})
    with pytest.raises(ControlError, match="label"):
        parse_feedback({"event_id": "e-1", "label": "maybe"})


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


def test_expired_rules_are_dropped():
    memory = FeedbackMemory(ttl_seconds=DAY)
    memory.remember("e-1", Pattern.of(record("e-1", "s-001"), T0))
    assert memory.apply("e-1", "false_positive") == "applied"
    memory.expire(T0 + DAY / 2)
    assert len(memory) == 1
    memory.expire(T0 + DAY)
    assert len(memory) == 0 and memory.matching_rule(Pattern.of(record("e-2", "s-001"), T0 + 1)) is None
