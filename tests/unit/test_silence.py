"""The silence timer: a busy key that stops is reported once; quiet hours are not."""

from __future__ import annotations

import numpy as np

from stream_detector.detectors.silence import SilenceDetector
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
