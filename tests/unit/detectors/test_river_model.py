"""RiverModelDetector: any ``river.anomaly`` model behind the detector contract.

Checked against River used directly, the way its documentation shows: for each event in order,
``score_one`` then ``learn_one`` (only for the events the pipeline lets it learn), with missing
features left out of the sample. The contract-wide checks (batch == one by one, masks, state
versions) are in ``test_conformance.py``; this file covers what is specific to the wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from river import anomaly, compose, preprocessing

from stream_detector.detectors.river_model import RiverModelDetector, make_river_model
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch
from stream_detector.state import codec

FEATURES = ("a", "b", "c")


def make_batch(n: int, seed: int, nan_rate: float = 0.1) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    columns = {"a": rng.normal(3.0, 1.0, n), "b": rng.lognormal(0.0, 0.5, n), "c": rng.uniform(-1.0, 1.0, n)}
    columns["a"][rng.random(n) < 0.03] += 15.0  # a few outliers
    for values in columns.values():
        values[rng.random(n) < nan_rate] = np.nan
    columns["a"][5] = columns["b"][5] = columns["c"][5] = np.nan  # an event with no feature at all
    return FeatureBatch(event_time=np.arange(n, dtype=float), columns=columns, keys={})


def river_directly(model: Any, batch: FeatureBatch, learn: np.ndarray) -> list[float]:
    """Score then learn, event by event, with River's own API."""
    scores = []
    for i in range(batch.n):
        sample = {f: float(batch.columns[f][i]) for f in FEATURES if not math.isnan(batch.columns[f][i])}
        scores.append(model.score_one(sample))
        if learn[i]:
            model.learn_one(sample)
    return scores


