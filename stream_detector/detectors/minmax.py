"""A vectorised running min/max scaler with River's ``preprocessing.MinMaxScaler`` semantics.

In ``MinMaxScaler() | HalfSpaceTrees()`` River scales the same event two ways:

* ``score_one`` does **not** update the scaler (``learn_during_predict`` is off by default), so
  the score sees the min/max of the events learned *before* it;
* ``learn_one`` first updates the scaler with the event and then passes the event, scaled with
  the min/max *including* it, to the trees.

``RunningMinMax.transform`` returns both views for a whole batch at once, plus the state after
learning the batch, without touching ``self`` (the detector contract: score is pure, commit
applies). Only events whose ``learn`` flag is set update the min/max, exactly as if River had
skipped ``learn_one`` for the others.

River's formula is kept bit for bit: ``(x - lo) / (hi - lo)``, and ``0.0`` where ``hi == lo``.
Before anything was learned ``lo = +inf`` and ``hi = -inf``, which gives NaN, as in River. NaN
values never move the min/max (River's ``x < min`` comparisons are false for NaN); infinite
values are ignored as well here so one bad value cannot make a feature's range infinite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.errors import StateError

STATE_VERSION = 1


@dataclass(frozen=True)
class MinMaxState:
    """Per-feature running minimum and maximum over the learned events."""

    lo: np.ndarray  # float64 (d,), +inf until a finite value was learned
    hi: np.ndarray  # float64 (d,), -inf until a finite value was learned


def _scale(X: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """River's ``(x - lo) / d if d else 0.0`` with ``d = hi - lo``, element-wise."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = hi - lo
        scaled = (X - lo) / d
    # `if d` is false only for d == 0 (NaN and inf are truthy), so NaN ranges stay NaN.
    return np.where(d != 0, scaled, 0.0)


class RunningMinMax:
    """Running min/max scaling of a (n, d) float64 matrix, learned only on flagged rows."""

    def __init__(self, n_features: int) -> None:
        self.n_features = int(n_features)
        self.state = MinMaxState(lo=np.full(self.n_features, np.inf), hi=np.full(self.n_features, -np.inf))

    def transform(self, X: np.ndarray, learn: np.ndarray) -> tuple[np.ndarray, np.ndarray, MinMaxState]:
        """Scale ``X`` in order; return ``(X_score, X_learn, next_state)``.

        ``X_score[i]`` uses the min/max of the committed state plus the learned rows ``j < i``
        (what River's ``score_one`` sees); ``X_learn[i]`` also includes row ``i`` when it is
        learned (what River's ``learn_one`` passes to the next step). Rows that are not learned
        get ``X_learn[i] == X_score[i]``.
        """
        X = np.asarray(X, dtype=np.float64)
        learn = np.asarray(learn, dtype=bool)
        lo0, hi0 = self.state.lo, self.state.hi
        if X.shape[0] == 0:
            return X.copy(), X.copy(), self.state
        usable = learn[:, None] & np.isfinite(X)
        # Inclusive running extremes: row i's value counts from row i on.
        lo_incl = np.minimum(np.minimum.accumulate(np.where(usable, X, np.inf), axis=0), lo0)
        hi_incl = np.maximum(np.maximum.accumulate(np.where(usable, X, -np.inf), axis=0), hi0)
        # Exclusive extremes: shift by one row, the committed state in front.
        lo_excl = np.vstack([lo0[None, :], lo_incl[:-1]])
        hi_excl = np.vstack([hi0[None, :], hi_incl[:-1]])
        X_score = _scale(X, lo_excl, hi_excl)
        X_learn = _scale(X, lo_incl, hi_incl)
        next_state = MinMaxState(lo=lo_incl[-1].copy(), hi=hi_incl[-1].copy())
        return X_score, X_learn, next_state

    def commit(self, state: MinMaxState) -> None:
        """Adopt the state returned by ``transform`` (arrays are never mutated in place)."""
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "lo": self.state.lo.copy(),
            "hi": self.state.hi.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StateError(f"min/max scaler state version {state.get('version')!r} != {STATE_VERSION}")
        lo = np.asarray(state["lo"], dtype=np.float64)
        hi = np.asarray(state["hi"], dtype=np.float64)
        if lo.shape != (self.n_features,) or hi.shape != (self.n_features,):
            raise StateError(f"min/max scaler state has shape {lo.shape}/{hi.shape}, expected ({self.n_features},)")
        self.state = MinMaxState(lo=lo.copy(), hi=hi.copy())
