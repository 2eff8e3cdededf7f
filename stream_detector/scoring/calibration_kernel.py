"""Compiled kernels of a calibrator: the survival function of its fit, the sliding sorted window (numba).

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
    """P(normal raw score >= s) per score: the empirical survival of the sorted ``reference``
    (ties within ``tie_tolerance``, relative), and above ``threshold`` the smaller of that and
    the generalised Pareto tail (``shape``, ``scale``) times ``tail_fraction``. A NaN score
    carries no evidence: 1."""
    m = reference.shape[0]
    out = np.empty(scores.shape[0])
    for i in range(scores.shape[0]):
        s = scores[i]
        if np.isnan(s):
            out[i] = 1.0
            continue
        tolerant = s - tie_tolerance * max(abs(s), 1.0) if np.isfinite(s) else s
        body = (m - np.searchsorted(reference, tolerant) + 1.0) / (m + 1.0)
        p = body
        if s > threshold:
            excess = s - threshold
            # shape ~ 0 is the exponential limit of the generalised Pareto tail.
            tail = np.exp(-excess / scale) if abs(shape) < 1e-9 else max(1.0 + shape * excess / scale, 0.0) ** (-1.0 / shape)
            p = min(tail_fraction * tail, body)
        out[i] = min(max(p, min_probability), 1.0)
    return out


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