CASES: dict[str, tuple[str, dict[str, Any], bool, Callable[[], Any]]] = {
    # name: (model, params, scale, the same model built with River directly)
    "loda_scaled": ("LODA", {"n_bins": 8}, True, lambda: preprocessing.MinMaxScaler() | anomaly.LODA(n_bins=8, seed=7)),
    "hst_scaled": (
        "HalfSpaceTrees",
        {"n_trees": 5, "height": 6, "window_size": 40},
        True,
        lambda: preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(n_trees=5, height=6, window_size=40, seed=7),
    ),
    "svm_unscaled": ("OneClassSVM", {"nu": 0.2}, False, lambda: anomaly.OneClassSVM(nu=0.2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_equal_river_used_directly(case):
    model, params, scale, direct = CASES[case]
    batch = make_batch(400, seed=1)
    learn = np.random.default_rng(2).random(batch.n) > 0.2
    expected = river_directly(direct(), batch, learn)
    detector = RiverModelDetector(model=model, params=params, features=FEATURES, scale=scale, seed=7)
    got, start = [], 0
    for size in (1, 60, 13, 200, 126):
        part = batch.slice(start, start + size)
        step = detector.score(part, learn[start : start + size])
        detector.commit(step)
        got.extend(step.scores.tolist())
        start += size
    assert len(got) == batch.n
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all() and len(set(got)) > 10


def test_score_learns_nothing_until_commit():
    batch = make_batch(300, seed=3)
    learn = np.ones(batch.n, dtype=bool)
    head, middle, tail = batch.slice(0, 100), batch.slice(100, 200), batch.slice(200, 300)
    detector = RiverModelDetector(model="LODA", features=FEATURES, seed=7)
    detector.commit(detector.score(head, learn[:100]))
    first = detector.score(middle, learn[100:200])  # scored, never committed
    second = detector.score(middle, np.zeros(100, dtype=bool))
    np.testing.assert_array_equal(first.scores, detector.score(middle, learn[100:200]).scores)
    # River that saw only the head scores the tail the same as the detector does now.
    direct = preprocessing.MinMaxScaler() | anomaly.LODA(seed=7)
    river_directly(direct, head, learn[:100])
    np.testing.assert_array_equal(detector.score(tail, learn[200:]).scores, river_directly(direct, tail, learn[200:]))
    # The step holds the model after the batch: committing it is having learned the batch.
    detector.commit(first)
    direct_after = preprocessing.MinMaxScaler() | anomaly.LODA(seed=7)
    river_directly(direct_after, head, learn[:100])
    river_directly(direct_after, middle, learn[100:200])
    np.testing.assert_array_equal(detector.score(tail, learn[200:]).scores, river_directly(direct_after, tail, learn[200:]))
    assert not np.array_equal(second.scores, first.scores)  # the mask mattered


def test_a_batch_without_a_feature_column_scores_it_as_missing():
    batch = make_batch(120, seed=4, nan_rate=0.0)
    without_c = FeatureBatch(event_time=batch.event_time, columns={"a": batch.columns["a"], "b": batch.columns["b"]}, keys={})
    all_nan_c = FeatureBatch(event_time=batch.event_time, columns={**without_c.columns, "c": np.full(batch.n, np.nan)}, keys={})
    learn = np.ones(batch.n, dtype=bool)
    a = RiverModelDetector(model="LODA", features=FEATURES, seed=7).score(without_c, learn).scores
    b = RiverModelDetector(model="LODA", features=FEATURES, seed=7).score(all_nan_c, learn).scores
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()


def test_make_river_model_builds_the_named_model_with_the_seed_when_it_takes_one():
    loda = make_river_model("LODA", {"n_bins": 4}, scale=False, seed=5)
    assert isinstance(loda, anomaly.LODA) and loda.seed == 5 and loda.n_bins == 4
    assert make_river_model("LODA", {"seed": 9}, scale=False, seed=5).seed == 9  # an explicit seed wins
    assert make_river_model("LODA", {}, scale=False, seed=None).seed is None
    svm = make_river_model("OneClassSVM", {"nu": 0.3}, scale=False, seed=5)  # takes no seed
    assert isinstance(svm, anomaly.OneClassSVM) and svm.nu == 0.3
    scaled = make_river_model("HalfSpaceTrees", {"n_trees": 3}, scale=True, seed=1)
    assert isinstance(scaled, compose.Pipeline)
    first, last = list(scaled.steps.values())
    assert isinstance(first, preprocessing.MinMaxScaler) and isinstance(last, anomaly.HalfSpaceTrees)
    assert last.seed == 1 and last.n_trees == 3
    params = {"n_bins": 4}
    make_river_model("LODA", params, scale=True, seed=5)
    assert params == {"n_bins": 4}  # the caller's params are not changed


def test_hyperparameters_are_attributes_and_the_seed_decides_the_scores():
    params = {"n_bins": 6}
    detector = RiverModelDetector(model="LODA", params=params, features=["a", "b"], scale=False, seed=3)
    assert detector.name == "river"
    assert (detector.model, detector.params, detector.features, detector.scale, detector.seed) == ("LODA", {"n_bins": 6}, ("a", "b"), False, 3)
    params["n_bins"] = 99
    assert detector.params == {"n_bins": 6}
    batch = make_batch(200, seed=5)
    learn = np.ones(batch.n, dtype=bool)

    def scores(seed: int) -> np.ndarray:
        return RiverModelDetector(model="LODA", features=FEATURES, seed=seed).learn_one_batch(batch, learn)

    np.testing.assert_array_equal(scores(11), scores(11))
    assert not np.array_equal(scores(11), scores(12))


def test_explain_names_the_model_and_its_score():
    batch = make_batch(50, seed=6)
    detector = RiverModelDetector(model="LODA", features=FEATURES, seed=7)
    step = detector.score(batch, np.ones(batch.n, dtype=bool))
    explanation = detector.explain(batch, step, 40)
    assert explanation.details == {"model": "LODA"}
    assert explanation.reasons == [f"river LODA scored {step.scores[40]:.4f}"]


def test_state_round_trip_continues_like_river_and_refuses_another_model():
    batch = make_batch(300, seed=7)
    learn = np.random.default_rng(8).random(batch.n) > 0.1
    key = b"a-test-signing-key"
    detector = RiverModelDetector(model="LODA", features=FEATURES, seed=7, signing_key=key)
    detector.learn_one_batch(batch.slice(0, 150), learn[:150])
    state = codec.decode(codec.encode(detector.state_dict()))
    assert state["version"] == 2 and state["model"] == "LODA"
    restored = RiverModelDetector(model="LODA", features=FEATURES, seed=99, signing_key=key)  # the snapshot's model wins
    restored.load_state_dict(state)
    direct = preprocessing.MinMaxScaler() | anomaly.LODA(seed=7)
    river_directly(direct, batch.slice(0, 150), learn[:150])
    rest = batch.slice(150, 300)
    np.testing.assert_array_equal(restored.learn_one_batch(rest, learn[150:]), river_directly(direct, rest, learn[150:]))
    with pytest.raises(StateError, match="LODA"):
        RiverModelDetector(model="HalfSpaceTrees", features=FEATURES).load_state_dict(state)
    with pytest.raises(StateError):
        RiverModelDetector(model="LODA", features=FEATURES, signing_key=key).load_state_dict({**state, "version": 3})
