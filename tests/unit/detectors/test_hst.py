"""Half-Space Trees: the numpy engine and the detector against River itself.

River is the specification: ``river.anomaly.HalfSpaceTrees`` and
``MinMaxScaler() | HalfSpaceTrees()`` fed one event at a time (``score_one``, then
``learn_one`` unless the event is masked out) must give the scores our batched code gives, for
any way of cutting the stream into batches.
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from river import anomaly, compose, preprocessing

from stream_detector.detectors.base import Detector
from stream_detector.detectors.hst import HalfSpaceTreesDetector
from stream_detector.detectors.hst_engine import HSTEngine
from stream_detector.detectors.minmax import RunningMinMax
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch

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
def _data(kind: str) -> np.ndarray:
    """Mostly inliers with a few far-out points; 'raw' is unscaled for the scaler tests."""
    rng = np.random.default_rng(123)
    X = rng.beta(2.0, 5.0, size=(N_EVENTS, len(NAMES)))
    outliers = rng.random(N_EVENTS) < 0.02
    X[outliers] = rng.uniform(-0.5, 1.5, size=(outliers.sum(), len(NAMES)))
    if kind == "raw":
        X = X * np.array([10.0, 0.01, 1000.0, 3.0]) + np.array([5.0, -2.0, 0.0, 100.0])
    return X


@functools.cache
def _learn_mask(kind: str) -> np.ndarray:
    if kind == "all":
        return np.ones(N_EVENTS, dtype=bool)
    return np.random.default_rng(5).random(N_EVENTS) < 0.7


def _river_hst(params, seed):
    n_trees, height, window_size, limits = params
    return anomaly.HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, limits=limits, seed=seed)


def _river_scores(model, X: np.ndarray, learn: np.ndarray) -> np.ndarray:
    """Feed River one event at a time: score_one, then learn_one where learn is set."""
    scores = np.empty(len(X))
    for i, row in enumerate(X):
        x = dict(zip(NAMES, row.tolist()))
        scores[i] = model.score_one(x)
        if learn[i]:
            model.learn_one(x)
    return scores


@functools.cache
def _river_reference(params_index: int, seed: int, mask: str, pipeline: bool) -> np.ndarray:
    params = PARAMS[params_index]
    model = _river_hst(params, seed)
    if pipeline:
        model = compose.Pipeline(preprocessing.MinMaxScaler(), model)
    X = _data("raw" if pipeline else "unit")
    with np.errstate(all="ignore"):
        return _river_scores(model, X, _learn_mask(mask))


def _batches(n: int, schedule: int | str):
    """Consecutive slices covering ``range(n)``: a fixed size, or a SCHEDULES entry (cycled)."""
    sizes = [schedule] if isinstance(schedule, int) else SCHEDULES[schedule]
    start, k = 0, 0
    while start < n:
        size = sizes[k % len(sizes)]
        yield slice(start, min(start + size, n))
        start, k = start + size, k + 1


def _engine(params, seed) -> HSTEngine:
    n_trees, height, window_size, limits = params
    return HSTEngine(NAMES, n_trees=n_trees, height=height, window_size=window_size, limits=limits, seed=seed)


def _feature_batch(X: np.ndarray) -> FeatureBatch:
    n = len(X)
    return FeatureBatch(
        event_time=np.arange(n, dtype=np.float64),
        columns={name: X[:, j].copy() for j, name in enumerate(NAMES)},
        keys={},
        event_ids=np.array([f"e{i}" for i in range(n)], dtype=object),
    )


# -- engine vs river.anomaly.HalfSpaceTrees -----------------------------------------------------


@pytest.mark.parametrize(("params_index", "seed", "schedule", "mask"), RIVER_CASES)
def test_engine_matches_river(params_index, seed, schedule, mask):
    expected = _river_reference(params_index, seed, mask, pipeline=False)
    engine = _engine(PARAMS[params_index], seed)
    X, learn = _data("unit"), _learn_mask(mask)
    got = np.empty(N_EVENTS)
    for s in _batches(N_EVENTS, schedule):
        got[s], state = engine.score_and_learn(X[s], learn[s])
        engine.commit(state)
    assert np.abs(got - expected).max() <= TOL
    assert (got > 0).any(), "the reference must leave the first window"


@pytest.mark.parametrize("height", [0, 1, 3])
def test_engine_matches_river_on_shallow_trees_and_nan(height):
    """Edge shapes, and NaN values passed straight through: like River with the key present,
    ``NaN < threshold`` is false, so they go right."""
    X = _data("unit")[:600].copy()
    X[np.random.default_rng(3).random(X.shape) < 0.1] = np.nan
    learn = _learn_mask("masked")[:600]
    params = (4, height, 20, None)
    with np.errstate(all="ignore"):
        expected = _river_scores(_river_hst(params, 11), X, learn)
    engine = _engine(params, 11)
    got = np.empty(len(X))
    for s in _batches(len(X), "mixed"):
        got[s], state = engine.score_and_learn(X[s], learn[s])
        engine.commit(state)
    assert np.abs(got - expected).max() <= TOL


def _format_1(engine: HSTEngine) -> dict:
    """The engine's snapshot as format 1 wrote it: every node of every array, int64 masses."""
    return {
        **{k: v for k, v in engine.state_dict().items() if k not in ("l_leaves", "r_leaves")},
        "version": 1,
        "feature": engine.trees.feature.copy(),
        "threshold": engine.trees.threshold.copy(),
        "l_mass": engine.state.l_mass,
        "r_mass": engine.state.r_mass.copy(),
    }


