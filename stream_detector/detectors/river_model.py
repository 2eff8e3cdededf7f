"""Any ``river.anomaly`` estimator, chosen by name, behind the detector contract.

This is the general path: River models learn one event at a time, so the batch is walked
event by event (score_one, then learn_one when the event may be learned) on a copy of the
model, which becomes the model on commit. HalfSpaceTrees has a vectorised engine with River's
exact scores (``detectors/hst.py``); use this class for the others (LODA, OneClassSVM, ...).

State: an arbitrary River estimator can only be saved by pickling it, and unpickling runs
whatever the bytes say. So the pickle is signed with HMAC-SHA256 under ``signing_key``
(``state.signing_key``) and the signature is checked before anything is unpickled: a snapshot
without one is refused (``StateError`` reason ``unsigned``), one with a wrong one too
(``bad_signature``). Without a key the model's state is not saved at all (``saves_state`` is
False): it restarts fresh.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
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


def _signature(key: bytes, model: str, blob: bytes) -> str:
    """HMAC-SHA256 of the exact pickled bytes, bound to the model's name and the state version."""
    return hmac.new(key, b"stream-detector river state v2\0" + model.encode() + b"\0" + blob, hashlib.sha256).hexdigest()


class RiverModelDetector(Detector):
    """Wraps a River anomaly detector; raw score = the model's own score."""

    name = "river"
    population = True
    # 1: an unsigned pickle (refused); 2: a pickle with its HMAC, or no model when unsigned.
    state_version = 2

    def __init__(
        self,
        model: str = "LODA",
        params: dict[str, Any] | None = None,
        features: tuple[str, ...] = ("log_amount", "log_quantity", "log_unit_price"),
        scale: bool = True,
        seed: int | None = 42,
        signing_key: bytes | None = None,
    ) -> None:
        self.model = model
        self.signing_key = signing_key
        self.saves_state = signing_key is not None  # the model is only saved signed
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
        if self.signing_key is None:
            return {"version": self.state_version, "model": self.model, "pickle": None, "hmac": None}
        blob = pickle.dumps(self._model, protocol=pickle.HIGHEST_PROTOCOL)
        return {"version": self.state_version, "model": self.model, "pickle": blob, "hmac": _signature(self.signing_key, self.model, blob)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Verify the signature, then unpickle; ``StateError`` (with its reason) otherwise.
        A state saved without a key holds no model: the detector keeps its fresh one."""
        version, model = state.get("version"), state.get("model")
        if version == 1:
            raise StateError(f"river {model!r} state v1 is an unsigned pickle: refused", reason="unsigned")
        if version != self.state_version or model != self.model:
            raise StateError(f"river state for {model!r} v{version}, configured {self.model!r} (v{self.state_version})")
        blob, signature = state.get("pickle"), state.get("hmac")
        if blob is None:
            return
        if not isinstance(blob, bytes):
            raise StateError(f"river state holds a {type(blob).__name__}, not pickled bytes", reason="corrupt")
        if not isinstance(signature, str) or not signature:
            raise StateError(f"river {self.model} state is not signed: refused", reason="unsigned")
        if self.signing_key is None:
            raise StateError(f"river {self.model} state is signed, but no state.signing_key is configured to verify it: refused", reason="unsigned")
        if not hmac.compare_digest(signature.encode(errors="replace"), _signature(self.signing_key, self.model, blob).encode()):
            raise StateError(f"river {self.model} state has a bad signature (another key, or altered): refused", reason="bad_signature")
        try:
            restored = pickle.loads(blob)  # verified above: written by a holder of the key
        except Exception as exc:  # an unpickling failure can be any exception
            raise StateError(f"river {self.model} state cannot be unpickled: {exc!r}", reason="corrupt") from None
        if type(restored) is not type(self._model):
            raise StateError(f"river state holds a {type(restored).__name__}, configured {type(self._model).__name__}")
        self._model = restored
