"""Calendar and promotion windows: spans of event time, scoped to chosen keys, in which alerts
are suppressed (counted, not published) or annotated (published with the window named).

Windows come from the configuration and, at run time, from the control topic; a window from
the control topic replaces one of the same name, and ``{"action": "cancel", "name": ...}``
removes it. Times are event times (the sale's timestamp), so a replay or backtest sees the
same windows as the live stream did.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Action = Literal["suppress", "annotate"]


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


class ControlError(ValueError):
    """A control record that cannot be applied; ``reason`` is a bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class WindowBook:
    """The windows in force, by name. Not thread-safe (the consume loop owns it)."""

    def __init__(self, windows: list[AlertWindow] | tuple[AlertWindow, ...] = ()) -> None:
        self._windows: dict[str, AlertWindow] = {w.name: w for w in windows}

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

    def apply_control(self, message: dict[str, Any]) -> str:
        """Add, replace or cancel a window from a control record; returns what was done."""
        if not isinstance(message, dict):
            raise ControlError("not_an_object", f"expected a JSON object, got {type(message).__name__}")
        if message.get("action") == "cancel":
            name = message.get("name")
            if not isinstance(name, str) or not name:
                raise ControlError("invalid_window", "cancel needs a window name")
            return "cancelled" if self._windows.pop(name, None) is not None else "unknown_window"
        try:
            window = AlertWindow.model_validate(message)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            raise ControlError("invalid_window", f"{where}: {first['msg']}") from None
        replaced = window.name in self._windows
        self._windows[window.name] = window
        return "replaced" if replaced else "added"
