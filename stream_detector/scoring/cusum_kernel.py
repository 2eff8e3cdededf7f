"""A one-sided CUSUM per key over a batch, in one compiled pass (numba).

``LevelShiftTracker`` watches some key sets for gradual shifts (a store whose baskets grow 3x
moves its quantities about 1.4 sd, below the run rule's ``min_z``). Per key the sum follows
``S = max(0, S + min(z, cap) - slack)``: each event adds at most ``cap - slack``, so a short
anomaly cannot reach the threshold, and a normal event (z near 0) takes ``slack`` off.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def cusum(codes, z, baseline, value, sums, lengths, baselines, values, cap, slack):  # pragma: no cover - compiled
    """Walk the events in order; ``codes`` index each event's key in ``sums``, ``lengths``,
    ``baselines`` and ``values`` (the sum, the events since it last left 0, and their summed
    baselines and values), which are updated in place. An event with a NaN ``z`` (not scored,
    or not counted) leaves its key as it was.

    Returns per event the sum, the length, the summed baselines and values after it, and where
    the excursion began: the index of its first event in the batch, or -1 when it began before.
    """
    n = codes.shape[0]
    s_out = np.zeros(n)
    len_out = np.zeros(n, dtype=np.int64)
    base_out = np.zeros(n)
    value_out = np.zeros(n)
    start = np.full(sums.shape[0], -1, dtype=np.int64)
    start_out = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        g = codes[i]
        zi = z[i]
        if g >= 0 and zi == zi:
            s = sums[g] + min(zi, cap) - slack
            if s <= 0.0:
                sums[g] = 0.0
                lengths[g] = 0
                baselines[g] = 0.0
                values[g] = 0.0
            else:
                if lengths[g] == 0:
                    start[g] = i
                sums[g] = s
                lengths[g] += 1
                baselines[g] += baseline[i]
                values[g] += value[i]
        if g >= 0:
            s_out[i] = sums[g]
            len_out[i] = lengths[g]
            base_out[i] = baselines[g]
            value_out[i] = values[g]
            start_out[i] = start[g]
    return s_out, len_out, base_out, value_out, start_out