def _trained_engine(n: int = 100) -> HSTEngine:
    engine = _engine(PARAMS[1], 0)
    engine.commit(engine.score_and_learn(_data("unit")[:n], np.ones(n, dtype=bool))[1])
    return engine


def test_engine_rejects_corrupt_masses():
    engine = _trained_engine()
    snapshot = engine.state_dict()
    HSTEngine.from_state_dict(snapshot)  # a genuine snapshot loads
    broken = {**snapshot, "r_leaves": snapshot["r_leaves"].copy()}
    broken["r_leaves"][0, -1] += 1  # the leaves no longer add up to a window
    with pytest.raises(StateError, match="roots"):
        HSTEngine.from_state_dict(broken)
    with pytest.raises(StateError, match="shape"):
        HSTEngine.from_state_dict({**snapshot, "l_leaves": snapshot["l_leaves"][:, 1:]})
    other_counter = (snapshot["counter"] + 1) % snapshot["window_size"]
    with pytest.raises(StateError, match="roots"):  # l_mass roots count the window's events
        HSTEngine.from_state_dict({**snapshot, "counter": other_counter})
    old = _format_1(engine)
    HSTEngine.from_state_dict(old)
    old["r_mass"] = old["r_mass"].copy()
    old["r_mass"][0, -1] += 1  # format 1 stores inner nodes: a leaf no longer sums up to its parent
    with pytest.raises(StateError):
        HSTEngine.from_state_dict(old)


def test_snapshot_format_1_is_still_restored_and_format_2_is_smaller():
    """Snapshots of the previous format restore to the same engine; the current one stores
    the split nodes and leaf masses alone."""
    engine = _trained_engine(700)
    X, learn = _data("unit")[700:1500], _learn_mask("masked")[700:1500]
    expected, _ = engine.score_and_learn(X, learn)
    for snapshot in (engine.state_dict(), _format_1(engine)):
        restored = HSTEngine.from_state_dict(pickle.loads(pickle.dumps(snapshot)))
        np.testing.assert_array_equal(restored.trees.feature, engine.trees.feature)
        np.testing.assert_array_equal(restored.trees.threshold, engine.trees.threshold)
        np.testing.assert_array_equal(restored.state.l_mass, engine.state.l_mass)
        np.testing.assert_array_equal(restored.state.r_mass, engine.state.r_mass)
        got, _ = restored.score_and_learn(X, learn)
        np.testing.assert_array_equal(got, expected)
    assert len(pickle.dumps(engine.state_dict())) < len(pickle.dumps(_format_1(engine))) / 3


