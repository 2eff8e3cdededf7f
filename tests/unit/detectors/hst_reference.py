"""River's HalfSpaceTrees as the specification of the HST engine, the scaler and the detector.

``river.anomaly.HalfSpaceTrees`` and ``MinMaxScaler() | HalfSpaceTrees()`` fed one event at a
time (``score_one``, then ``learn_one`` unless the event is masked out) must give the scores our
batched code gives, for any way of cutting the stream into batches. Shared by
``test_hst_engine.py``, ``test_minmax.py`` and ``test_hst.py``: the data, the learn masks, the
batch schedules and River's own scores.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from river import anomaly, compose, preprocessing

from stream_detector.detectors.hst_engine import HSTEngine

# Deliberately not sorted: River builds its trees over sorted(x), we index columns.
NAMES = ("zeta", "alpha", "mid", "beta")
N_EVENTS = 1500
TOL = 1e-9

# (n_trees, height, window_size, limits): River's defaults, tiny windows (a pivot every few
# events, or after every learned event), a deeper forest, and explicit limits.
PARAMS = [
    (10, 8, 250, None),
    (5, 4, 3, None),
    (3, 2, 1, None),
    (25, 10, 64, None),
    (7, 6, 40, {"zeta": (-1.0, 3.0), "beta": (0.2, 0.9)}),
]
PARAM_IDS = ["defaults", "window3", "window1", "deep", "limits"]
SEEDS = [0, 7, 42]
MASKS = ["all", "masked"]

# How the stream is cut into batches. "ones" feeds the first 500 events one at a time (past the
# first window and several pivots for every parameter set) and the rest in one batch, which
# keeps the suite fast; "mixed" cycles through uneven sizes.
SCHEDULES = {
    "ones": [1] * 500 + [N_EVENTS],
    "sevens": [7],
    "hundreds": [100],
    "all": [N_EVENTS],
    "mixed": [1, 3, 250, 2, 64, 1, 13, 100, 7],
}


def _river_cases():
    """Every parameter set x seed x learn mask x schedule, except that the slow "ones"
    schedule runs for the first seed only."""
    for p, params_id in enumerate(PARAM_IDS):
        for seed in SEEDS:
            for schedule in SCHEDULES:
                if schedule == "ones" and seed != SEEDS[0]:
                    continue
                for mask in MASKS:
                    case_id = f"{params_id}-{seed}-{schedule}-{mask}"
                    yield pytest.param(p, seed, schedule, mask, id=case_id)


RIVER_CASES = list(_river_cases())


@functools.cache
def data_matrix(kind: str) -> np.ndarray:
    """Mostly inliers with a few far-out points; 'raw' is unscaled for the scaler tests."""
    rng = np.random.default_rng(123)
    X = rng.beta(2.0, 5.0, size=(N_EVENTS, len(NAMES)))
    outliers = rng.random(N_EVENTS) < 0.02
    X[outliers] = rng.uniform(-0.5, 1.5, size=(outliers.sum(), len(NAMES)))
    if kind == "raw":
        X = X * np.array([10.0, 0.01, 1000.0, 3.0]) + np.array([5.0, -2.0, 0.0, 100.0])
    return X


@functools.cache
def learn_mask(kind: str) -> np.ndarray:
    if kind == "all":
        return np.ones(N_EVENTS, dtype=bool)
    return np.random.default_rng(5).random(N_EVENTS) < 0.7


def river_hst(params, seed):
    n_trees, height, window_size, limits = params
    return anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, limits=limits, seed=seed)


def river_scores(model, X: np.ndarray, learn: np.ndarray) -> np.ndarray:
    """Feed River one event at a time: score_one, then learn_one where learn is set."""
    scores = np.empty(len(X))
    for i, row in enumerate(X):
        x = dict(zip(NAMES, row.tolist(), strict=True))
        scores[i] = model.score_one(x)
        if learn[i]:
            model.learn_one(x)
    return scores


@functools.cache
def river_reference(params_index: int, seed: int, mask: str, pipeline: bool) -> np.ndarray:
    params = PARAMS[params_index]
    model = river_hst(params, seed)
    if pipeline:
        model = compose.Pipeline(preprocessing.MinMaxScaler(), model)
    X = data_matrix("raw" if pipeline else "unit")
    with np.errstate(all="ignore"):
        return river_scores(model, X, learn_mask(mask))


def batches(n: int, schedule: int | str):
    """Consecutive slices covering ``range(n)``: a fixed size, or a SCHEDULES entry (cycled)."""
    sizes = [schedule] if isinstance(schedule, int) else SCHEDULES[schedule]
    start, k = 0, 0
    while start < n:
        size = sizes[k % len(sizes)]
        yield slice(start, min(start + size, n))
        start, k = start + size, k + 1


def make_engine(params, seed) -> HSTEngine:
    n_trees, height, window_size, limits = params
    return HSTEngine(NAMES, n_trees=n_trees, height=height, window_size=window_size, limits=limits, seed=seed)
