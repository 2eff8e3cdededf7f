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


@numba.njit(cache=True, nogil=True, error_model="numpy")
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _std(count, m2, floor):  # pragma: no cover - compiled
    """Sample sd with a floor; NaN below two values (as ``ZScoreDetector._std``)."""
    if count > 1:
        return max(np.sqrt(m2 / max(count - 1.0, 1.0)), floor)
    return np.nan


@numba.njit(cache=True, nogil=True, error_model="numpy")
def key_set_scores(
    x, contrib, has_key, event_time, groups, count0, mean0, m20,
    g_count, g_mean, g_m2, g_z, g_std, floor,
    warmup, seasonal_warmup, reject_after, reject_z, learning_prior,
):  # pragma: no cover - compiled
    """One key set's z-scores, with its seasonal levels, in one walk over the batch.

    ``groups`` (L, n): each event's row, per level (0: the key, 1..: seasonal levels coarse to
    fine), in the stacked prior statistics ``count0/mean0/m20`` (R, F). ``g_*`` (n, F) are the
    global statistics each event sees. Per event and feature the baseline is the finest warm
    level, else the key (once warm), else the learning baseline (global statistics counted as
    ``learning_prior`` events, merged with the key's own first values).

    Returns z, mean, sd (n, F); warm (n,); level (n,) (0 global/learning, 1 key, 2.. seasonal);
    reject (n,) (gross outliers of the key's own statistics); the totals after the batch
    (R, F) x 3; touched (R,) (rows with an event of this key set) and their latest event time.
    """
    n, n_features = x.shape
    n_levels = groups.shape[0]
    count, mean, m2 = count0.copy(), mean0.copy(), m20.copy()
    touched = np.zeros(count0.shape[0], dtype=np.bool_)
    last = np.full(count0.shape[0], -np.inf)
    z = np.full((n, n_features), np.nan)
    base_mean = np.full((n, n_features), np.nan)
    base_std = np.full((n, n_features), np.nan)
    warm = np.zeros(n, dtype=np.bool_)
    level = np.zeros(n, dtype=np.int8)
    reject = np.zeros(n, dtype=np.bool_)
    w = learning_prior
    for i in range(n):
        if not has_key[i]:
            # No key: the learning baseline with no values of its own.
            for f in range(n_features):
                zf, mf, sf = _learning(x[i, f], 0.0, 0.0, 0.0, g_count[i, f], g_mean[i, f], g_m2[i, f], g_z[i, f], g_std[i, f], floor[f], warmup, w)
                z[i, f], base_mean[i, f], base_std[i, f] = zf, mf, sf
            continue
        use_level = 0
        for f in range(n_features):
            xf = x[i, f]
            g = groups[0, i]
            c, mu, q = count[g, f], mean[g, f], m2[g, f]
            sd = _std(c, q, floor[f])
            if c >= reject_after and abs(xf - mu) > reject_z * sd:
                reject[i] = True
            if c >= warmup:
                zf, mf, sf = (xf - mu) / sd, mu, sd
                warm[i] = True
                use_level = max(use_level, 1)
            else:
                zf, mf, sf = _learning(xf, c, mu, q, g_count[i, f], g_mean[i, f], g_m2[i, f], g_z[i, f], g_std[i, f], floor[f], warmup, w)
            for lv in range(1, n_levels):
                gs = groups[lv, i]
                cs = count[gs, f]
                if cs >= seasonal_warmup:
                    ss = _std(cs, m2[gs, f], floor[f])
                    zf = (xf - mean[gs, f]) / ss if cs >= warmup else np.nan
                    mf, sf = mean[gs, f], ss
                    use_level = max(use_level, lv + 1)
            z[i, f], base_mean[i, f], base_std[i, f] = zf, mf, sf
        level[i] = use_level
        # Learn after scoring: the event sees only its predecessors.
        for lv in range(n_levels):
            g = groups[lv, i]
            touched[g] = True
            last[g] = max(last[g], event_time[i])
            for f in range(n_features):
                if contrib[i, f]:
                    c = count[g, f] + 1.0
                    delta = x[i, f] - mean[g, f]
                    mu = mean[g, f] + delta / c
                    m2[g, f] += delta * (x[i, f] - mu)
                    count[g, f], mean[g, f] = c, mu
    return z, base_mean, base_std, warm, level, reject, count, mean, m2, touched, last


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _learning(xf, n_k, k_mean, k_m2, g_count, g_mean, g_m2, g_z, g_std, floor, warmup, w):  # pragma: no cover - compiled
    """(z, mean, sd) for an event whose key is still learning (``n_k`` values so far).

    The global statistics count as ``w`` events, merged with the key's own values: a new
    product that sells at $1,585 is compared with everyone's prices at its first sale, and
    with its own at its fifth, instead of being an outlier of the whole store until its 30th.
    ``w <= 0`` keeps the plain global statistics.
    """
    if w <= 0:
        return g_z, g_mean, g_std
    var_g = g_m2 / max(g_count - 1.0, 1.0) if g_count > 1 else np.nan
    total = n_k + w
    if n_k > 0:
        mean = (n_k * k_mean + w * g_mean) / total
        m2 = k_m2 + var_g * (w - 1.0) + n_k * w / total * (k_mean - g_mean) ** 2
    else:
        mean = g_mean
        m2 = var_g * (w - 1.0)
    sd = np.sqrt(m2 / max(total - 1.0, 1.0))
    sd = sd if np.isnan(sd) else max(sd, floor)
    z = (xf - mean) / sd if g_count >= warmup else np.nan
    return z, mean, sd
