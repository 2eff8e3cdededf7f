"""Compiled walk of the silence timer over one batch (numba).

Every decision of the timer depends on the moment it is taken: the clock, each key's last
event and the counts so far. So the batch is walked event by event, as the definition goes;
compiled, that costs about 20 ns per event in the scoring benchmark, where Python and small
numpy calls per check cost microseconds. tests/unit/detectors/test_silence.py checks it against
an event-by-event simulation written from the documented rules.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

HOUR = 3600.0
DAY = 86400.0
BUCKETS = 48  # hour of day x (weekday, weekend)

# The bound that picks which keys get the exact integral is loosened by far more than the
# rounding of that integral (hour by hour, ~1e-16 per hour): a key the bound leaves out
# cannot have crossed, so the alerts are those of checking every key exactly.
BOUND_SLACK = 1.0 + 1e-9


@numba.njit(cache=True, nogil=True)
def hour_bucket(t):  # pragma: no cover - compiled
    day = math.floor(t / DAY)
    weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday: Monday = 0
    return int((t % DAY) // HOUR) + (24 if weekend else 0)


@numba.njit(cache=True, nogil=True)
def stream_hours(hours):  # pragma: no cover - compiled
    """``hours.sum()`` in numpy's order (8 pairwise lanes), so ``< min_hours`` decides alike."""
    r0, r1, r2, r3 = hours[0], hours[1], hours[2], hours[3]
    r4, r5, r6, r7 = hours[4], hours[5], hours[6], hours[7]
    for i in range(8, BUCKETS, 8):
        r0 += hours[i]
        r1 += hours[i + 1]
        r2 += hours[i + 2]
        r3 += hours[i + 3]
        r4 += hours[i + 4]
        r5 += hours[i + 5]
        r6 += hours[i + 6]
        r7 += hours[i + 7]
    return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))


@numba.njit(cache=True, nogil=True)
def key_rates(counts, hours, out):  # pragma: no cover - compiled
    """Events per hour of one key (``counts`` (48,)) into ``out``; returns the highest.

    A bucket the stream has not covered for an hour yet (the first weekend) borrows the same
    hour of the other day type."""
    for b in range(BUCKETS):
        out[b] = counts[b] / max(hours[b], 1.0) if hours[b] >= 1.0 else 0.0
    highest = 0.0
    for b in range(BUCKETS):
        if hours[b] < 1.0:
            other = (b + 24) % BUCKETS
            out[b] = out[other] if hours[other] >= 1.0 else 0.0  # out[other] is its own rate
        highest = max(highest, out[b])
    return highest


@numba.njit(cache=True, nogil=True)
def peak_rates(counts, hours, n_keys, peak):  # pragma: no cover - compiled
    """The highest rate of each of the first ``n_keys`` keys into ``peak``."""
    rates = np.empty(BUCKETS)
    for k in range(n_keys):
        peak[k] = key_rates(counts[k], hours, rates)


@numba.njit(cache=True, nogil=True)
def cover(hours, start, end):  # pragma: no cover - compiled
    """Add the stream time [start, end) to the hours of its buckets; True if one became covered."""
    newly_covered = False
    t = start
    while t < end:
        edge = min((math.floor(t / HOUR) + 1) * HOUR, end)
        b = hour_bucket(t)
        was_covered = hours[b] >= 1.0
        hours[b] += (edge - t) / HOUR
        if not was_covered and hours[b] >= 1.0:
            newly_covered = True
        t = edge
    return newly_covered


@numba.njit(cache=True, nogil=True)
def crossing(rates, since, now, expected_events):  # pragma: no cover - compiled
    """The time in (since, now] at which the expected count since ``since`` reaches
    ``expected_events`` (the integral of the hourly rates); NaN if it does not."""
    expected = 0.0
    t = since
    while t < now:
        edge = min((math.floor(t / HOUR) + 1) * HOUR, now)
        rate = rates[hour_bucket(t)]
        step = rate * (edge - t) / HOUR
        if expected + step >= expected_events:
            per_second = rate / HOUR
            return t + (expected_events - expected) / per_second
        expected += step
        t = edge
    return math.nan


