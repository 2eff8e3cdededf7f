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


def hour_buckets(t: np.ndarray) -> np.ndarray:
    """``hour_bucket`` of every time in ``t``."""
    day = np.floor(t / 86400.0)
    weekend = (day + 3) % 7 >= 5
    return ((t % 86400.0) // HOUR).astype(np.int64) + np.where(weekend, 24, 0)


class _KeyView:
    """Plain-list copies of the per-key arrays for the keys of one batch (fast item access in
    the sequential walk), written back before anything reads the arrays themselves. ``peak``
    bounds each key's rates over the whole batch (its counts plus all its events in it)."""

    def __init__(self, detector: SilenceDetector, slots: np.ndarray, in_batch: np.ndarray) -> None:
        self.detector, self.slots, self.in_batch = detector, slots, in_batch
        self.last: list[float] = []
        self.alerted: list[bool] = []
        self.peak: list[float] = []  # events per hour
        self.load()

    def load(self) -> None:
        # In place: the walk holds references to these lists. Counted events are in both
        # counts and in_batch: the bound only gets looser, never too low.
        d = self.detector
        self.last[:] = d._last[self.slots].tolist()
        self.alerted[:] = d._alerted[self.slots].tolist()
        self.peak[:] = d._rates(self.slots, self.in_batch).max(axis=1).tolist()

    def store(self) -> None:
        self.detector._last[self.slots] = self.last
        self.detector._alerted[self.slots] = self.alerted


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
        self._names: list[str] = []  # by slot
        # Per-key arrays have spare capacity (grown by doubling); rows past len(keys) are unused.
        self._counts = np.zeros((0, BUCKETS))  # events per key and bucket
        self._last = np.zeros(0)  # last event time per key
        self._alerted = np.zeros(0, dtype=bool)  # in an alerted silence episode
        # An upper bound of each key's hourly rates: exact when its counts last changed. Rates
        # only fall as the stream's hours grow, except when a bucket becomes covered, which
        # recomputes every bound. It only decides which keys get the exact check.
        self._peak = np.zeros(0)
        self._hours = np.zeros(BUCKETS)  # stream hours covered per bucket
        self._clock = -math.inf  # newest event time at the last check
        self._next_check = -math.inf

    @property
    def n_keys(self) -> int:
        return len(self._names)

    # -- learning and checking ---------------------------------------------------------------

    def process(self, batch: FeatureBatch) -> list[SilenceAlert]:
        """Learn the batch's events (in order) and return the silences that became unlikely.

        The walk over events is sequential (an alert depends on the clock and the key's last
        event at that moment), but it touches only plain Python lists of the keys in this
        batch; bucket counts are added in bulk, and brought up to date before any check reads
        them. Which keys are checked exactly is decided by an upper bound of their rates, so
        the alerts are those of checking every key at every step.
        """
        keys = batch.keys.get(self.key_set)
        if keys is None or batch.n == 0:
            return []
        present = np.flatnonzero(np.fromiter((k is not None for k in keys), dtype=bool, count=batch.n))
        if not len(present):
            return []
        uniq, local = np.unique(keys[present].astype(str), return_inverse=True)
        slots = self._slots(uniq.tolist())
        times = batch.event_time[present]
        buckets = hour_buckets(times)
        # This batch's events per key and bucket: counts + these bound every rate the batch
        # can reach, whatever has been counted so far.
        in_batch = np.zeros((len(slots), BUCKETS))
        np.add.at(in_batch, (local, buckets), 1)
        view = _KeyView(self, slots, in_batch)
        alerts: list[SilenceAlert] = []
        counted = 0  # events [0, counted) are in self._counts

        def count_until(j: int) -> None:
            nonlocal counted
            if j > counted:
                touched = np.unique(slots[local[counted:j]])
                np.add.at(self._counts, (slots[local[counted:j]], buckets[counted:j]), 1)
                self._peak[touched] = self._rates(touched).max(axis=1)
                counted = j

        limit = self.expected_events * HOUR
        last, alerted, peak = view.last, view.alerted, view.peak
        for j, (t, k) in enumerate(zip(times.tolist(), local.tolist())):
            if t >= self._next_check:
                count_until(j)
                view.store()
                alerts.extend(self._advance(t))
                view.load()
            prev = last[k]
            # A silence that ended before the timer looked at it is still reported.
            if prev > -math.inf and not alerted[k] and (t - prev) * peak[k] >= limit:
                count_until(j)
                view.store()
                slot = int(slots[k])
                alert = self._check(slot, t, self._rates(np.array([slot]))[0])
                view.load()
                if alert is not None:
                    alerts.append(alert)
            if t >= prev:
                last[k] = t
                alerted[k] = False
        count_until(len(times))
        view.store()
        return alerts

    def _advance(self, now: float) -> list[SilenceAlert]:
        """Move the clock to ``now`` (checked once per ``check_every_s`` of event time)."""
        covered_before = self._hours >= 1.0
        if self._clock > -math.inf:
            self._cover(self._clock, now)
        self._clock = now
        self._next_check = (math.floor(now / self.check_every_s) + 1) * self.check_every_s
        n = self.n_keys
        if not n:
            return []
        if not np.array_equal(covered_before, self._hours >= 1.0):  # a bucket stops borrowing
            self._peak[:n] = self._rates(np.arange(n)).max(axis=1)
        if self._hours.sum() < self.min_hours:
            return []
        # Only a key whose rate bound could have produced the limit since its last event can
        # have crossed it: the exact integral is computed for those alone.
        last = self._last[:n]
        with np.errstate(invalid="ignore"):
            maybe = (
                ~self._alerted[:n]
                & (last < now)
                & (last > -math.inf)  # a key first seen in the batch being walked has no event yet
                & ((now - last) * self._peak[:n] >= self.expected_events * HOUR)
                & (self._counts[:n].sum(axis=1) >= self.min_events)
            )
        candidates = np.flatnonzero(maybe)
        alerts = []
        for slot, rate in zip(candidates.tolist(), self._rates(candidates)):
            alert = self._check(slot, now, rate)
            if alert is not None:
                alerts.append(alert)
        # In the order the silences became unlikely (slot order is an accident of arrival).
        return sorted(alerts, key=lambda a: (a.event_time, a.key))

    def _check(self, slot: int, now: float, rate: np.ndarray) -> SilenceAlert | None:
        if self._hours.sum() < self.min_hours or self._counts[slot].sum() < self.min_events:
            return None
        crossing = self._crossing(rate, float(self._last[slot]), now)
        if crossing is None:
            return None
        self._alerted[slot] = True
        return SilenceAlert(self._names[slot], crossing, float(self._last[slot]), self.expected_events, math.exp(-self.expected_events))

    def _rates(self, slots: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Events per hour for the keys ``slots`` and every bucket, (len(slots), 48), with
        ``extra`` events added to their counts. A bucket the stream has not covered for an
        hour yet (the first weekend) borrows the same hour of the other day type."""
        counts = self._counts[slots] if extra is None else self._counts[slots] + extra
        covered = self._hours >= 1.0
        rate = np.where(covered, counts / np.maximum(self._hours, 1.0), 0.0)
        other = np.roll(rate, 24, axis=1)  # weekday <-> weekend, same hour
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

    def _slots(self, keys: list[str]) -> np.ndarray:
        """Slots of ``keys``, adding the new ones (arrays grow by doubling)."""
        out = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            slot = self._keys.get(key)
            if slot is None:
                slot = self._keys[key] = len(self._names)
                self._names.append(key)
            out[i] = slot
        n, capacity = len(self._names), len(self._last)
        if n > capacity:
            extra = max(n, 2 * capacity, 64) - capacity
            self._counts = np.vstack([self._counts, np.zeros((extra, BUCKETS))])
            self._last = np.concatenate([self._last, np.full(extra, -math.inf)])
            self._alerted = np.concatenate([self._alerted, np.zeros(extra, dtype=bool)])
            self._peak = np.concatenate([self._peak, np.zeros(extra)])
        return out

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "keys": list(self._names),
            "counts": self._counts[: self.n_keys].copy(),
            "last": self._last[: self.n_keys].copy(),
            "alerted": self._alerted[: self.n_keys].copy(),
            "hours": self._hours.copy(),
            "clock": self._clock,
            "next_check": self._next_check,
            "peak": self._peak[: self.n_keys].copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version:
            raise StateError(f"silence state version {state.get('version')!r}, expected {self.state_version}")
        self._names = list(state["keys"])
        self._keys = {k: i for i, k in enumerate(self._names)}
        self._counts = np.array(state["counts"], dtype=np.float64).reshape(-1, BUCKETS)
        self._last = np.array(state["last"], dtype=np.float64)
        self._alerted = np.array(state["alerted"], dtype=bool)
        self._hours = np.array(state["hours"], dtype=np.float64)
        self._clock = float(state["clock"])
        self._next_check = float(state["next_check"])
        # Recomputed, not trusted: it must bound the current rates (see __init__).
        n = len(self._names)
        self._peak = self._rates(np.arange(n)).max(axis=1) if n else np.zeros(0)
