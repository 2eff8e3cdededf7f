"""Analysts' feedback: an anomaly marked as a false positive (by ``event_id``) becomes a rule
that keeps the same pattern for the same key from alerting again.

A *pattern* is what fired: each detector that fired, and for the z-score the feature and the
direction (above or below the baseline). A later anomaly of the same key matches a rule when
no other detector fired, the z-score (if it fired) is on the same feature in the same
direction, and no detector's tail probability is more than ``margin`` times smaller than in
the marked anomaly: "the same thing again, not something much more extreme". Rules expire
after ``ttl_seconds`` of event time.

One ``FeedbackMemory`` belongs to each input partition's pipeline (its keys live there), so
its rules travel with the partition's state snapshot. The recent anomalies it remembers are
what lets feedback, which names only an ``event_id``, find its key and pattern.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from stream_detector.alerting.windows import ControlError
from stream_detector.errors import StateError

# accept and reject answer a level_shift record (scoring/level_shift.py): keep the new level, or
# put the old baseline back. On an anomaly they are recorded like a true positive.
LABELS = ("false_positive", "true_positive", "accept", "reject")


@dataclass(frozen=True)
class Pattern:
    key: str | None
    event_time: float
    # (detector, feature or "", direction -1/0/+1) for every detector that fired
    fired: frozenset[tuple[str, str, int]]
    tail: tuple[tuple[str, float], ...]  # (detector, tail probability) for those detectors

    @classmethod
    def of(cls, record: dict[str, Any], event_time: float) -> Pattern:
        fired, tail = set(), []
        for name, d in record.get("detectors", {}).items():
            if not d.get("fired"):
                continue
            z = d.get("z")
            direction = 0 if z is None else (1 if z > 0 else -1)
            fired.add((name, str(d.get("feature") or ""), direction))
            tail.append((name, float(d.get("tail_probability", 0.0))))
        return cls(record.get("key"), event_time, frozenset(fired), tuple(sorted(tail)))


@dataclass(frozen=True)
class Rule:
    event_id: str
    pattern: Pattern
    expires_at: float  # event time
    note: str = ""

    def covers(self, pattern: Pattern, margin: float) -> bool:
        if pattern.key != self.pattern.key or not pattern.fired or pattern.event_time >= self.expires_at:
            return False
        if not pattern.fired <= self.pattern.fired:
            return False  # another detector (or feature, or direction) fired this time
        marked = dict(self.pattern.tail)
        return all(p * margin >= marked.get(name, 0.0) for name, p in pattern.tail)


def parse_feedback(message: Any) -> tuple[str, str, str]:
    """(event_id, label, note) of a feedback record, or ControlError."""
    if not isinstance(message, dict):
        raise ControlError("not_an_object", f"expected a JSON object, got {type(message).__name__}")
    event_id, label = message.get("event_id"), message.get("label", "false_positive")
    if not isinstance(event_id, str) or not event_id:
        raise ControlError("invalid_feedback", "event_id: a non-empty string is required")
    if label not in LABELS:
        raise ControlError("invalid_feedback", f"label: {label!r} is not one of {list(LABELS)}")
    note = message.get("note", "")
    return event_id, label, note if isinstance(note, str) else str(note)


class FeedbackMemory:
    """Recent anomalies of one partition and the rules its feedback made. Bounded."""

    state_version = 2  # 1 held the Pattern and Rule objects themselves (pickled)

    def __init__(self, ttl_seconds: float = 30 * 86400.0, margin: float = 10.0, max_recent: int = 50_000, max_rules: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.margin = margin
        self.max_recent = max_recent
        self.max_rules = max_rules
        self._recent: OrderedDict[str, Pattern] = OrderedDict()
        self._rules: OrderedDict[str, Rule] = OrderedDict()  # by the marked event_id
        self._by_key: dict[str | None, list[str]] = {}

    def __len__(self) -> int:
        return len(self._rules)

    def knows(self, event_id: str) -> bool:
        return event_id in self._recent or event_id in self._rules

    def remember(self, event_id: str | None, pattern: Pattern) -> None:
        if not event_id:
            return
        self._recent[event_id] = pattern
        self._recent.move_to_end(event_id)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    def matching_rule(self, pattern: Pattern) -> Rule | None:
        for event_id in self._by_key.get(pattern.key, ()):
            rule = self._rules[event_id]
            if rule.covers(pattern, self.margin):
                return rule
        return None

    def apply(self, event_id: str, label: str, note: str = "") -> str:
        """Outcome: applied, duplicate, recorded (a true positive) or unknown_event."""
        if event_id in self._rules:
            return "duplicate"
        pattern = self._recent.get(event_id)
        if pattern is None:
            return "unknown_event"
        if label != "false_positive":
            return "recorded"
        self._add(Rule(event_id, pattern, pattern.event_time + self.ttl_seconds, note))
        return "applied"

    def _add(self, rule: Rule) -> None:
        self._rules[rule.event_id] = rule
        self._by_key.setdefault(rule.pattern.key, []).append(rule.event_id)
        while len(self._rules) > self.max_rules:  # oldest rule first
            old_id, old = self._rules.popitem(last=False)
            self._by_key[old.pattern.key].remove(old_id)

    def expire(self, now_event_time: float) -> None:
        for event_id in [e for e, r in self._rules.items() if r.expires_at <= now_event_time]:
            rule = self._rules.pop(event_id)
            self._by_key[rule.pattern.key].remove(event_id)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers): patterns as ``_pattern_data``."""
        return {
            "version": self.state_version,
            "recent": [[event_id, _pattern_data(p)] for event_id, p in self._recent.items()],
            "rules": [[r.event_id, _pattern_data(r.pattern), r.expires_at, r.note] for r in self._rules.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; ``StateError`` if it is not one of this version."""
        if state.get("version") != self.state_version:
            raise StateError(f"feedback state version {state.get('version')!r}, expected {self.state_version}")
        try:
            recent = OrderedDict((_text(event_id), _pattern(p)) for event_id, p in state["recent"])
            rules = [Rule(_text(event_id), _pattern(p), float(expires_at), _text(note)) for event_id, p, expires_at, note in state["rules"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"feedback state is malformed: {exc!r}") from None
        self._recent = recent
        self._rules, self._by_key = OrderedDict(), {}
        for rule in rules:
            self._add(rule)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)


def _pattern_data(p: Pattern) -> list[Any]:
    return [p.key, p.event_time, sorted([list(f) for f in p.fired]), [list(t) for t in p.tail]]


def _pattern(data: Any) -> Pattern:
    key, event_time, fired, tail = data
    if key is not None:
        key = _text(key)
    return Pattern(
        key,
        float(event_time),
        frozenset((_text(d), _text(f), int(direction)) for d, f, direction in fired),
        tuple((_text(d), float(p)) for d, p in tail),
    )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value
