"""Analysts' feedback: a false positive becomes a rule that silences the same pattern of the
same key for a while; the memory of recent anomalies and rules is bounded and restorable."""

from __future__ import annotations

import pickle

import pytest

from stream_detector.alerting.feedback import FeedbackMemory, Pattern, parse_feedback
from stream_detector.alerting.policy import AlertPolicy
from stream_detector.alerting.windows import ControlError, WindowBook
from tests.unit.alerting.helpers import DAY, T0, record


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


def test_expired_rules_are_dropped():
    memory = FeedbackMemory(ttl_seconds=DAY)
    memory.remember("e-1", Pattern.of(record("e-1", "s-001"), T0))
    assert memory.apply("e-1", "false_positive") == "applied"
    memory.expire(T0 + DAY / 2)
    assert len(memory) == 1
    memory.expire(T0 + DAY)
    assert len(memory) == 0 and memory.matching_rule(Pattern.of(record("e-2", "s-001"), T0 + 1)) is None


def test_a_pattern_is_what_fired_with_its_feature_and_direction():
    pattern = Pattern.of(record("e-1", "s-001", z=-4.0, feature="log_quantity", p_z=1e-7, hst=1e-5), T0)
    assert pattern.key == "s-001" and pattern.event_time == T0
    # The duplicates detector did not fire: not part of the pattern. HST has no z: direction 0.
    assert pattern.fired == {("zscore", "log_quantity", -1), ("hst", "", 0)}
    assert pattern.tail == (("hst", 1e-5), ("zscore", 1e-7))


def test_a_rule_covers_no_other_detector_and_nothing_much_more_extreme():
    """The documented match: the same key, only detectors (features, directions) that fired in
    the marked anomaly, none with a tail probability more than ``margin`` times smaller."""
    marked_p = 2.0**-20
    memory = FeedbackMemory(margin=4.0, ttl_seconds=100.0)
    memory.remember("e-1", Pattern.of(record("e-1", "s-001", p_z=marked_p, hst=2.0**-10), T0))
    assert memory.apply("e-1", "false_positive") == "applied"

    def covered(key: str = "s-001", **kw: float) -> bool:
        return memory.matching_rule(Pattern.of(record("e-2", key, **kw), T0 + 1)) is not None

    assert covered(p_z=marked_p, hst=2.0**-10)
    assert covered(p_z=marked_p)  # fewer detectors than the marked anomaly: still the same thing
    assert covered(p_z=marked_p / 4)  # exactly ``margin`` times smaller: still covered
    assert not covered(p_z=marked_p / 8)
    assert covered(p_z=marked_p, hst=2.0**-12) and not covered(p_z=marked_p, hst=2.0**-13)
    assert not covered(p_z=marked_p, key="s-002")
    assert memory.matching_rule(Pattern.of(record("e-3", "s-001", p_z=marked_p), T0 + 100.0)) is None  # expired at T0 + TTL
    nothing_fired = record("e-4", "s-001")
    nothing_fired["detectors"]["zscore"]["fired"] = False
    assert memory.matching_rule(Pattern.of(nothing_fired, T0 + 1)) is None


def test_remember_ignores_records_without_an_event_id_and_parse_feedback_refuses_non_objects():
    memory = FeedbackMemory()
    memory.remember(None, Pattern.of(record("x", "s-001"), T0))
    memory.remember("", Pattern.of(record("x", "s-001"), T0))
    assert not memory.knows("") and memory.state_dict()["recent"] == []
    for message in (["e-1"], "e-1", None):
        with pytest.raises(ControlError) as caught:
            parse_feedback(message)
        assert caught.value.reason == "not_an_object"
    with pytest.raises(ControlError) as caught:
        parse_feedback({"event_id": ""})
    assert caught.value.reason == "invalid_feedback"
    assert parse_feedback({"event_id": "e-1", "note": 42}) == ("e-1", "false_positive", "42")
