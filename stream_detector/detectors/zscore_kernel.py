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
def global_scores(x, contrib, count0, mean0, m20, floor, warmup, reject_after, reject_z):  # pragma: no cover - compiled
    """The global statistics each event sees, its z-score against them, and gross outliers.

    ``count0/mean0/m20`` (F,) are the committed statistics, ``contrib`` (n, F) says which
    values are learned. Returns ``(count, mean, m2, z, sd)`` per event and feature (before the
    event itself), ``reject`` (n,) (beyond ``reject_z`` sd once ``reject_after`` values are in)
    and the totals after the batch, (F,) x 3.
    """
    n, n_features = x.shape
    count, mean, m2 = count0.copy(), mean0.copy(), m20.copy()
    seen_count = np.empty((n, n_features))
    seen_mean = np.empty((n, n_features))
    seen_m2 = np.empty((n, n_features))
    z = np.empty((n, n_features))
    sd = np.empty((n, n_features))
    reject = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        for f in range(n_features):
            c, mu, q = count[f], mean[f], m2[f]
            s = _std(c, q, floor[f])
            seen_count[i, f], seen_mean[i, f], seen_m2[i, f], sd[i, f] = c, mu, q, s
            z[i, f] = (x[i, f] - mu) / s if c >= warmup else np.nan
            if c >= reject_after and abs(x[i, f] - mu) > reject_z * s:
                reject[i] = True
        # A rejected event is not learned, here already: the next events see statistics
        # without it (see ZScoreDetector.score).
        if reject[i]:
            continue
        for f in range(n_features):
            c, mu, q = count[f], mean[f], m2[f]
            if contrib[i, f]:
                c += 1.0
                delta = x[i, f] - mu
                mu += delta / c
                count[f], mean[f], m2[f] = c, mu, q + delta * (x[i, f] - mu)
    return seen_count, seen_mean, seen_m2, z, sd, reject, count, mean, m2


