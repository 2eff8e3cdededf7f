"""Any ``river.anomaly`` estimator, chosen by name, behind the detector contract.

This is the general path: River models learn one event at a time, so the batch is walked
event by event (score_one, then learn_one when the event may be learned) on a copy of the
model, which becomes the model on commit. HalfSpaceTrees has a vectorised engine with River's
exact scores (``detectors/hst.py``); use this class for the others (LODA, OneClassSVM, ...).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np

from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch


def make_river_model(model: str, params: dict[str, Any], scale: bool, seed: int | None) -> Any:
    import river.anomaly
    import river.preprocessing

    cls = getattr(river.anomaly, model)
    params = dict(params)
    if seed is not None and "seed" in cls.__init__.__code__.co_varnames and "seed" not in params:
        params["seed"] = seed
    estimator = cls(**params)
    return river.preprocessing.MinMaxScaler() | estimator if scale else estimator


class RiverModelDetector(Detector):
    """Wraps a River anomaly detector; raw score = the model's own score."""

    name = "river"
    state_version = 1

    def __init__(
        self,
        model: str = "LODA",
        params: dict[str, Any] | None = None,
        features: tuple[str, ...] = ("log_amount", "log_quantity", "log_unit_price"),
        scale: bool = True,
        seed: int | None = 42,
    ) -> None:
        self.model = model
        self.params = dict(params or {})
        self.features = tuple(features)
        self.scale = scale
        self.seed = seed
        self._model = make_river_model(model, self.params, scale, seed)

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        model = copy.deepcopy(self._model)
        x = batch.matrix(self.features)
        scores = np.empty(batch.n)
        for i, row in enumerate(x):
            # Missing features are left out of the dict: River models handle absent keys.
            sample = {f: v for f, v in zip(self.features, row.tolist(), strict=True) if v == v}
            scores[i] = model.score_one(sample)
            if learn[i]:
                model.learn_one(sample)
        return Step(scores=scores, next_state=model)

    def commit(self, step: Step) -> None:
        self._model = step.next_state

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        return Explanation(
            details={"model": self.model},
            reasons=[f"river {self.model} scored {step.scores[i]:.4f}"],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.state_version, "model": self.model, "pickle": pickle.dumps(self._model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version or state.get("model") != self.model:
            raise StateError(f"river state for {state.get('model')!r} v{state.get('version')}, configured {self.model!r}")
        self._model = pickle.loads(state["pickle"])
