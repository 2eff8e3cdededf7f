"""Seasonal buckets of event time: hour of day, day of week, hour of week (UTC).

A seasonal baseline keeps one set of statistics per key *and* bucket, so a Saturday afternoon
is compared with earlier Saturday afternoons, not with a Tuesday night.
"""

from __future__ import annotations

import functools

import numpy as np

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# 1970-01-01 (epoch day 0) was a Thursday: shift so that 0 = Monday.
_EPOCH_WEEKDAY = 3

PERIODS: dict[str, int] = {"hour_of_day": 24, "day_of_week": 7, "hour_of_week": 168}


def bucket(period: str, event_time: np.ndarray) -> np.ndarray:
    """Bucket index (int64) of every event time (epoch seconds, UTC) for ``period``."""
    hours = np.floor_divide(event_time, 3600.0).astype(np.int64)
    hour_of_day = hours % 24
    day_of_week = (hours // 24 + _EPOCH_WEEKDAY) % 7
    if period == "hour_of_day":
        return hour_of_day
    if period == "day_of_week":
        return day_of_week
    if period == "hour_of_week":
        return day_of_week * 24 + hour_of_day
    raise ValueError(f"unknown seasonal period {period!r}; known: {sorted(PERIODS)}")


@functools.cache
def labels(period: str) -> tuple[str, ...]:
    """Suffix appended to a key for each bucket, indexed by bucket."""
    if period == "hour_of_day":
        names = [f"@{h:02d}h" for h in range(24)]
    elif period == "day_of_week":
        names = [f"@{d}" for d in _DAY_NAMES]
    elif period == "hour_of_week":
        names = [f"@{d}{h:02d}h" for d in _DAY_NAMES for h in range(24)]
    else:
        raise ValueError(f"unknown seasonal period {period!r}; known: {sorted(PERIODS)}")
    return tuple(names)


def describe(period: str, b: int) -> str:
    """A bucket as a person reads it: '14:00-15:00 UTC', 'Saturdays', 'Saturdays 14:00-15:00 UTC'."""
    if period == "hour_of_day":
        return f"{b:02d}:00-{(b + 1) % 24:02d}:00 UTC"
    day = ("Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays")
    if period == "day_of_week":
        return day[b]
    d, h = divmod(b, 24)
    return f"{day[d]} {h:02d}:00-{(h + 1) % 24:02d}:00 UTC"


def seasonal_keys(codes: np.ndarray, keys: list, period: str, event_time: np.ndarray) -> tuple[np.ndarray, list]:
    """The ``key@bucket`` keys of events, factorized: each event's code and the distinct keys
    (None where the key is None), from the events' key codes into ``keys``. The strings are
    built once per distinct pair, not once per event."""
    size = PERIODS[period]
    pairs, inverse = np.unique(codes * size + bucket(period, event_time), return_inverse=True)
    names = labels(period)
    key_codes, buckets = divmod(pairs, size)
    distinct = [None if keys[c] is None else keys[c] + names[b] for c, b in zip(key_codes.tolist(), buckets.tolist(), strict=True)]
    return inverse.astype(np.int64, copy=False), distinct
