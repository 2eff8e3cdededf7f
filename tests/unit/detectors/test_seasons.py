"""Seasonal buckets of event time (UTC): which bucket an event falls in, its key suffix, how it
reads. The seasonal z-score baselines built on them are tested in ``test_zscore.py``."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.detectors import seasons
from stream_detector.detectors.zscore_kernel import factorize

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


def test_every_bucket_has_a_label_and_a_description():
    assert seasons.PERIODS == {"hour_of_day": 24, "day_of_week": 7, "hour_of_week": 168}
    for period, size in seasons.PERIODS.items():
        assert len(seasons.labels(period)) == size == len(set(seasons.labels(period)))
    assert seasons.labels("hour_of_day")[7] == "@07h"
    assert seasons.labels("day_of_week")[6] == "@Sun"
    assert seasons.labels("hour_of_week")[5 * 24 + 14] == "@Sat14h"
    assert seasons.describe("hour_of_day", 23) == "23:00-00:00 UTC"
    assert seasons.describe("day_of_week", 0) == "Mondays"
    assert seasons.describe("hour_of_week", 0) == "Mondays 00:00-01:00 UTC"
    assert seasons.describe("hour_of_week", 167) == "Sundays 23:00-00:00 UTC"


def test_a_whole_week_hour_by_hour_walks_every_bucket_once():
    t = MONDAY + 7 * 86400 + HOUR * np.arange(168) + 1800.0  # the next week, mid-hour
    assert seasons.bucket("hour_of_week", t).tolist() == list(range(168))
    assert seasons.bucket("hour_of_day", t).tolist() == list(range(24)) * 7
    assert seasons.bucket("day_of_week", t).tolist() == [d for d in range(7) for _ in range(24)]
    assert seasons.bucket("day_of_week", np.array([0.0])).tolist() == [3]  # 1970-01-01 was a Thursday


def test_an_unknown_period_is_refused():
    with pytest.raises(ValueError, match="minute_of_hour"):
        seasons.bucket("minute_of_hour", np.array([MONDAY]))
    with pytest.raises(ValueError, match="known"):
        seasons.labels("minute_of_hour")
