"""HSTEngine: the batched Half-Space Trees against ``river.anomaly.HalfSpaceTrees`` itself,
alone and behind the running min/max scaler, its snapshots, and River's trees.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stream_detector.detectors.hst_engine import HSTEngine
from stream_detector.detectors.minmax import RunningMinMax
from stream_detector.errors import StateError
from tests.unit.detectors.hst_reference import (
    N_EVENTS,
    NAMES,
    PARAMS,
    RIVER_CASES,
    TOL,
    batches,
    data_matrix,
    learn_mask,
    make_engine,
    river_hst,
    river_reference,
    river_scores,
)

# -- engine vs river.anomaly.HalfSpaceTrees -----------------------------------------------------


@pytest.mark.parametrize(("params_index", "seed", "schedule", "mask"), RIVER_CASES)
def test_engine_matches_river(params_index, seed, schedule, mask):
    expected = river_reference(params_index, seed, mask, pipeline=False)
    engine = make_engine(PARAMS[params_index], seed)
    X, learn = data_matrix("unit"), learn_mask(mask)
    got = np.empty(N_EVENTS)
    for s in batches(N_EVENTS, schedule):
        got[s], state = engine.score_and_learn(X[s], learn[s])
        engine.commit(state)
    assert np.abs(got - expected).max() <= TOL
    assert (got > 0).any(), "the reference must leave the first window"


@pytest.mark.parametrize("height", [0, 1, 3])
def test_engine_matches_river_on_shallow_trees_and_nan(height):
    """Edge shapes, and NaN values passed straight through: like River with the key present,
    ``NaN < threshold`` is false, so they go right."""
    X = data_matrix("unit")[:600].copy()
    X[np.random.default_rng(3).random(X.shape) < 0.1] = np.nan
    learn = learn_mask("masked")[:600]
    params = (4, height, 20, None)
    with np.errstate(all="ignore"):
        expected = river_scores(river_hst(params, 11), X, learn)
    engine = make_engine(params, 11)
    got = np.empty(len(X))
    for s in batches(len(X), "mixed"):
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
    engine = make_engine(PARAMS[1], 0)
    engine.commit(engine.score_and_learn(data_matrix("unit")[:n], np.ones(n, dtype=bool))[1])
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
    X, learn = data_matrix("unit")[700:1500], learn_mask("masked")[700:1500]
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
    expected = river_reference(params_index, seed, mask, pipeline=True)
    engine = make_engine(PARAMS[params_index], seed)
    scaler = RunningMinMax(len(NAMES))
    X, learn = data_matrix("raw"), learn_mask(mask)
    got = np.empty(N_EVENTS)
    for s in batches(N_EVENTS, schedule):
        X_score, X_learn, scaler_state = scaler.transform(X[s], learn[s])
        got[s], state = engine.score_and_learn(X_score, learn[s], X_learn)
        engine.commit(state)
        scaler.commit(scaler_state)
    assert np.abs(got - expected).max() <= TOL


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
