"""The silence timer: a busy key that stops is reported once; quiet hours are not."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stream_detector.detectors.silence import SilenceAlert, SilenceDetector
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch

MONDAY = 1_767_571_200.0  # 2026-01-05T00:00:00Z
HOUR = 3600.0
BUCKETS = 48  # hour of day x (weekday, weekend)


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


# -- the detector against its definition, simulated event by event ---------------------------
#
# ``SilenceTimerDefinition`` is written from the documented semantics (the module docstrings of
# detectors/silence.py and detectors/silence_kernel.py, the README's ``silence`` entry), not from
# the implementation: plain dicts and lists, one event at a time, every key checked exactly at
# every look of the timer. It keeps no rate bound, no slots and no batches, and shares no code
# with the detector but the ``SilenceAlert`` record it returns. The hand-worked cases below
# check it (and the detector) on numbers computed by hand.

EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def bucket_of(t: float) -> int:
    """The rate bucket of event time ``t``: hour of day (UTC), plus 24 on Saturdays and Sundays."""
    day, seconds_into_day = divmod(t, 86400.0)
    weekday = (int(day) + EPOCH_WEEKDAY) % 7
    return int(seconds_into_day // 3600.0) + (24 if weekday >= 5 else 0)


def hour_pieces(start: float, end: float) -> Iterator[tuple[float, float]]:
    """[start, end) cut at every full hour."""
    t = start
    while t < end:
        piece_end = min((math.floor(t / 3600.0) + 1) * 3600.0, end)
        yield t, piece_end
        t = piece_end


class SilenceTimerDefinition:
    """What the silence timer must do, one event at a time.

    * Only events with a key exist for the timer. Each is learned: its key's count in the
      event's bucket goes up by one.
    * The timer looks at the first event at or after each multiple of ``check_every_s`` of event
      time: the clock moves to that event's time, the stream time since the previous look is
      added to the covered hours of its buckets, and every key is checked.
    * Checking a key at ``now``: a key not in an alerted silence, whose newest event is before
      ``now``, with at least ``min_events`` events, while the stream has covered at least
      ``min_hours``, is silent since its newest event. If the integral of its hourly rates from
      then on reaches ``expected_events`` by ``now``, it gets one alert, stamped with the moment
      it did.
    * An event of a key first checks the silence it ends (reported even if the timer did not
      look in between), then is learned; an event newer than the key's newest ends the episode.
    * A key's rate in a bucket is its count there over the hours the stream covered of it; a
      bucket covered for less than an hour borrows the same hour of the other day type (0 if
      that one is not covered either).
    * The alerts of one look come in the order the silences became unlikely, then by key.
    """

    def __init__(self, expected_events: float, min_events: int, min_hours: float, check_every_s: float) -> None:
        self.expected_events = expected_events
        self.min_events = min_events
        self.min_hours = min_hours
        self.check_every_s = check_every_s
        self.counts: dict[str, list[float]] = {}  # key -> events per bucket
        self.newest: dict[str, float] = {}  # key -> time of its newest event
        self.in_alerted_silence: dict[str, bool] = {}
        self.covered = [0.0] * BUCKETS  # stream hours covered per bucket
        self.clock = -math.inf  # event time of the last look
        self.next_look = -math.inf

    def process(self, batch: FeatureBatch) -> list[SilenceAlert]:
        alerts = []
        for t, key in zip(batch.event_time.tolist(), batch.keys["store_id"].tolist(), strict=True):
            if key is not None:
                alerts += self.event(t, str(key))
        return alerts

    def event(self, t: float, key: str) -> list[SilenceAlert]:
        alerts = []
        if t >= self.next_look:
            if self.clock > -math.inf:
                for a, b in hour_pieces(self.clock, t):
                    self.covered[bucket_of(a)] += (b - a) / 3600.0
            self.clock = t
            self.next_look = (math.floor(t / self.check_every_s) + 1) * self.check_every_s
            looked = [alert for k in self.newest if (alert := self.check(k, t)) is not None]
            alerts += sorted(looked, key=lambda alert: (alert.event_time, alert.key))
        if key in self.newest and (alert := self.check(key, t)) is not None:
            alerts.append(alert)
        self.counts.setdefault(key, [0.0] * BUCKETS)[bucket_of(t)] += 1.0
        if t >= self.newest.get(key, -math.inf):
            self.newest[key] = t
            self.in_alerted_silence[key] = False
        return alerts

    def rates(self, key: str) -> list[float]:
        """The key's events per hour in every bucket."""
        counts, covered = self.counts[key], self.covered
        rates = []
        for b in range(BUCKETS):
            other = (b + 24) % BUCKETS
            if covered[b] >= 1.0:
                rates.append(counts[b] / covered[b])
            elif covered[other] >= 1.0:
                rates.append(counts[other] / covered[other])
            else:
                rates.append(0.0)
        return rates

    def check(self, key: str, now: float) -> SilenceAlert | None:
        since = self.newest[key]
        if self.in_alerted_silence[key] or not since < now:
            return None
        if math.fsum(self.covered) < self.min_hours or sum(self.counts[key]) < self.min_events:
            return None
        rates = self.rates(key)
        # A shortcut that is sound on its own: the integral is at most the highest rate times
        # the duration (the margin is far above the rounding of the sum below).
        if max(rates) * (now - since) / 3600.0 < self.expected_events * (1.0 - 1e-9):
            return None
        expected = 0.0
        for a, b in hour_pieces(since, now):
            per_second = rates[bucket_of(a)] / 3600.0
            if expected + per_second * (b - a) >= self.expected_events:
                self.in_alerted_silence[key] = True
                when = a + (self.expected_events - expected) / per_second
                return SilenceAlert(key, when, since, self.expected_events, math.exp(-self.expected_events))
            expected += per_second * (b - a)
        return None

    def snapshot(self) -> dict[str, Any]:
        """This state in the detector's snapshot format, claiming a rate bound of 0 for every key
        (a restore must recompute the bound, not trust it)."""
        keys = list(self.counts)
        return {
            "version": 1,
            "keys": keys,
            "counts": np.array([self.counts[k] for k in keys]).reshape(-1, BUCKETS),
            "last": np.array([self.newest[k] for k in keys]),
            "alerted": np.array([self.in_alerted_silence[k] for k in keys], dtype=bool),
            "hours": np.array(self.covered),
            "clock": self.clock,
            "next_check": self.next_look,
            "peak": np.zeros(len(keys)),
        }


