"""HalfSpaceTreesDetector: River's ``MinMaxScaler() | HalfSpaceTrees()`` behind the detector
contract, score for score (River is the specification, see ``hst_reference.py``), with
imputation of missing values, purity, snapshots and explanations.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from stream_detector.detectors.base import Detector
from stream_detector.detectors.hst import HalfSpaceTreesDetector
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch
from tests.unit.detectors.hst_reference import N_EVENTS, NAMES, TOL, batches, data_matrix, learn_mask, river_reference


def _feature_batch(X: np.ndarray) -> FeatureBatch:
    n = len(X)
    return FeatureBatch(
        event_time=np.arange(n, dtype=np.float64),
        columns={name: X[:, j].copy() for j, name in enumerate(NAMES)},
        keys={},
        event_ids=np.array([f"e{i}" for i in range(n)], dtype=object),
    )


def _detector(**kwargs) -> HalfSpaceTreesDetector:
    defaults = dict(features=NAMES, n_trees=10, height=8, window_size=250, seed=0)
    defaults.update(kwargs)
    return HalfSpaceTreesDetector(**defaults)


def _run(detector: Detector, batch: FeatureBatch, learn: np.ndarray, schedule: int | str) -> np.ndarray:
    scores = np.empty(batch.n)
    for s in batches(batch.n, schedule):
        step = detector.score(batch.slice(s.start, s.stop), learn[s])
        detector.commit(step)
        scores[s] = step.scores
    return scores


@pytest.mark.parametrize("schedule", ["ones", "mixed", "all"])
def test_detector_matches_river_pipeline(schedule):
    expected = river_reference(0, 0, "masked", pipeline=True)
    got = _run(_detector(), _feature_batch(data_matrix("raw")), learn_mask("masked"), schedule)
    assert np.abs(got - expected).max() <= TOL


def _data_with_gaps() -> np.ndarray:
    X = data_matrix("raw").copy()
    rng = np.random.default_rng(9)
    X[rng.random(X.shape) < 0.05] = np.nan
    X[:3, 1] = np.nan  # missing before anything was learned
    return X


@pytest.mark.parametrize("scale", [True, False])
def test_detector_batch_equals_one_by_one(scale):
    batch, learn = _feature_batch(_data_with_gaps()), learn_mask("masked")
    one_by_one = _run(_detector(window_size=37, scale=scale), batch, learn, 1)
    for schedule in (13, "mixed", N_EVENTS):
        again = _run(_detector(window_size=37, scale=scale), batch, learn, schedule)
        assert np.array_equal(again, one_by_one)
    assert np.isfinite(one_by_one).all()


def test_score_is_pure():
    detector = _detector(window_size=20)
    batch, learn = _feature_batch(_data_with_gaps()), learn_mask("masked")
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
    batch, learn = _feature_batch(_data_with_gaps()), learn_mask("masked")
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
    batch = _feature_batch(data_matrix("raw")[:300])
    learn = np.ones(300, dtype=bool)
    learn[50:60] = False  # not learned: does not advance the window
    step = detector.score(batch, learn)
    warming = step.details["warming_up"]
    assert warming[:110].all() and not warming[110:].any()
    assert (step.scores[warming] == 0).all() and (step.scores[~warming] > 0).all()


def test_missing_value_is_imputed_at_mid_range():
    # Without scaling the trees split limits (default (0, 1)): missing == 0.5 exactly.
    X = data_matrix("unit")[:600].copy()
    learn = np.ones(600, dtype=bool)
    with_gap, with_mid = X.copy(), X.copy()
    with_gap[400:, 2], with_mid[400:, 2] = np.nan, 0.5
    a = _detector(scale=False, window_size=100).score(_feature_batch(with_gap), learn)
    b = _detector(scale=False, window_size=100).score(_feature_batch(with_mid), learn)
    assert np.array_equal(a.scores, b.scores)
    assert (a.details["n_imputed"][400:] == 1).all()


def test_explain_names_the_trees_and_out_of_range_features():
    detector = _detector(window_size=100)
    X = data_matrix("raw")[:400].copy()
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
    batch, learn = _feature_batch(_data_with_gaps()), learn_mask("masked")
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
