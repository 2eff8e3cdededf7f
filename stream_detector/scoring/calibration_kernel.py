"""Compiled kernels of a calibrator: the survival function of its fit (and its log), the sliding sorted window (numba).

``TailFit.survival`` runs several times per batch and detector (every fixed-point round, every
refresh segment); in numpy it is a dozen whole-array calls, whose fixed cost dominated small
batches. One compiled pass computes the same expression per score.

``replace_sorted`` moves a refit's sorted window forward by the scores that left and entered
it, instead of sorting the whole window at every refresh.
"""

from __future__ import annotations

import functools

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def survival(scores, reference, threshold, tail_fraction, shape, scale, tie_tolerance, min_probability):  # pragma: no cover - compiled
    """P(normal raw score >= s) per score, and its natural log: the empirical survival of the
    sorted ``reference`` (ties within ``tie_tolerance``, relative), and above ``threshold`` the
    smaller of that and the generalised Pareto tail (``shape``, ``scale``) times
    ``tail_fraction``. A NaN score carries no evidence: 1.

    The probability is floored at ``min_probability``; its log is not. Where the probability is
    above the floor the log is the log of that same number, so the two order scores alike; below
    it the log is computed from the tail in log space, no lower than ``log(min_probability)``
    and finite (at least ``-DBL_MAX``, for an infinite score). Past the floor, a bounded tail
    (``shape < 0``) goes on as an exponential of the fit's ``scale`` instead of reaching
    probability 0 at its end point (``_log_gpd_tail``).
    """
    m = reference.shape[0]
    n = scores.shape[0]
    out = np.empty(n)
    log_out = np.empty(n)
    log_floor = np.log(min_probability)
    lowest = -np.finfo(np.float64).max
    for i in range(n):
        s = scores[i]
        if np.isnan(s):
            out[i] = 1.0
            log_out[i] = 0.0
            continue
        tolerant = s - tie_tolerance * max(abs(s), 1.0) if np.isfinite(s) else s
        body = (m - np.searchsorted(reference, tolerant) + 1.0) / (m + 1.0)
        p = body
        excess = 0.0
        if s > threshold:
            excess = s - threshold
            # shape ~ 0 is the exponential limit of the generalised Pareto tail.
            tail = np.exp(-excess / scale) if abs(shape) < 1e-9 else max(1.0 + shape * excess / scale, 0.0) ** (-1.0 / shape)
            p = min(tail_fraction * tail, body)
        clipped = min(max(p, min_probability), 1.0)
        out[i] = clipped
        if p >= min_probability:
            log_out[i] = np.log(clipped)
            continue
        # Below the floor: only the tail gets here (the body is at least 1 / (m + 1)).
        log_tail = _log_gpd_tail(excess, tail_fraction, shape, scale, log_floor)
        log_out[i] = max(min(np.log(tail_fraction) + log_tail, np.log(body), log_floor), lowest)
    return out, log_out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _log_gpd_tail(excess, tail_fraction, shape, scale, log_floor):  # pragma: no cover - compiled
    """log of the generalised Pareto survival at ``excess``, for a probability below the floor
    (``tail_fraction`` times it below ``exp(log_floor)``).

    A bounded tail (``shape < 0``) says that nothing lies past its end point, yet the alerts
    that need ranking are mostly there. From the point where it crosses the floor (``knot``) it
    goes on as the unbounded tail nearest to it, the exponential (shape 0) of the same
    ``scale``: continuous, decreasing, and a score ``scale`` further is e times less likely.
    """
    if abs(shape) < 1e-9:
        return -excess / scale
    if shape > 0.0:
        return -np.log1p(shape * excess / scale) / shape
    # log S(x) = log(u) / -shape, with u = 1 + shape * x / scale falling to 0 at the end point.
    log_knot = log_floor - np.log(tail_fraction)
    u_knot = np.exp(-shape * log_knot)
    knot = scale * (1.0 - u_knot) / -shape
    if excess <= knot:
        return np.log(max(1.0 + shape * excess / scale, u_knot)) / -shape
    return log_knot - (excess - knot) / scale


@numba.njit(cache=True, nogil=True)
def replace_sorted(reference, removed, added):  # pragma: no cover - compiled
    """The sorted ``reference`` with the sorted ``removed`` taken out and the sorted ``added``
    merged in, in one linear pass: the next window of a calibrator without sorting it anew.

    Returns ``(ok, out)``; ``ok`` is False (and ``out`` unusable) when a removed value is not
    in ``reference`` or a value is NaN, and the caller sorts the window instead.
    """
    m, r, a = reference.shape[0], removed.shape[0], added.shape[0]
    n = m - r + a
    out = np.empty(max(n, 0))
    if n < 0:
        return False, out
    for k in range(a):
        if np.isnan(added[k]):
            return False, out
    i = j = k = o = 0
    while i < m:
        value = reference[i]
        i += 1
        if np.isnan(value):
            return False, out
        if j < r:
            if removed[j] == value:
                j += 1
                continue
            if not removed[j] > value:  # smaller than everything left, or NaN: not present
                return False, out
        while k < a and added[k] < value:
            if o >= n:
                return False, out
            out[o] = added[k]
            o += 1
            k += 1
        if o >= n:
            return False, out
        out[o] = value
        o += 1
    if j != r:
        return False, out
    while k < a:
        out[o] = added[k]
        o += 1
        k += 1
    return True, out


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernels at construction rather than inside the first batch."""
    survival(np.zeros(1), np.zeros(1), 0.0, 0.0, 0.0, 1.0, 1e-9, 1e-12)
    replace_sorted(np.zeros(1), np.zeros(1), np.zeros(1))
