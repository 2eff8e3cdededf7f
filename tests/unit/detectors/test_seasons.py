"""Seasonal z-score baselines: a normal Saturday peak is not an anomaly, a normal noon value at
3 a.m. on a Tuesday is; seasonal scoring keeps batch == one-by-one and state round-trips."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stream_detector.detectors import seasons
from stream_detector.detectors.zscore import ZScoreDetector
from stream_detector.detectors.zscore_kernel import factorize
from stream_detector.features import FeatureBatch
from tests.unit.detectors.test_zscore import run_chunks

MONDAY = 1_767_571_200.0  # 2026-01-05 00:00 UTC, a Monday
HOUR = 3600.0


def test_buckets_follow_the_calendar():
    t = np.array([MONDAY, MONDAY + 5 * 86400 + 14 * HOUR + 59, MONDAY + 6 * 86400 + 23 * HOUR])
    assert seasons.bucket("hour_of_day", t).tolist() == [0, 14, 23]
    assert seasons.bucket("day_of_week", t).tolist() == [0, 5, 6]
    assert seasons.bucket("hour_of_week", t).tolist() == [0, 5 * 24 + 14, 6 * 24 + 23]
    assert seasons.describe("hour_of_week", 5 * 24 + 14) == "Saturdays 14:00-15:00 UTC"
    codes, distinct = factorize(["s1", None, "s2", "s1"])
    s_codes, s_distinct = seasons.seasonal_keys(codes, distinct, "day_of_week", np.r_[t, MONDAY + 3600])
    assert [s_distinct[c] for c in s_codes] == ["s1@Mon", None, "s2@Sun", "s1@Mon"]


def seasonal_stream(weeks: int, seed: int = 0) -> FeatureBatch:
    """One store, an event every 10 minutes: small baskets at night, bigger by day, twice as
    big on Saturdays (log scale, noise sd 0.15)."""
    rng = np.random.default_rng(seed)
    t = MONDAY + np.arange(0, weeks * 7 * 86400, 600, dtype=np.float64)
    hour = seasons.bucket("hour_of_day", t)
    dow = seasons.bucket("day_of_week", t)
    level = np.where((hour >= 8) & (hour < 20), np.log1p(100.0), np.log1p(10.0)) + np.where(dow == 5, np.log(2.0), 0.0)
    x = level + rng.normal(0, 0.15, t.size)
    return FeatureBatch(event_time=t, columns={"log_amount": x}, keys={"store_id": np.full(t.size, "s1", dtype=object)})


def detector(seasonality: tuple[str, ...], **kw) -> ZScoreDetector:
    return ZScoreDetector(
        features=("log_amount",),
        key_sets=("store_id",),
        warmup=10,
        key_set_seasonality={"store_id": seasonality},
        **kw,
    )


def learn_all(det: ZScoreDetector, batch: FeatureBatch, size: int = 500) -> None:
    for start in range(0, batch.n, size):
        part = batch.slice(start, min(batch.n, start + size))
        det.commit(det.score(part, np.ones(part.n, dtype=bool)))


def probe(det: ZScoreDetector, t: float, amount: float) -> tuple[float, dict]:
    one = FeatureBatch(event_time=np.array([t]), columns={"log_amount": np.array([np.log1p(amount)])}, keys={"store_id": np.array(["s1"], dtype=object)})
    step = det.score(one, np.ones(1, dtype=bool))
    return float(step.scores[0]), det.explain(one, step, 0).details


SATURDAY_2PM = MONDAY + 3 * 7 * 86400 + 5 * 86400 + 14 * HOUR + 600
TUESDAY_3AM = MONDAY + 3 * 7 * 86400 + 86400 + 3 * HOUR + 600


def test_seasonal_baseline_knows_saturdays_and_nights():
    history = seasonal_stream(weeks=3)
    flat, seasonal = detector(()), detector(("hour_of_day", "hour_of_week"))
    learn_all(flat, history)
    learn_all(seasonal, history)

    # A normal Saturday-afternoon basket (2 x 100): ordinary for Saturdays 14:00.
    z_flat_sat, _ = probe(flat, SATURDAY_2PM, 200.0)
    z_seasonal_sat, details = probe(seasonal, SATURDAY_2PM, 200.0)
    assert z_seasonal_sat < 2.0
    assert details["baseline"] == "store_id s1 on Saturdays 14:00-15:00 UTC"
    low, high = details["expected_range"]
    assert low < 200.0 < high

    # A noon-sized basket at 3 a.m. on a Tuesday: normal overall, far out for that hour.
    z_flat_night, _ = probe(flat, TUESDAY_3AM, 100.0)
    z_seasonal_night, details = probe(seasonal, TUESDAY_3AM, 100.0)
    assert z_flat_night < 3.0, "without seasons the 3 a.m. basket hides in the daily mix"
    assert z_seasonal_night > 10.0
    assert details["baseline"] == "store_id s1 on Tuesdays 03:00-04:00 UTC"
    assert z_flat_sat > z_seasonal_sat


def test_a_cold_bucket_falls_back_to_the_coarser_baseline():
    # One week of history with Saturdays left out: Saturday's hour-of-week buckets are cold,
    # so Saturday events are scored against the key's hour-of-day baseline.
    history = seasonal_stream(weeks=1)
    keep = seasons.bucket("day_of_week", history.event_time) != 5
    history = FeatureBatch(history.event_time[keep], {"log_amount": history.columns["log_amount"][keep]}, {"store_id": history.keys["store_id"][keep]})
    # Without the rejection guard: this stream starts at night, its first day values are 14 sd
    # from the key's night-only statistics, and with Saturdays left out nothing widens that
    # spread, so the guard would keep every day value of this history out of every table
    # (see test_the_guard_keeps_a_jump_out_until_the_spread_widens).
    det = detector(("hour_of_day", "hour_of_week"), reject_z=float("inf"))
    learn_all(det, history)
    _, details = probe(det, MONDAY + 5 * 86400 + 14 * HOUR, 100.0)
    assert details["baseline"] == "store_id s1 at 14:00-15:00 UTC"


def test_the_guard_keeps_a_jump_out_until_the_spread_widens():
    # What the guard does to the same stream: a rejected value is learned by no table, so the
    # first days (14 sd above the first nights) are rejected one after the other, as a pipeline
    # would reject them one by one. Saturday's nights (4.6 sd up: kept) widen the key's spread,
    # and from Sunday on the days are learned. Recorded as the guard's known cost on a stream
    # whose levels differ by more than reject_z sd: a jump is kept out until the spread allows it.
    history = seasonal_stream(weeks=2)
    det = detector(("hour_of_day", "hour_of_week"))
    rejected = []
    for start in range(0, history.n, 500):
        part = history.slice(start, min(history.n, start + 500))
        step = det.score(part, np.ones(part.n, dtype=bool))
        det.commit(step)
        rejected.append(step.reject)
    rejected = np.concatenate(rejected)
    hour = seasons.bucket("hour_of_day", history.event_time)
    day_of_stream = (history.event_time - MONDAY) // 86400
    daytime = (hour >= 8) & (hour < 20)
    assert rejected[daytime & (day_of_stream < 6)].all()
    assert not rejected[day_of_stream >= 6].any()
    assert not rejected[~daytime].any()


@pytest.mark.parametrize("sizes", [[1], [7, 1, 300]], ids=["ones", "mixed"])
def test_seasonal_batches_equal_one_by_one(sizes):
    batch = seasonal_stream(weeks=1, seed=3).slice(0, 600)
    learn = np.random.default_rng(1).random(batch.n) > 0.1
    whole = detector(("hour_of_day", "day_of_week"))
    step = whole.score(batch, learn)
    whole.commit(step)
    chunked = detector(("hour_of_day", "day_of_week"))
    scores, _rejects = run_chunks(chunked, batch, learn, sizes)
    np.testing.assert_allclose(scores, step.scores, rtol=1e-9, atol=1e-9)
    w, c = (s["key_sets"]["store_id@day_of_week"] for s in (whole.state_dict(), chunked.state_dict()))
    w_by_key = {key: (w["count"][r, 0], w["mean"][r, 0]) for r, key in enumerate(w["keys"])}
    c_by_key = {key: (c["count"][r, 0], c["mean"][r, 0]) for r, key in enumerate(c["keys"])}
    assert w_by_key.keys() == c_by_key.keys() == {"s1@Mon", "s1@Tue", "s1@Wed", "s1@Thu", "s1@Fri"}
    for key, (count, mean) in w_by_key.items():
        assert c_by_key[key][0] == count
        assert c_by_key[key][1] == pytest.approx(mean, rel=1e-9)


def test_seasonal_state_round_trips_and_old_snapshots_load():
    history = seasonal_stream(weeks=1)
    det = detector(("hour_of_day",))
    learn_all(det, history)
    clone = detector(("hour_of_day",))
    clone.load_state_dict(pickle.loads(pickle.dumps(det.state_dict())))
    assert probe(clone, TUESDAY_3AM, 100.0)[0] == probe(det, TUESDAY_3AM, 100.0)[0]
    # A snapshot from before seasonality was configured: the seasonal level starts empty.
    flat = detector(())
    learn_all(flat, history)
    upgraded = detector(("hour_of_day",))
    upgraded.load_state_dict(flat.state_dict())
    assert upgraded.n_keys() == {"store_id": 1, "store_id@hour_of_day": 0}
    assert probe(upgraded, TUESDAY_3AM, 100.0)[0] == probe(flat, TUESDAY_3AM, 100.0)[0]