# -- scaler + engine vs MinMaxScaler() | HalfSpaceTrees() ----------------------------------------


@pytest.mark.parametrize(("params_index", "seed", "schedule", "mask"), RIVER_CASES)
def test_scaled_engine_matches_river_pipeline(params_index, seed, schedule, mask):
    expected = _river_reference(params_index, seed, mask, pipeline=True)
    engine = _engine(PARAMS[params_index], seed)
    scaler = RunningMinMax(len(NAMES))
    X, learn = _data("raw"), _learn_mask(mask)
    got = np.empty(N_EVENTS)
    for s in _batches(N_EVENTS, schedule):
        X_score, X_learn, scaler_state = scaler.transform(X[s], learn[s])
        got[s], state = engine.score_and_learn(X_score, learn[s], X_learn)
        engine.commit(state)
        scaler.commit(scaler_state)
    assert np.abs(got - expected).max() <= TOL


def test_minmax_matches_river_scaler():
    X, learn = _data("raw"), _learn_mask("masked")
    river_scaler = preprocessing.MinMaxScaler()
    ours = RunningMinMax(len(NAMES))
    X_score, X_learn, state = ours.transform(X, learn)
    for i, row in enumerate(X):
        x = dict(zip(NAMES, row.tolist()))
        with np.errstate(all="ignore"):
            before = river_scaler.transform_one(x)
        # Before anything was learned River gives NaN, and so do we.
        np.testing.assert_array_equal(list(before.values()), X_score[i])
        if learn[i]:
            river_scaler.learn_one(x)
            np.testing.assert_array_equal(list(river_scaler.transform_one(x).values()), X_learn[i])
    assert state.lo.tolist() == [river_scaler.min[k].get() for k in NAMES]


# -- the detector ---------------------------------------------------------------------------------


def _detector(**kwargs) -> HalfSpaceTreesDetector:
    defaults = dict(features=NAMES, n_trees=10, height=8, window_size=250, seed=0)
    defaults.update(kwargs)
    return HalfSpaceTreesDetector(**defaults)


def _run(detector: Detector, batch: FeatureBatch, learn: np.ndarray, schedule: int | str) -> np.ndarray:
    scores = np.empty(batch.n)
    for s in _batches(batch.n, schedule):
        step = detector.score(batch.slice(s.start, s.stop), learn[s])
        detector.commit(step)
        scores[s] = step.scores
    return scores


@pytest.mark.parametrize("schedule", ["ones", "mixed", "all"])
def test_detector_matches_river_pipeline(schedule):
    expected = _river_reference(0, 0, "masked", pipeline=True)
    got = _run(_detector(), _feature_batch(_data("raw")), _learn_mask("masked"), schedule)
    assert np.abs(got - expected).max() <= TOL


def _data_with_gaps() -> np.ndarray:
    X = _data("raw").copy()
    rng = np.random.default_rng(9)
    X[rng.random(X.shape) < 0.05] = np.nan
    X[:3, 1] = np.nan  # missing before anything was learned
    return X


@pytest.mark.parametrize("scale", [True, False])
def test_detector_batch_equals_one_by_one(scale):
    batch, learn = _feature_batch(_data_with_gaps()), _learn_mask("masked")
    one_by_one = _run(_detector(window_size=37, scale=scale), batch, learn, 1)
    for schedule in (13, "mixed", N_EVENTS):
        again = _run(_detector(window_size=37, scale=scale), batch, learn, schedule)
        assert np.array_equal(again, one_by_one)
    assert np.isfinite(one_by_one).all()