def test_bucket_of_follows_the_calendar():
    assert bucket_of(MONDAY) == 0
    assert bucket_of(MONDAY + 10 * HOUR + 59 * 60) == 10
    assert bucket_of(MONDAY + 4 * 86400 + 23 * HOUR) == 23  # Friday 23:00
    assert bucket_of(MONDAY + 5 * 86400) == 24  # Saturday 00:00
    assert bucket_of(MONDAY + 6 * 86400 + 13.5 * HOUR) == 37  # Sunday 13:30
    assert bucket_of(MONDAY + 7 * 86400) == 0
    assert bucket_of(0.0) == 0 and bucket_of(2 * 86400.0) == 24  # 1970-01-01 Thursday, then Saturday
    assert list(hour_pieces(MONDAY + 1800.0, MONDAY + 2 * HOUR + 60.0)) == [
        (MONDAY + 1800.0, MONDAY + HOUR),
        (MONDAY + HOUR, MONDAY + 2 * HOUR),
        (MONDAY + 2 * HOUR, MONDAY + 2 * HOUR + 60.0),
    ]


TUESDAY = MONDAY + 86400.0


def tuesday(clock: str) -> float:
    """Event time of ``"HH:MM"`` or ``"HH:MM:SS"`` on Tuesday 2026-01-06 (UTC)."""
    hours, minutes, seconds = (int(part) for part in (clock + ":00")[:8].split(":"))
    return TUESDAY + hours * HOUR + minutes * 60.0 + seconds


