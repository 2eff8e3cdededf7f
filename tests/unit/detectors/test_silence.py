"""The silence timer: a busy key that stops is reported once; quiet hours are not."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from stream_detector.detectors.silence import SilenceAlert, SilenceDetector
from stream_detector.detectors.silence_kernel import BUCKETS, HOUR
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch

MONDAY = 1_767_571_200.0  # 2026-01-05T00:00:00Z


def stream(stop_key: str | None, stop_from: float, stop_to: float, days: float = 2.0, seed: int = 0) -> FeatureBatch:
    """Two stores with Poisson arrivals: busy by day (1/min), quiet at night (1/h)."""
    rng = np.random.default_rng(seed)
    times, keys = [], []
    for key in ("s-1", "s-2"):
        for hour_start in np.arange(MONDAY, MONDAY + days * 86400, 3600.0):
            hour = (hour_start % 86400) / 3600
            rate = 60.0 if 8 <= hour < 20 else 1.0  # events per hour
            for t in hour_start + rng.uniform(0, 3600, rng.poisson(rate)):
                if key == stop_key and stop_from <= t < stop_to:
                    continue
                times.append(t)
                keys.append(key)
    order = np.argsort(times, kind="stable")
    return FeatureBatch(
        event_time=np.asarray(times)[order],
        columns={},
        keys={"store_id": np.asarray(keys, dtype=object)[order]},
    )


def run(detector: SilenceDetector, batch: FeatureBatch, size: int) -> list:
    alerts = []
    for start in range(0, batch.n, size):
        alerts.extend(detector.process(batch.slice(start, start + size)))
    return alerts


def test_a_busy_store_that_stops_is_reported_once_and_soon():
    stop_from = MONDAY + 86400 + 10 * 3600  # Tuesday 10:00
    batch = stream("s-1", stop_from, stop_from + 2 * 3600)
    alerts = run(SilenceDetector(expected_events=12, min_hours=6, min_events=50), batch, 500)
    assert [a.key for a in alerts] == ["s-1"]
    alert = alerts[0]
    assert stop_from < alert.event_time <= stop_from + 20 * 60  # ~12 events at 1/min
    assert "s-1" in alert.reason("store_id") and "nothing for" in alert.reason("store_id")


def test_quiet_nights_and_normal_gaps_are_not_reported():
    batch = stream(None, 0.0, 0.0, days=3.0, seed=1)
    assert run(SilenceDetector(expected_events=12, min_hours=6, min_events=50), batch, 500) == []


def test_alert_does_not_depend_on_batch_boundaries():
    stop_from = MONDAY + 86400 + 13 * 3600
    batch = stream("s-2", stop_from, stop_from + 3600, seed=2)
    times = {size: [(a.key, a.event_time) for a in run(SilenceDetector(min_hours=6, min_events=50), batch, size)] for size in (1, 97, batch.n)}
    assert times[1] == times[97] == times[batch.n]
    assert len(times[1]) == 1


def test_state_round_trip_continues_identically():
    stop_from = MONDAY + 86400 + 15 * 3600
    batch = stream("s-1", stop_from, stop_from + 3600, seed=3)
    half = batch.n // 2
    first = SilenceDetector(min_hours=6, min_events=50)
    run(first, batch.slice(0, half), 300)
    second = SilenceDetector(min_hours=6, min_events=50)
    second.load_state_dict(first.state_dict())
    assert run(first, batch.slice(half, batch.n), 300) == run(second, batch.slice(half, batch.n), 300)


# -- the compiled walk against the pure-Python implementation it replaced -------------------


def random_stream(rng: np.random.Generator) -> FeatureBatch:
    """Keys with their own day/night and weekend rates, bursts, pauses (some for good), keys that
    start late, stream-wide gaps of hours to days, events slightly out of order, missing keys."""
    start = MONDAY + rng.uniform(-4.0, 3.0) * 86400  # any weekday: the first weekend borrows
    end = start + rng.uniform(3.0, 10.0) * 86400
    times: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for i in range(int(rng.integers(2, 8))):
        base = 10 ** rng.uniform(-0.5, 2.0)  # events per hour by day
        weekend_factor = rng.choice([0.0, 0.3, 1.0, 2.0])
        first = start + (rng.uniform(0.0, 2.0) * 86400 if rng.random() < 0.3 else 0.0)
        last = end - (rng.uniform(0.0, 2.0) * 86400 if rng.random() < 0.3 else 0.0)
        hours = np.arange(first, last, HOUR)
        hour_of_day = (hours % 86400) // HOUR
        weekend = (np.floor(hours / 86400) + 3) % 7 >= 5
        rate = base * np.where((hour_of_day >= 8) & (hour_of_day < 20), 1.0, 0.05) * np.where(weekend, weekend_factor, 1.0)
        counts = rng.poisson(rate)
        t = np.repeat(hours, counts) + rng.uniform(0.0, HOUR, counts.sum())
        bursts = hours[rng.random(len(hours)) < 0.01]
        t = np.concatenate([t, np.repeat(bursts, 40) + rng.uniform(0.0, 5.0, 40 * len(bursts))])
        for pause in start + rng.uniform(0.0, 10.0, rng.integers(0, 4)) * 86400:
            t = t[(t < pause) | (t >= pause + rng.exponential(6.0) * HOUR)]
        times.append(t)
        keys.append(np.full(len(t), f"store-{i}", dtype=object))
    t, k = np.concatenate(times), np.concatenate(keys)
    if rng.random() < 0.5:  # the whole stream stops (an outage upstream)
        gap = start + rng.uniform(1.0, 4.0) * 86400
        keep = (t < gap) | (t >= gap + rng.uniform(0.1, 3.0) * 86400)
        t, k = t[keep], k[keep]
    order = np.argsort(t, kind="stable")
    t, k = t[order], k[order]
    late = rng.random(len(t)) < 0.05
    t[late] -= rng.exponential(60.0, late.sum())  # arrives after newer events
    k[rng.random(len(t)) < 0.01] = None
    return FeatureBatch(event_time=t, columns={}, keys={"store_id": k})


def batch_bounds(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < n:
        size = int(rng.choice([1, rng.integers(1, 20), rng.integers(100, 3000)]))
        bounds.append((start, min(start + size, n)))
        start += size
    return bounds


def assert_same_state(state: dict[str, Any], reference: dict[str, Any]) -> None:
    assert state["version"] == reference["version"] and state["keys"] == reference["keys"]
    for name in ("counts", "last", "alerted", "hours"):
        assert np.array_equal(state[name], reference[name]), name
    assert state["clock"] == reference["clock"] and state["next_check"] == reference["next_check"]
    exact = ReferenceSilence()
    exact.load_state_dict(state)  # recomputes the exact peak rates
    assert np.all(state["peak"] >= exact._peak), "peak must bound the rates"


@pytest.mark.parametrize("seed", range(12))
def test_alerts_and_state_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    batch = random_stream(rng)
    params = dict(
        expected_events=float(rng.choice([2.0, 3.0, 8.0, 12.0])),
        min_events=int(rng.choice([1, 20, 100])),
        min_hours=float(rng.choice([0.0, 6.0, 30.0])),
        check_every_s=float(rng.choice([1.0, 7.5, 60.0, 600.0, 3600.0, 14400.0])),
    )
    detector, reference = SilenceDetector(**params), ReferenceSilence(**params)
    bounds = batch_bounds(rng, batch.n)
    alerts = 0
    for i, (start, stop) in enumerate(bounds):
        part = batch.slice(start, stop)
        expected = reference.process(part)
        assert detector.process(part) == expected
        alerts += len(expected)
        assert_same_state(detector.state_dict(), reference.state_dict())
        if i == len(bounds) // 2:  # a snapshot of the old implementation resumes identically
            detector = SilenceDetector(**params)
            detector.load_state_dict(reference.state_dict())
    assert alerts > 0


def test_load_refuses_other_versions():
    with pytest.raises(StateError):
        SilenceDetector().load_state_dict({"version": 2})


def test_non_finite_event_times_are_refused():
    batch = FeatureBatch(event_time=np.array([MONDAY, np.nan]), columns={}, keys={"store_id": np.array(["s-1", "s-1"], dtype=object)})
    with pytest.raises(ValueError, match="finite"):
        SilenceDetector().process(batch)


# Verbatim copy (names prefixed) of the pure-Python SilenceDetector (numpy per check, Python per event) that the
# compiled walk replaced: the definition of the alerts and state above.


def _reference_hour_bucket(t: float) -> int:
    day = math.floor(t / 86400.0)
    weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday: Monday = 0
    return int((t % 86400.0) // HOUR) + (24 if weekend else 0)


def _reference_hour_buckets(t: np.ndarray) -> np.ndarray:
    """``_reference_hour_bucket`` of every time in ``t``."""
    day = np.floor(t / 86400.0)
    weekend = (day + 3) % 7 >= 5
    return ((t % 86400.0) // HOUR).astype(np.int64) + np.where(weekend, 24, 0)


class _ReferenceKeyView:
    """Plain-list copies of the per-key arrays for the keys of one batch (fast item access in
    the sequential walk), written back before anything reads the arrays themselves. ``peak``
    bounds each key's rates over the whole batch (its counts plus all its events in it)."""

    def __init__(self, detector: ReferenceSilence, slots: np.ndarray, in_batch: np.ndarray) -> None:
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


class ReferenceSilence:
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
        buckets = _reference_hour_buckets(times)
        # This batch's events per key and bucket: counts + these bound every rate the batch
        # can reach, whatever has been counted so far.
        in_batch = np.zeros((len(slots), BUCKETS))
        np.add.at(in_batch, (local, buckets), 1)
        view = _ReferenceKeyView(self, slots, in_batch)
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
            step = rate[_reference_hour_bucket(t)] * (edge - t) / HOUR
            if expected + step >= self.expected_events:
                per_second = rate[_reference_hour_bucket(t)] / HOUR
                return t + (self.expected_events - expected) / per_second
            expected += step
            t = edge
        return None

    def _cover(self, start: float, end: float) -> None:
        t = start
        while t < end:
            edge = min((math.floor(t / HOUR) + 1) * HOUR, end)
            self._hours[_reference_hour_bucket(t)] += (edge - t) / HOUR
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
