"""Event time guard: one event cannot move a partition's clock by years.

The detectors' clocks run in event time: the z-score TTL forgets keys not seen for a week of
event time, the silence timer calls a store stopped when its events stop while the clock moves
on, the duplicates window expires by event time. Left alone, one valid event dated 2100 moves
all of them to 2100: every key is forgotten and every store "stops".

So each event is checked against a limit before anything learns it::

    limit = max(watermark, clock) + max_future_skew

where the watermark is the highest event time accepted so far on the partition (it never moves
backwards and travels in the pipeline's state snapshot, so it survives a restart) and the
clock is the wall clock. With no watermark yet the clock alone decides. Taking the larger of
the two keeps both live traffic (near the clock) and a replay of old data (the watermark far
behind the clock) within reach, while one accepted event raises the limit by at most the skew.
The check is sequential in meaning: event ``i`` is judged against the watermark of the events
accepted before it, also inside a batch.

An event past the limit is either dead-lettered (reason ``future_timestamp``) or, in ``clamp``
mode, kept and scored at the partition's watermark (the clock on a partition with none), so
that it moves no clock; the output notes the original time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from stream_detector.errors import StateError

FUTURE_TIMESTAMP = "future_timestamp"  # the dead-letter reason (events/decode.py REASONS)
FutureTimestamps = Literal["dead_letter", "clamp"]
# processing.max_future_skew's default. An event accepted ahead of the others still moves the
# silence timers by its lead (measured: one event 23 hours ahead of a 20,000-event stream raised
# 23 false store_stopped alerts and hid the real stop), so the bound is as tight as real clocks
# allow: an hour is far beyond the error of any synchronised producer clock.
DEFAULT_MAX_FUTURE_SKEW_S = 3_600.0


@dataclass(frozen=True)
class FutureEvents:
    """What the guard found in one batch of event times (positions into the checked times)."""

    index: np.ndarray  # int64: the events past their limit, in order
    limit: np.ndarray  # float64: each one's limit (watermark or clock + skew)
    basis: list[str]  # each limit's base: "watermark" or "clock"
    clamped_to: np.ndarray  # float64: the time each is scored at in clamp mode

    @property
    def n(self) -> int:
        return len(self.index)

    def detail(self, k: int, original: float, max_future_skew: float) -> str:
        """The dead-letter detail of the ``k``-th event found: its time and the limit it passed."""
        base = "the partition's watermark" if self.basis[k] == "watermark" else "the clock"
        return (
            f"timestamp {iso_utc(original)} is past the limit {iso_utc(float(self.limit[k]))}: {base} "
            f"{iso_utc(float(self.limit[k]) - max_future_skew)} + processing.max_future_skew {max_future_skew:g} s"
        )


@dataclass(frozen=True)
class TimeLimit:
    """The guard's settings and the partition's watermark, frozen for one batch at clock ``now``."""

    watermark: float | None
    now: float
    max_future_skew: float
    mode: FutureTimestamps

    def check(self, times: np.ndarray) -> FutureEvents:
        """The events of ``times`` (finite epoch seconds, in order) past their limit."""
        times = np.asarray(times, dtype=np.float64)
        skew, now, watermark = self.max_future_skew, self.now, self.watermark
        if not len(times) or float(times.max()) <= (now if watermark is None else max(now, watermark)) + skew:
            return FutureEvents(np.zeros(0, dtype=np.int64), np.zeros(0), [], np.zeros(0))  # the usual batch
        # Rare: walk the batch, since every event accepted may raise the limit of the next.
        index, limits, basis, clamped = [], [], [], []
        for i, t in enumerate(times.tolist()):
            on_watermark = watermark is not None and watermark > now
            limit = (watermark if watermark is not None and on_watermark else now) + skew
            if t <= limit:
                watermark = t if watermark is None else max(watermark, t)
                continue
            index.append(i)
            limits.append(limit)
            basis.append("watermark" if on_watermark else "clock")
            # Scored at the partition's current event time, so that it moves no clock.
            clamped.append(now if watermark is None else watermark)
            if self.mode == "clamp" and watermark is None:
                watermark = now  # the clamped event is accepted at the clock
        return FutureEvents(np.asarray(index, dtype=np.int64), np.asarray(limits), basis, np.asarray(clamped))


class EventTimeGuard:
    """A partition's event time guard: the settings and the watermark (module docstring).

    ``max_future_skew`` None turns the check off (the watermark is still kept).
    """

    state_version = 1

    def __init__(self, max_future_skew: float | None = DEFAULT_MAX_FUTURE_SKEW_S, mode: FutureTimestamps = "dead_letter") -> None:
        if max_future_skew is not None and not (max_future_skew > 0 and math.isfinite(max_future_skew)):
            raise ValueError(f"max_future_skew must be a positive number of seconds, got {max_future_skew!r}")
        if mode not in ("dead_letter", "clamp"):
            raise ValueError(f"mode must be 'dead_letter' or 'clamp', got {mode!r}")
        self.max_future_skew = max_future_skew
        self.mode: FutureTimestamps = mode
        self.watermark: float | None = None  # highest event time accepted on the partition

    def limit(self, now: float) -> TimeLimit | None:
        """What the next batch is checked against at clock ``now``; None with the check off."""
        if self.max_future_skew is None:
            return None
        return TimeLimit(self.watermark, now, self.max_future_skew, self.mode)

    def advance(self, times: np.ndarray) -> None:
        """The events of a batch were accepted (and scored) at ``times``: raise the watermark."""
        if len(times):
            latest = float(np.max(times))
            if self.watermark is None or latest > self.watermark:
                self.watermark = latest

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.state_version, "watermark": self.watermark}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version:
            raise StateError(f"event time state version {state.get('version')!r}, expected {self.state_version}")
        watermark = state.get("watermark")
        if watermark is not None and (isinstance(watermark, bool) or not isinstance(watermark, int | float) or not math.isfinite(watermark)):
            raise StateError(f"event time watermark {watermark!r} is not a finite number", reason="corrupt")
        self.watermark = None if watermark is None else float(watermark)


def iso_utc(epoch_seconds: float) -> str:
    """'2026-01-05T10:00:00.000Z' (UTC, milliseconds): how every record, log line and report
    writes an event time."""
    if not math.isfinite(epoch_seconds):
        return str(epoch_seconds)
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