def hand_made_events(until: float) -> list[tuple[float, str]]:
    """Store ``a``: every 5 min on Monday 10:00-11:00 (12 events) and every 5 min from Tuesday
    10:01 to 10:26 (6 events), then once at Tuesday 11:30. Store ``b`` keeps the clock moving:
    every 15 min from Monday 00:00 until ``until``."""
    a = [MONDAY + 10 * HOUR + 300.0 * i for i in range(12)] + [tuesday("10:01") + 300.0 * i for i in range(6)] + [tuesday("11:30")]
    b = np.arange(MONDAY, until, 900.0).tolist()
    return sorted([(t, "a") for t in a] + [(t, "b") for t in b])


def as_batch(events: list[tuple[float, str]]) -> FeatureBatch:
    return FeatureBatch(
        event_time=np.array([t for t, _ in events]),
        columns={},
        keys={"store_id": np.array([k for _, k in events], dtype=object)},
    )


@pytest.mark.parametrize(
    "min_events, min_hours, found_at, stamped",
    [
        (18, 34.75, tuesday("10:45"), tuesday("10:43:30")),  # both minimums met exactly at the look of 10:45
        (18, 34.76, tuesday("11:00"), tuesday("10:46")),  # the stream is long enough from the 11:00 look on
        (19, 0.0, None, None),  # a has 18 events when its silence becomes unlikely
    ],
)
def test_hand_made_case_timer_looks_every_15_min(min_events, min_hours, found_at, stamped):
    """Worked by hand. Looks every 15 min (at b's events), so covered hours grow by 0.25.

    At the look of Tuesday 10:30, bucket 10 (weekday 10:00) is covered 1.5 h (Monday, and
    Tuesday 10:00-10:30) and holds 12 + 6 = 18 events of ``a``: 12/h; ``a`` silent since 10:26
    expects 4 min x 12/h = 0.8 events. At 10:45 the stream has covered 24 + 10.75 = 34.75 h,
    bucket 10 1.75 h: 18 / 1.75 events per hour, so 3 expected events are reached
    3 / (18 / 1.75) h = 17.5 min after 10:26, at 10:43:30. At 11:00 bucket 10 is covered 2 h:
    9/h, 3 events 20 min after 10:26, at 10:46. Monday's silence of ``a`` (from 10:55) expects
    5 min x 12/h = 1 event at most (later buckets hold no event of ``a``); ``b`` (4 per hour) is
    never silent for more than 15 min (1 expected event). ``a``'s event at 11:30 ends the
    episode without a second alert."""
    params = dict(expected_events=3.0, min_events=min_events, min_hours=min_hours, check_every_s=900.0)
    events = hand_made_events(tuesday("12:00"))
    definition = SilenceTimerDefinition(**params)
    raised_at = [(t, alert) for t, key in events for alert in definition.event(t, key)]
    expected = [] if stamped is None else [SilenceAlert("a", stamped, tuesday("10:26"), 3.0, math.exp(-3.0))]
    assert [t for t, _ in raised_at] == ([] if found_at is None else [found_at])
    assert_same_alerts([alert for _, alert in raised_at], expected)
    for size in (1, 7, len(events)):
        assert_same_alerts(run(SilenceDetector(**params), as_batch(events), size), expected)


def test_hand_made_case_a_silence_that_ended_between_looks_is_still_reported():
    """Worked by hand. Looks every 2 h: the look of Tuesday 10:00 covers bucket 10 for the
    Monday hour only, and the next look is at 12:00. ``a``'s event at 11:30 ends a silence
    from 10:26: bucket 10 holds 18 events over 1 covered hour, 18/h, so 3 events were expected
    10 min after 10:26: an alert stamped 10:36, raised by the event at 11:30."""
    params = dict(expected_events=3.0, min_events=10, min_hours=24.0, check_every_s=7200.0)
    events = hand_made_events(tuesday("11:45"))  # b's last event 11:30, before the 12:00 look
    expected = SilenceAlert("a", tuesday("10:36"), tuesday("10:26"), 3.0, math.exp(-3.0))
    definition = SilenceTimerDefinition(**params)
    raised_at = [(t, key, alert) for t, key in events for alert in definition.event(t, key)]
    assert [(t, key) for t, key, _ in raised_at] == [(tuesday("11:30"), "a")]
    assert_same_alerts([raised_at[0][2]], [expected])
    for size in (1, 7, len(events)):
        assert_same_alerts(run(SilenceDetector(**params), as_batch(events), size), [expected])


