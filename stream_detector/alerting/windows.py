"""Calendar and promotion windows: spans of event time, scoped to chosen keys, in which alerts
are suppressed (counted, not published) or annotated (published with the window named).

Windows come from the configuration and, at run time, from the control topic; a window from
the control topic replaces one of the same name, and ``{"action": "cancel", "name": ...}``
removes it. Times are event times (the sale's timestamp), so a replay or backtest sees the
same windows as the live stream did.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("stream_detector.alerting")

Action = Literal["suppress", "annotate"]
CONFIG_SOURCE = "config"
# Values of one scope field shown in a log line; the rest are counted.
SHOWN_SCOPE_VALUES = 10


class AlertWindow(BaseModel):
    """One window. ``scope`` maps event fields to the values it covers ({} = every event)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    start: datetime
    end: datetime
    action: Action = "suppress"
    scope: dict[str, list[str]] = Field(default_factory=dict)
    note: str = ""

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @model_validator(mode="after")
    def _ordered(self) -> AlertWindow:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end.isoformat()}) must be after start ({self.start.isoformat()})")
        return self

    def covers(self, event_time: float, event: dict[str, Any] | None) -> bool:
        if not self.start.timestamp() <= event_time < self.end.timestamp():
            return False
        if not self.scope:
            return True
        if event is None:  # a collective alert about a key: match the key fields it names
            return False
        return all(str(event.get(field)) in values for field, values in self.scope.items())

    def annotation(self) -> dict[str, Any]:
        return {"window": self.name, "action": self.action, "note": self.note}

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def describe(self) -> str:
        """For the log: action, scope, span, e.g. "suppress alerts of store_id in [s-1] from ... to ... (1 day)"."""
        return f"{self.action} alerts of {describe_scope(self.scope)} from {self.start.isoformat()} to {self.end.isoformat()} ({human_span(self.seconds)})"


def describe_scope(scope: dict[str, list[str]]) -> str:
    if not scope:
        return "every key"
    parts = []
    for field, values in scope.items():
        shown = ", ".join(values[:SHOWN_SCOPE_VALUES])
        more = f", ... {len(values) - SHOWN_SCOPE_VALUES} more" if len(values) > SHOWN_SCOPE_VALUES else ""
        parts.append(f"{field} in [{shown}{more}]")
    return " and ".join(parts)


def human_span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:,.0f} s"


def check_length(window: AlertWindow, max_seconds: float | None) -> None:
    """ValueError if ``window`` spans more than ``max_seconds`` (``alerts.max_window_seconds``)."""
    if max_seconds is not None and window.seconds > max_seconds:
        raise ValueError(
            f"window {window.name!r} spans {human_span(window.seconds)} ({window.start.isoformat()} to {window.end.isoformat()}), "
            f"more than alerts.max_window_seconds ({max_seconds:,.0f} s = {human_span(max_seconds)})"
        )


class ControlError(ValueError):
    """A control record that cannot be applied; ``reason`` is a bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class WindowBook:
    """The windows in force, by name. Not thread-safe (the consume loop owns it).

    ``max_seconds`` (``alerts.max_window_seconds``): a control record whose window is longer is
    refused (``ControlError`` with reason ``too_long``); the configuration checks its own windows.
    Each window remembers where it came from (``config`` or the control record's topic,
    partition and offset) for the log lines that say when it starts suppressing alerts.
    """

    def __init__(self, windows: list[AlertWindow] | tuple[AlertWindow, ...] = (), max_seconds: float | None = None) -> None:
        self.max_seconds = max_seconds
        self._windows: dict[str, AlertWindow] = {w.name: w for w in windows}
        self._sources: dict[str, str] = dict.fromkeys(self._windows, CONFIG_SOURCE)
        self._suppressing: set[str] = set()  # names whose first suppressed alert has been logged

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def windows(self) -> list[AlertWindow]:
        return list(self._windows.values())

    def active(self, event_time: float) -> int:
        """Windows whose span contains ``event_time``."""
        return sum(w.start.timestamp() <= event_time < w.end.timestamp() for w in self._windows.values())

    def matching(self, event_time: float, event: dict[str, Any] | None) -> list[AlertWindow]:
        return [w for w in self._windows.values() if w.covers(event_time, event)]

    def source(self, name: str) -> str | None:
        return self._sources.get(name)

    def apply_control(self, message: dict[str, Any], source: str = "control topic") -> str:
        """Add, replace or cancel a window from a control record; returns what was done.

        ``source`` names the record in the log (topic, partition, offset). A window longer than
        ``max_seconds`` is refused and leaves a window of the same name as it was.
        """
        if not isinstance(message, dict):
            raise ControlError("not_an_object", f"expected a JSON object, got {type(message).__name__}")
        if message.get("action") == "cancel":
            name = message.get("name")
            if not isinstance(name, str) or not name:
                raise ControlError("invalid_window", "cancel needs a window name")
            if self._windows.pop(name, None) is None:
                return "unknown_window"
            self._sources.pop(name, None)
            self._suppressing.discard(name)
            log.info("alert window %r cancelled by %s", name, source, extra={"window": name, "window_source": source})
            return "cancelled"
        try:
            window = AlertWindow.model_validate(message)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            raise ControlError("invalid_window", f"{where}: {first['msg']}") from None
        try:
            check_length(window, self.max_seconds)
        except ValueError as exc:
            raise ControlError("too_long", str(exc)) from None
        outcome = "replaced" if window.name in self._windows else "added"
        self._windows[window.name] = window
        self._sources[window.name] = source
        self._suppressing.discard(window.name)
        log.info("alert window %r %s by %s: %s", window.name, outcome, source, window.describe(), extra={"window": window.name, "window_source": source})
        return outcome

    def suppressing(self, windows: list[AlertWindow], what: str) -> None:
        """Log, once per window (until it is replaced), that it has started suppressing alerts.

        ``what`` names the first alert it suppressed (an event id or a key). A window from the
        control topic logs at WARNING: whoever can write that topic can silence alerts, and
        this line is the trace of it.
        """
        for window in windows:
            if window.name in self._suppressing:
                continue
            self._suppressing.add(window.name)
            source = self._sources.get(window.name, CONFIG_SOURCE)
            log.log(
                logging.INFO if source == CONFIG_SOURCE else logging.WARNING,
                "alert window %r (from %s) started suppressing alerts, first %s: %s",
                window.name,
                source,
                what,
                window.describe(),
                extra={"window": window.name, "window_source": source},
            )