def test_score_is_pure():
    detector = _detector(window_size=20)
    batch, learn = _feature_batch(_data_with_gaps()), _learn_mask("masked")
    detector.learn_one_batch(batch.slice(0, 500), learn[:500])
    rest = batch.slice(500, 900)
    first = detector.score(rest, learn[500:900])
    second = detector.score(rest, learn[500:900])
    assert np.array_equal(first.scores, second.scores)
    for key in first.details:
        assert np.array_equal(first.details[key], second.details[key])
    detector.commit(first)
    assert not np.array_equal(detector.score(rest, learn[500:900]).scores, first.scores)


def test_state_dict_round_trip_without_seed():
    batch, learn = _feature_batch(_data_with_gaps()), _learn_mask("masked")
    original = _detector(window_size=50)
    original.learn_one_batch(batch.slice(0, 1234), learn[:1234])
    snapshot = pickle.loads(pickle.dumps(original.state_dict()))
    # A different seed would build different trees: the snapshot must carry them.
    restored = _detector(window_size=50, seed=999)
    restored.load_state_dict(snapshot)
    rest = batch.slice(1234, N_EVENTS)
    expected = _run(original, rest, learn[1234:], 100)
    assert np.array_equal(_run(restored, rest, learn[1234:], 7), expected)


def test_state_dict_rejects_wrong_version_and_config():
    detector = _detector()
    snapshot = detector.state_dict()
    with pytest.raises(StateError):
        detector.load_state_dict({**snapshot, "version": 2})
    with pytest.raises(StateError):
        _detector(window_size=99).load_state_dict(snapshot)
    with pytest.raises(StateError):
        _detector(features=NAMES[:3]).load_state_dict(snapshot)
    with pytest.raises(StateError):
        detector.load_state_dict({**snapshot, "engine": {**snapshot["engine"], "version": 0}})


def test_first_window_scores_zero_and_is_flagged():
    detector = _detector(window_size=100)
    batch = _feature_batch(_data("raw")[:300])
    learn = np.ones(300, dtype=bool)
    learn[50:60] = False  # not learned: does not advance the window
    step = detector.score(batch, learn)
    warming = step.details["warming_up"]
    assert warming[:110].all() and not warming[110:].any()
    assert (step.scores[warming] == 0).all() and (step.scores[~warming] > 0).all()


def test_missing_value_is_imputed_at_mid_range():
    # Without scaling the trees split limits (default (0, 1)): missing == 0.5 exactly.
    X = _data("unit")[:600].copy()
    learn = np.ones(600, dtype=bool)
    with_gap, with_mid = X.copy(), X.copy()
    with_gap[400:, 2], with_mid[400:, 2] = np.nan, 0.5
    a = _detector(scale=False, window_size=100).score(_feature_batch(with_gap), learn)
    b = _detector(scale=False, window_size=100).score(_feature_batch(with_mid), learn)
    assert np.array_equal(a.scores, b.scores)
    assert (a.details["n_imputed"][400:] == 1).all()


def test_explain_names_the_trees_and_out_of_range_features():
    detector = _detector(window_size=100)
    X = _data("raw")[:400].copy()
    X[-1, 0] = 1e6  # far above anything learned for "zeta"
    X[-1, 3] = np.nan
    batch = _feature_batch(X)
    step = detector.score(batch, np.ones(400, dtype=bool))
    explanation = detector.explain(batch, step, 399)
    text = " ".join(explanation.reasons)
    assert "isolated quickly by the half-space trees (mass score" in text
    assert "zeta above its learned range" in text
    assert "missing beta" in text
    assert explanation.details["mass_score"] == step.scores[399]
    assert step.scores[399] > np.median(step.scores[100:399])


