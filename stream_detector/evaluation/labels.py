"""What the evaluation compares against: point labels by event id, window labels by key and
time span, change labels (lasting changes of a key from a point in time on), the collective
alerts that detect windows, and the rule that matches the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from stream_detector.errors import ConfigError
from stream_detector.events.decode import DecodedBatch
from stream_detector.scoring.pipeline import BatchResult

POINT_KINDS: tuple[str, ...] = ("price_spike", "quantity_burst", "decimal_error", "refund_burst", "duplicate")
WINDOW_KINDS: tuple[str, ...] = ("store_stopped",)
CHANGE_KINDS: tuple[str, ...] = ("level_shift",)
DEFAULT_WINDOW_GRACE_S = 15 * 60.0


@dataclass(frozen=True)
class WindowLabel:
    """A collective anomaly: nothing (or something) happened for ``key`` in [start, end]."""

    kind: str
    key: str
    start: float  # epoch seconds
    end: float


@dataclass(frozen=True)
class ChangeLabel:
    """A lasting change, not an anomaly: the events whose field ``key_set`` equals ``key`` with
    an event time at or after ``start`` are changed for good (a new key starts there)."""

    kind: str
    key_set: str  # the event field that holds the key, e.g. store_id
    key: str
    start: float  # epoch seconds
    scenario: str = ""
    feature: str = ""
    factor: float | None = None

    @property
    def name(self) -> str:
        return self.scenario or self.kind


@dataclass
class Labels:
    """Point labels by event id and window labels. Read lazily by ``evaluate``: a point label
    is looked up when its event's batch is scored, windows once the last event is scored, so
    a generator may add labels while it yields the events."""

    points: dict[str, str] = field(default_factory=dict)
    windows: list[WindowLabel] = field(default_factory=list)
    changes: list[ChangeLabel] = field(default_factory=list)

    def add(self, label: Any) -> None:
        """Add a ``generator.Label`` or a label dict (the JSON-lines format of --labels)."""
        record = label.to_dict() if hasattr(label, "to_dict") else dict(label)
        kind = record.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ValueError("a label needs a 'kind'")
        if record.get("event_id") is not None:
            self.points[str(record["event_id"])] = kind
            return
        if kind in CHANGE_KINDS:
            self.changes.append(_change(kind, record))
            return
        key = record.get("store_id", record.get("key"))
        if key is None or record.get("start") is None or record.get("end") is None:
            raise ValueError("a label needs an 'event_id', or a 'store_id' (or 'key') with 'start' and 'end'")
        start, end = _epoch_seconds(record["start"]), _epoch_seconds(record["end"])
        if end < start:
            raise ValueError(f"window ends before it starts: {record}")
        self.windows.append(WindowLabel(kind, str(key), start, end))

    @classmethod
    def from_records(cls, records: Iterable[Any]) -> Labels:
        labels = cls()
        for record in records:
            labels.add(record)
        return labels

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        """Labels from a JSON-lines file as written by ``stream-detector generate --labels``."""
        labels = cls()
        try:
            with open(path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        labels.add(orjson.loads(line))
                    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                        raise ConfigError(f"--labels {path}, line {number}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"--labels {path}: {exc.strerror}") from None
        return labels


def _change(kind: str, record: dict[str, Any]) -> ChangeLabel:
    key_set, key, start = record.get("key_set"), record.get("key"), record.get("start")
    if not isinstance(key_set, str) or not key_set or key is None or start is None:
        raise ValueError(f"a {kind} label needs a 'key_set' (an event field), a 'key' and a 'start'")
    factor = record.get("factor")
    return ChangeLabel(
        kind,
        key_set,
        str(key),
        _epoch_seconds(start),
        str(record.get("scenario") or ""),
        str(record.get("feature") or ""),
        None if factor is None else float(factor),
    )


def _epoch_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value) / 1000.0  # epoch milliseconds, as in events
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True)
class CollectiveAlert:
    """An alert about a key rather than an event (e.g. "store s-004 went silent")."""

    key: str
    event_time: float  # epoch seconds, in event time
    kind: str | None = None  # the window kind it is about; None matches any window kind
    detector: str = ""


#: Called after each micro-batch with what the pipeline saw and decided; returns the collective
#: alerts raised while processing it (a CollectiveAlert or a (key, event_time) pair each).
CollectiveAlertsFn = Callable[[DecodedBatch, BatchResult], Iterable["CollectiveAlert | tuple[str, float]"]]


def as_alert(item: CollectiveAlert | tuple[str, float]) -> CollectiveAlert:
    """A ``CollectiveAlertsFn`` item as a CollectiveAlert."""
    if isinstance(item, CollectiveAlert):
        return item
    key, event_time = item
    return CollectiveAlert(str(key), float(event_time))


@dataclass(frozen=True)
class WindowMatch:
    window: WindowLabel
    detected: bool
    first_alert: float | None  # epoch seconds of the first matching alert
    delay_s: float | None  # first_alert - window.start


def match_windows(
    windows: Sequence[WindowLabel], alerts: Sequence[CollectiveAlert], grace_s: float = DEFAULT_WINDOW_GRACE_S
) -> tuple[list[WindowMatch], list[CollectiveAlert]]:
    """Match collective alerts to windows: same key (and kind, unless the alert has none), event
    time in [start, end + grace_s]. Returns one match per window, in order, and the alerts that
    matched no window."""
    by_key: dict[str, list[CollectiveAlert]] = {}
    for alert in sorted(alerts, key=lambda a: a.event_time):
        by_key.setdefault(alert.key, []).append(alert)
    used: set[int] = set()
    matches = []
    for window in windows:
        first = None
        for alert in by_key.get(window.key, ()):
            if alert.kind is not None and alert.kind != window.kind:
                continue
            if window.start <= alert.event_time <= window.end + grace_s:
                used.add(id(alert))
                if first is None:
                    first = alert.event_time
        matches.append(WindowMatch(window, first is not None, first, None if first is None else first - window.start))
    unmatched = [a for a in alerts if id(a) not in used]
    return matches, unmatched