@numba.njit(cache=True, nogil=True)
def _check_key(
    k,
    since,
    now,
    counts,
    hours,
    rates,
    peak,
    alerted,
    expected_events,
    check,
    alert_slot,
    alert_time,
    alert_since,
    alert_check,
    n_alerts,
):  # pragma: no cover - compiled
    """The exact check of key ``k``, silent since ``since``: makes its rate bound exact and, if
    the silence became unlikely before ``now``, records the alert. Returns the alert count."""
    peak[k] = key_rates(counts[k], hours, rates)
    when = crossing(rates, since, now, expected_events)
    if math.isnan(when):
        return n_alerts
    alerted[k] = True
    alert_slot[n_alerts], alert_time[n_alerts], alert_since[n_alerts] = k, when, since
    alert_check[n_alerts] = check
    return n_alerts + 1


@numba.njit(cache=True, nogil=True)
def walk(
    times,
    slots,
    counts,
    last,
    alerted,
    peak,
    hours,
    clock,
    next_check,
    n_keys,
    expected_events,
    min_events,
    min_hours,
    check_every_s,
):  # pragma: no cover - compiled
    """Learn the events (``times`` and their keys' ``slots``) in order, updating
    ``counts, last, alerted, peak, hours`` in place.

    ``peak`` bounds each key's rates: raised when an event raises one, exact after each exact
    check of the key, recomputed when a bucket becomes covered (rates only fall as hours grow
    otherwise). Returns ``(slot, time, since, check)`` per alert, in the order raised, with
    the new ``clock`` and ``next_check``; the alerts of one clock step share ``check`` (the
    caller orders them by time and key name), every other alert has its own.
    """
    n = times.shape[0]
    # An alert opens an episode of its key and only an event of the key closes one: a batch
    # raises at most one alert per key and event.
    capacity = n + n_keys
    alert_slot = np.empty(capacity, np.int64)
    alert_time = np.empty(capacity)
    alert_since = np.empty(capacity)
    alert_check = np.empty(capacity, np.int64)
    n_alerts = 0
    check = 0
    limit = expected_events * HOUR
    rates = np.empty(BUCKETS)
    covered_hours = stream_hours(hours)
    for j in range(n):
        t, s = times[j], slots[j]
        if t >= next_check:  # the clock moves: every key is looked at
            if clock > -math.inf and cover(hours, clock, t):
                peak_rates(counts, hours, n_keys, peak)  # a bucket stops borrowing
            clock = t
            next_check = (math.floor(t / check_every_s) + 1) * check_every_s
            covered_hours = stream_hours(hours)
            if covered_hours >= min_hours:
                for k in range(n_keys):
                    since = last[k]
                    if alerted[k] or not since < t or since == -math.inf:
                        continue
                    if (t - since) * peak[k] * BOUND_SLACK < limit or counts[k].sum() < min_events:
                        continue
                    n_alerts = _check_key(
                        k, since, t, counts, hours, rates, peak, alerted, expected_events, check, alert_slot, alert_time, alert_since, alert_check, n_alerts
                    )
            check += 1
        prev = last[s]
        # A silence that ended before the timer looked at it is still reported.
        if prev > -math.inf and not alerted[s] and (t - prev) * peak[s] * BOUND_SLACK >= limit and covered_hours >= min_hours and counts[s].sum() >= min_events:
            raised = _check_key(
                s, prev, t, counts, hours, rates, peak, alerted, expected_events, check, alert_slot, alert_time, alert_since, alert_check, n_alerts
            )
            if raised > n_alerts:
                n_alerts = raised
                check += 1
        if t >= prev:
            last[s] = t
            alerted[s] = False
        b = hour_bucket(t)
        counts[s, b] += 1.0
        if hours[b] >= 1.0:  # an uncovered bucket's count is no rate yet (not even borrowed)
            peak[s] = max(peak[s], counts[s, b] / hours[b])
    return (
        alert_slot[:n_alerts],
        alert_time[:n_alerts],
        alert_since[:n_alerts],
        alert_check[:n_alerts],
        clock,
        next_check,
    )


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernels at construction rather than inside the first batch: with
    no compiled cache yet (a fresh install), the walk alone takes seconds to compile."""
    counts = np.zeros((1, BUCKETS))
    row = np.zeros(1)
    walk(
        np.zeros(1),
        np.zeros(1, dtype=np.int64),
        counts,
        row.copy(),
        np.zeros(1, dtype=np.bool_),
        row.copy(),
        np.zeros(BUCKETS),
        -math.inf,
        -math.inf,
        1,
        1.0,
        1.0,
        1.0,
        60.0,
    )
    peak_rates(counts, np.zeros(BUCKETS), 1, row.copy())
