"""Compiled survival function of a calibrator's fit (numba).

``TailFit.survival`` runs several times per batch and detector (every fixed-point round, every
refresh segment); in numpy it is a dozen whole-array calls, whose fixed cost dominated small
batches. One compiled pass computes the same expression per score.
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
            if abs(shape) < 1e-9:
                tail = np.exp(-excess / scale)
            else:
                tail = max(1.0 + shape * excess / scale, 0.0) ** (-1.0 / shape)
            p = min(tail_fraction * tail, body)
        out[i] = min(max(p, min_probability), 1.0)
    return out


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernel at construction rather than inside the first batch."""
    survival(np.zeros(1), np.zeros(1), 0.0, 0.0, 0.0, 1.0, 1e-9, 1e-12)