def test_rescoring_with_other_masks_and_rows_equals_a_fresh_detector():
    """The engine reuses the leaves of rows unchanged since the last call (the pipeline's
    rounds): scores must equal those of a detector that never saw the earlier calls."""
    batch, learn = _feature_batch(_data_with_gaps()), _learn_mask("masked")
    detector = _detector(window_size=37)
    detector.learn_one_batch(batch.slice(0, 500), learn[:500])
    snapshot = pickle.dumps(detector.state_dict())
    rest = batch.slice(500, 900)
    X = _data_with_gaps()[500:900].copy()
    X[200:210] *= 3.0  # some rows change between calls (new extremes move the scaler)
    changed = _feature_batch(X)
    masks = [np.ones(400, dtype=bool), learn[500:900], ~learn[500:900], learn[500:900]]
    for b in (rest, changed, rest):
        for m in masks:
            got = detector.score(b, m)
            fresh = _detector(window_size=37)
            fresh.load_state_dict(pickle.loads(snapshot))
            expected = fresh.score(b, m)
            assert np.array_equal(got.scores, expected.scores)
            assert np.array_equal(got.next_state.engine.l_mass, expected.next_state.engine.l_mass)
            assert np.array_equal(got.next_state.engine.r_mass, expected.next_state.engine.r_mass)


@pytest.mark.parametrize("window_size", [5, 37, 250])
@pytest.mark.parametrize("scale", [True, False])
def test_a_round_that_changes_the_mask_from_some_event_on_scores_as_a_fresh_detector(window_size, scale):
    """As the pipeline's rounds do: the same rows again, with a mask that differs from some event
    on, so the two rounds' window pivots fall on other rows (fewer or more learned events).
    Whatever the engine keeps from the previous call (its leaf cache), the scores and masses
    must be a fresh detector's."""
    X = _data_with_gaps()
    batch = _feature_batch(X)
    rng = np.random.default_rng(window_size)
    detector = _detector(window_size=window_size, scale=scale)
    detector.commit(detector.score(batch.slice(0, 300), rng.random(300) < 0.8))
    snapshot = pickle.dumps(detector.state_dict())
    rest = batch.slice(300, 700)
    first = rng.random(400) < 0.8
    for _ in range(12):
        detector.score(rest, first)
        # As the pipeline's next round: the same mask up to some event, then another one.
        cut = int(rng.integers(0, 400))
        second = first.copy()
        second[cut:] = rng.random(400 - cut) < rng.choice([0.3, 0.8, 1.0])
        got = detector.score(rest, second)
        fresh = _detector(window_size=window_size, scale=scale)
        fresh.load_state_dict(pickle.loads(snapshot))
        expected = fresh.score(rest, second)
        assert np.array_equal(got.scores, expected.scores)
        assert np.array_equal(got.next_state.engine.l_leaves, expected.next_state.engine.l_leaves)
        assert np.array_equal(got.next_state.engine.r_mass, expected.next_state.engine.r_mass)
        first = second


@pytest.mark.parametrize("n_trees, height, seed", [(3, 1, 0), (10, 8, 42), (25, 10, 7)])
def test_trees_are_rivers_padded_trees(n_trees, height, seed):
    """The engine grows its trees without importing river.tree; they must be River's."""
    import collections
    import random

    from river.tree.padded import PaddedBranch, make_padded_tree

    features = ("b", "a", "c")
    limits = {"a": (0.0, 2.0), "b": (-1.0, 1.0)}
    engine = HSTEngine(features, n_trees=n_trees, height=height, limits=limits, seed=seed)
    rng = random.Random(seed)
    all_limits = collections.defaultdict(lambda: (0.0, 1.0), limits)
    for t in range(n_trees):
        root = make_padded_tree({f: all_limits[f] for f in sorted(features)}, height, 0.15, rng, r_mass=0, l_mass=0)
        stack = [(root, 0)]
        while stack:
            node, k = stack.pop()
            if isinstance(node, PaddedBranch):
                assert features[engine.trees.feature[t, k]] == node.feature
                assert engine.trees.threshold[t, k] == node.threshold
                stack += [(node.children[0], 2 * k + 1), (node.children[1], 2 * k + 2)]
            else:
                assert np.isnan(engine.trees.threshold[t, k])