@numba.njit(cache=True, nogil=True, error_model="numpy")
def max_abs(z):  # pragma: no cover - compiled
    """Per event, the largest |z| over key sets and features; 0 where every z is NaN."""
    n = z.shape[0]
    out = np.zeros(n)
    flat = z.reshape(n, -1)
    for i in range(n):
        for j in range(flat.shape[1]):
            v = abs(flat[i, j])
            if v > out[i]:  # NaN compares false
                out[i] = v
    return out


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernels now, at construction, not inside the first batch: loading
    numba's compiled cache costs about half a second once per process, which would otherwise
    land on the latency of the first events."""
    one = np.zeros((1, 1))
    yes = np.ones((1, 1), dtype=np.bool_)
    row = np.zeros(1)
    g_count, g_mean, g_m2, g_z, g_sd, *_ = global_scores(one, yes, row, row, row, row, 1.0, 1.0, 1.0)
    cube = np.zeros((1, 1, 1))
    key_set_scores(
        one,
        yes,
        np.zeros(1, dtype=np.int64),
        np.ones(1, dtype=np.bool_),
        row,
        np.zeros((1, 1), dtype=np.int64),
        one,
        one,
        one,
        g_count,
        g_mean,
        g_m2,
        g_z,
        g_sd,
        row,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        0,
        cube,
        cube.copy(),
        cube.copy(),
        np.zeros((1, 1), dtype=np.bool_),
        np.zeros((1, 1), dtype=np.int8),
        np.zeros(1, dtype=np.bool_),
        np.zeros((1, 1), dtype=np.bool_),
        3.0,
    )
    max_abs(cube)


def factorize(keys: list) -> tuple[np.ndarray, list]:
    """Codes in order of first appearance, and the distinct values (``None`` included).

    A dict walk: for a few thousand short strings it beats sorting a unicode array, and new
    keys get slots in arrival order, as one-by-one processing would give them.
    """
    distinct = list(dict.fromkeys(keys))  # C-level passes: no Python bytecode per event
    index = {key: i for i, key in enumerate(distinct)}
    return np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=len(keys)), distinct


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _std(count, m2, floor):  # pragma: no cover - compiled
    """Sample sd with a floor; NaN below two values (as ``ZScoreDetector._std``)."""
    if count > 1:
        return max(np.sqrt(m2 / max(count - 1.0, 1.0)), floor)
    return np.nan


@numba.njit(cache=True, nogil=True, error_model="numpy")
def key_set_scores(
    x,
    contrib,
    features,
    has_key,
    event_time,
    groups,
    count0,
    mean0,
    m20,
    g_count,
    g_mean,
    g_m2,
    g_z,
    g_std,
    floor,
    warmup,
    seasonal_warmup,
    reject_after,
    reject_z,
    learning_prior,
    k,
    z,
    base_mean,
    base_std,
    warm,
    level,
    reject,
    adapting,
    clip_z,
):  # pragma: no cover - compiled
    """Key set ``k``'s z-scores, with its seasonal levels, in one walk over the batch.

    ``features`` are the columns of ``x`` (n, F) the key set scores; its tables hold those
    alone, in that order. ``groups`` (L, n): each event's row, per level (0: the key, 1..:
    seasonal levels coarse to fine), in the stacked prior statistics ``count0/mean0/m20``
    (R, len(features)). ``g_*`` (n, F) are the global statistics each event sees. Per event and
    feature the baseline is the finest warm level, else the key (once warm), else the learning
    baseline (``_learning``).

    Writes ``z, base_mean, base_std`` (n, K, F) at ``[:, k, features]``, ``warm`` and
    ``level`` (n, K) at ``[:, k]`` (level 0 global/learning, 1 key, 2.. seasonal) and sets
    ``reject`` (n,) for gross outliers of the key's own statistics. Where ``adapting`` (n, F)
    is set (the event's key adapts to a level shift of that feature) the value is learned
    whether ``contrib`` and ``reject`` let it or not, held within ``clip_z`` sd of the row's
    mean. Returns the totals after
    the batch (R, len(features)) x 3, ``touched`` (R,) (rows with an event of this key set)
    and their latest event time.
    """
    n = x.shape[0]
    n_levels = groups.shape[0]
    count, mean, m2 = count0.copy(), mean0.copy(), m20.copy()
    touched = np.zeros(count0.shape[0], dtype=np.bool_)
    last = np.full(count0.shape[0], -np.inf)
    w = learning_prior
    for i in range(n):
        if not has_key[i]:
            # No key: the learning baseline with no values of its own.
            for j in range(features.shape[0]):
                f = features[j]
                zf, mf, sf = _learning(x[i, f], 0.0, 0.0, 0.0, g_count[i, f], g_mean[i, f], g_m2[i, f], g_z[i, f], g_std[i, f], floor[f], warmup, w)
                z[i, k, f], base_mean[i, k, f], base_std[i, k, f] = zf, mf, sf
            continue
        use_level = 0
        key_warm = False
        for j in range(features.shape[0]):
            f = features[j]
            xf = x[i, f]
            g = groups[0, i]
            c, mu, q = count[g, j], mean[g, j], m2[g, j]
            sd = _std(c, q, floor[f])
            if c >= reject_after and abs(xf - mu) > reject_z * sd:
                reject[i] = True
            if c >= warmup:
                zf, mf, sf = (xf - mu) / sd, mu, sd
                key_warm = True
                use_level = max(use_level, 1)
            else:
                zf, mf, sf = _learning(xf, c, mu, q, g_count[i, f], g_mean[i, f], g_m2[i, f], g_z[i, f], g_std[i, f], floor[f], warmup, w)
            for lv in range(1, n_levels):
                gs = groups[lv, i]
                cs = count[gs, j]
                if cs >= seasonal_warmup:
                    ss = _std(cs, m2[gs, j], floor[f])
                    zf = (xf - mean[gs, j]) / ss if cs >= warmup else np.nan
                    mf, sf = mean[gs, j], ss
                    use_level = max(use_level, lv + 1)
            z[i, k, f], base_mean[i, k, f], base_std[i, k, f] = zf, mf, sf
        warm[i, k] = key_warm  # warm: the key's own statistics (a seasonal level implies them)
        level[i, k] = use_level
        # Learn after scoring: the event sees only its predecessors. Not if it is rejected, by
        # this key set or an earlier one (or the global statistics).
        for lv in range(n_levels):
            g = groups[lv, i]
            touched[g] = True
            last[g] = max(last[g], event_time[i])
            for j in range(features.shape[0]):
                f = features[j]
                xf = x[i, f]
                if reject[i] and not adapting[i, f]:
                    continue
                if adapting[i, f]:
                    # Winsorised instead of left out when flagged or rejected (a new store's
                    # quantities at 30x are gross outliers of everyone's): a run of 8 understates
                    # the new level's spread, and values outside it would never widen it.
                    if np.isnan(xf):
                        continue
                    if count[g, j] > 1:
                        sd = _std(count[g, j], m2[g, j], floor[f])
                        xf = min(max(xf, mean[g, j] - clip_z * sd), mean[g, j] + clip_z * sd)
                elif not contrib[i, f]:
                    continue
                c = count[g, j] + 1.0
                delta = xf - mean[g, j]
                mu = mean[g, j] + delta / c
                m2[g, j] += delta * (xf - mu)
                count[g, j], mean[g, j] = c, mu
    return count, mean, m2, touched, last


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
