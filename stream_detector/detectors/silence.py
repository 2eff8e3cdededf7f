"""Collective anomalies: a key (a store) that stops sending events.

No event arrives from a store that stopped, so no per-event score can say so. This detector
is a timer over per-key rates in event time:

* it learns each key's rate per hour of day, separately for weekdays and weekends
  (events per hour in that bucket / hours of that bucket the stream has covered);
* the stream's clock is the newest event time seen (other keys keep it moving);
* for a key silent since ``t``, the expected number of events since then is the integral of its
  rate; when that passes ``expected_events`` (no event has probability ``exp(-expected)``),
  it raises one alert, stamped with the event time at which the silence became that unlikely.
  The next event from the key ends the episode.

A quiet night is not an alert (the expected count stays small); a busy store going quiet is
found after about ``expected_events`` of its usual inter-arrival times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch

HOUR = 3600.0
BUCKETS = 48  # hour of day x (weekday, weekend)


def hour_bucket(t: float) -> int:
    day = math.floor(t / 86400.0)
    weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday: Monday = 0
    return int((t % 86400.0) // HOUR) + (24 if weekend else 0)


@dataclass(frozen=True)
class SilenceAlert:
    key: str
    event_time: float  # when the silence became unlikely enough (event time)
    since: float  # the key's last event
    expected_events: float
    probability: float

    def reason(self, key_set: str) -> str:
        minutes = (self.event_time - self.since) / 60.0
        return (
            f"{key_set} {self.key} has sent nothing for {minutes:.0f} min; "
            f"{self.expected_events:.1f} events were expected by now (chance of such a silence {self.probability:.1e})"
        )


class SilenceDetector:
    """Per-key silence timer (see module docstring). One instance per key set, e.g. store_id."""

    name = "silence"
    state_version = 1

    def __init__(
        self,
        key_set: str = "store_id",
        expected_events: float = 8.0,
        min_events: int = 200,
        min_hours: float = 24.0,
        check_every_s: float = 60.0,
    ) -> None:
        self.key_set = key_set
        self.expected_events = expected_events
        # The timer looks every this many seconds of event time (alerts keep the exact time).
        self.check_every_s = check_every_s
        # A key needs this many events, and the stream this many hours, before alerts.
        self.min_events = min_events
        self.min_hours = min_hours
        self._keys: dict[str, int] = {}
        self._counts = np.zeros((0, BUCKETS))  # events per key and bucket
        self._last = np.zeros(0)  # last event time per key
        self._alerted = np.zeros(0, dtype=bool)  # in an alerted silence episode
        self._hours = np.zeros(BUCKETS)  # stream hours covered per bucket
        self._clock = -math.inf  # newest event time at the last check
        self._next_check = -math.inf
        self._peak = np.zeros(0)  # each key's highest hourly rate, refreshed at checks

    # -- learning and checking ---------------------------------------------------------------

    def process(self, batch: FeatureBatch) -> list[SilenceAlert]:
        """Learn the batch's events (in order) and return the silences that became unlikely."""
        keys = batch.keys.get(self.key_set)
        if keys is None or batch.n == 0:
            return []
        alerts: list[SilenceAlert] = []
        for key, t in zip(keys.tolist(), batch.event_time.tolist()):
            if key is None:
                continue
            if t >= self._next_check:
                alerts.extend(self._advance(t))
            slot = self._slot(key)
            last = self._last[slot]
            # A silence that ended before the timer looked at it is still reported.
            if last > -math.inf and not self._alerted[slot] and (t - last) * self._peak[slot] / HOUR >= self.expected_events:
                alert = self._check(slot, t)
                if alert is not None:
                    alerts.append(alert)
            if t >= last:
                self._last[slot] = t
                self._alerted[slot] = False
            self._counts[slot, hour_bucket(t)] += 1
        return alerts

    def _advance(self, now: float) -> list[SilenceAlert]:
        """Move the clock to ``now`` (checked once per ``check_every_s`` of event time)."""
        if self._clock > -math.inf:
            self._cover(self._clock, now)
        self._clock = now
        self._next_check = (math.floor(now / self.check_every_s) + 1) * self.check_every_s
        self._peak = np.array([self._rates(slot).max() for slot in range(len(self._keys))]) if len(self._keys) else self._peak
        alerts = []
        for slot in np.flatnonzero(~self._alerted & (self._last < now)).tolist():
            alert = self._check(slot, now)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _check(self, slot: int, now: float) -> SilenceAlert | None:
        if self._hours.sum() < self.min_hours or self._counts[slot].sum() < self.min_events:
            return None
        rate = self._rates(slot)
        crossing = self._crossing(rate, float(self._last[slot]), now)
        if crossing is None:
            return None
        self._alerted[slot] = True
        names = list(self._keys)
        return SilenceAlert(names[slot], crossing, float(self._last[slot]), self.expected_events, math.exp(-self.expected_events))

    def _rates(self, slot: int) -> np.ndarray:
        """Events per hour in each bucket. A bucket the stream has not covered for an hour yet
        (the first weekend) borrows the same hour of the other day type."""
        covered = self._hours >= 1.0
        rate = np.where(covered, self._counts[slot] / np.maximum(self._hours, 1.0), 0.0)
        other = np.roll(rate, 24)  # weekday <-> weekend, same hour
        other_covered = np.roll(covered, 24)
        return np.where(covered, rate, np.where(other_covered, other, 0.0))

    def _crossing(self, rate: np.ndarray, since: float, now: float) -> float | None:
        """The time in (since, now] at which the expected count since ``since`` reaches the limit."""
        expected = 0.0
        t = since
        while t < now:
            edge = min((math.floor(t / HOUR) + 1) * HOUR, now)
            step = rate[hour_bucket(t)] * (edge - t) / HOUR
            if expected + step >= self.expected_events:
                per_second = rate[hour_bucket(t)] / HOUR
                return t + (self.expected_events - expected) / per_second
            expected += step
            t = edge
        return None

    def _cover(self, start: float, end: float) -> None:
        t = start
        while t < end:
            edge = min((math.floor(t / HOUR) + 1) * HOUR, end)
            self._hours[hour_bucket(t)] += (edge - t) / HOUR
            t = edge

    def _slot(self, key: str) -> int:
        slot = self._keys.get(key)
        if slot is None:
            slot = self._keys[key] = len(self._keys)
            self._counts = np.vstack([self._counts, np.zeros((1, BUCKETS))])
            self._last = np.append(self._last, -math.inf)
            self._alerted = np.append(self._alerted, False)
            self._peak = np.append(self._peak, 0.0)
        return slot

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "keys": list(self._keys),
            "counts": self._counts.copy(),
            "last": self._last.copy(),
            "alerted": self._alerted.copy(),
            "hours": self._hours.copy(),
            "clock": self._clock,
            "next_check": self._next_check,
            "peak": self._peak.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version:
            raise StateError(f"silence state version {state.get('version')!r}, expected {self.state_version}")
        self._keys = {k: i for i, k in enumerate(state["keys"])}
        self._counts = np.array(state["counts"], dtype=np.float64).reshape(-1, BUCKETS)
        self._last = np.array(state["last"], dtype=np.float64)
        self._alerted = np.array(state["alerted"], dtype=bool)
        self._hours = np.array(state["hours"], dtype=np.float64)
        self._clock = float(state["clock"])
        self._next_check = float(state["next_check"])
        self._peak = np.array(state["peak"], dtype=np.float64)