# -- the detector against its definition, on random streams --------------------------------


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


def assert_same_alerts(got: list[SilenceAlert], expected: list[SilenceAlert]) -> None:
    """Same keys, order, silences and parameters; times equal up to rounding (1 us)."""
    assert [(a.key, a.since, a.expected_events, a.probability) for a in got] == [(a.key, a.since, a.expected_events, a.probability) for a in expected]
    assert [a.event_time for a in got] == pytest.approx([a.event_time for a in expected], rel=0.0, abs=1e-6)


def assert_same_state(state: dict[str, Any], definition: SilenceTimerDefinition) -> None:
    """The detector's snapshot holds the definition's counts, newest events, episodes, covered
    hours and clock, per key (in whatever slot order), and a bound of every rate."""
    assert state["version"] == 1
    assert sorted(state["keys"]) == sorted(definition.counts)
    for slot, key in enumerate(state["keys"]):
        assert state["counts"][slot].tolist() == definition.counts[key], key
        assert state["last"][slot] == definition.newest[key], key
        assert bool(state["alerted"][slot]) == definition.in_alerted_silence[key], key
        assert state["peak"][slot] >= max(definition.rates(key)) * (1.0 - 1e-12), f"peak must bound the rates of {key}"
    assert state["hours"].tolist() == pytest.approx(definition.covered, rel=1e-12, abs=1e-9)
    assert state["clock"] == definition.clock and state["next_check"] == definition.next_look


@pytest.mark.parametrize("seed", range(12))
def test_alerts_and_state_match_the_definition(seed):
    rng = np.random.default_rng(seed)
    batch = random_stream(rng)
    params = dict(
        expected_events=float(rng.choice([2.0, 3.0, 8.0, 12.0])),
        min_events=int(rng.choice([1, 20, 100])),
        min_hours=float(rng.choice([0.0, 6.0, 30.0])),
        check_every_s=float(rng.choice([1.0, 7.5, 60.0, 600.0, 3600.0, 14400.0])),
    )
    detector, definition = SilenceDetector(**params), SilenceTimerDefinition(**params)
    bounds = batch_bounds(rng, batch.n)
    alerts = 0
    for i, (start, stop) in enumerate(bounds):
        part = batch.slice(start, stop)
        expected = definition.process(part)
        assert_same_alerts(detector.process(part), expected)
        alerts += len(expected)
        assert_same_state(detector.state_dict(), definition)
        if i == len(bounds) // 2:  # a snapshot written by someone else resumes identically
            detector = SilenceDetector(**params)
            detector.load_state_dict(pickle.loads(pickle.dumps(definition.snapshot())))
    assert alerts > 0


def test_load_refuses_other_versions():
    with pytest.raises(StateError):
        SilenceDetector().load_state_dict({"version": 2})


def test_non_finite_event_times_are_refused():
    batch = FeatureBatch(event_time=np.array([MONDAY, np.nan]), columns={}, keys={"store_id": np.array(["s-1", "s-1"], dtype=object)})
    with pytest.raises(ValueError, match="finite"):
        SilenceDetector().process(batch)


def test_the_timer_is_a_collective_detector_and_its_alerts_are_key_alerts():
    """The pipeline holds timers as ``CollectiveDetector`` and their alerts as ``KeyAlert``."""
    from stream_detector.detectors.base import CollectiveDetector

    detector = SilenceDetector(key_set="store_id")
    assert isinstance(detector, CollectiveDetector) and detector.key_set == "store_id"
    alert = SilenceAlert(key="s-1", event_time=7200.0, since=0.0, expected_events=12.0, probability=math.exp(-12.0))
    assert (alert.key, alert.event_time) == ("s-1", 7200.0) and "s-1" in alert.reason("store_id")
