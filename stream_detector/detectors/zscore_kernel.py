"""Compiled inner loops of the z-score detector (numba).

The z-score of event ``i`` uses the statistics of the events of its key before ``i``. Walking
the batch in order with Welford's update is that definition itself, and compiled it costs a
few nanoseconds per event and feature, where numpy needs a sort, three grouped cumulative sums
and a merge per table (dozens of calls, each with its own overhead, on arrays of a few
thousand rows).
"""

from __future__ import annotations

import functools

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def sequential_stats(group, x, contrib, count0, mean0, m20):  # pragma: no cover - compiled
    """Statistics each event sees, and each group's totals after the batch.

    ``group`` (n,) is each event's row in the prior statistics ``count0/mean0/m20`` (G, F);
    ``contrib`` (n, F) says which values are learned. Returns ``(seen_count, seen_mean,
    seen_m2)`` per event and feature (before the event itself), then the totals (G, F).
    """
    n, n_features = x.shape
    count, mean, m2 = count0.copy(), mean0.copy(), m20.copy()
    seen_count = np.empty((n, n_features))
    seen_mean = np.empty((n, n_features))
    seen_m2 = np.empty((n, n_features))
    for i in range(n):
        g = group[i]
        for f in range(n_features):
            c, mu, q = count[g, f], mean[g, f], m2[g, f]
            seen_count[i, f], seen_mean[i, f], seen_m2[i, f] = c, mu, q
            if contrib[i, f]:
                c += 1.0
                delta = x[i, f] - mu
                mu += delta / c
                count[g, f], mean[g, f], m2[g, f] = c, mu, q + delta * (x[i, f] - mu)
    return seen_count, seen_mean, seen_m2, count, mean, m2


def factorize(keys: list) -> tuple[np.ndarray, list]:
    """Codes in order of first appearance, and the distinct values (``None`` included).

    A dict walk: for a few thousand short strings it beats sorting a unicode array, and new
    keys get slots in arrival order, as one-by-one processing would give them.
    """
    distinct = list(dict.fromkeys(keys))  # C-level passes: no Python bytecode per event
    index = {key: i for i, key in enumerate(distinct)}
    return np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=len(keys)), distinct


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernel now, at construction, not inside the first batch: loading
    numba's compiled cache costs about half a second once per process, which would otherwise
    land on the latency of the first events."""
    one = np.zeros((1, 1))
    sequential_stats(np.zeros(1, dtype=np.int64), one, np.ones((1, 1), dtype=bool), one, one, one)
