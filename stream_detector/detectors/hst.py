"""Half-Space Trees detector: River's ``MinMaxScaler() | HalfSpaceTrees()``, batched.

Scores are those of the River pipeline fed one event at a time (``score_one`` then, for events
the pipeline lets it learn, ``learn_one``), computed for a whole batch by ``HSTEngine`` and
``RunningMinMax``. Raw score: River's ``1 - mass / max_mass`` in [0, 1], higher = more
anomalous, exactly 0 while the first window of ``window_size`` learned events fills up
(``details["warming_up"]`` tells those apart from a genuine 0).

Missing values: a feature that is NaN (or infinite) for an event is imputed with the middle of
the range the trees split: scaled 0.5 with ``scale=True`` (the mid-range of the min/max learned
so far), the midpoint of ``limits`` otherwise. Missing values never move the learned min/max.
A feature whose range is still unknown (nothing learned yet) is also placed at 0.5. River
itself would instead send a missing feature down the heavier child; imputing keeps the engine
free of mass-dependent branches (and so vectorisable), and a missing value looks typical
rather than extreme. ``details["n_imputed"]`` counts the imputed features per event.

Scaling follows River's MinMaxScaler, including its quirk that a feature that has been constant
so far scales to 0.0 whatever its value. Scaled values are not clipped: a value beyond the
learned range falls on the outer side of every split on that feature, which is what makes it
isolate quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.detectors.hst_engine import HSTEngine, HSTState
from stream_detector.detectors.minmax import MinMaxState, RunningMinMax
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch

DEFAULT_FEATURES = ("log_amount", "log_quantity", "log_unit_price", "hour_sin", "hour_cos")


@dataclass(frozen=True)
class _NextState:
    """What ``commit`` applies, plus the scaled inputs ``explain`` reads."""

    engine: HSTState
    scaler: MinMaxState | None
    scaled: np.ndarray  # (n, d) values the trees scored, after scaling and imputation


class HalfSpaceTreesDetector(Detector):
    """Multivariate point anomalies: events the half-space trees isolate in few splits."""

    name = "hst"
    population = True
    state_version = 1

    def __init__(
        self,
        features: tuple[str, ...] = DEFAULT_FEATURES,
        n_trees: int = 25,
        height: int = 10,
        window_size: int = 1000,
        seed: int | None = 42,
        scale: bool = True,
        limits: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.features = tuple(features)
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.seed = seed
        self.scale = scale
        # Feature ranges the trees split when ``scale`` is False (default (0, 1) each).
        self.limits = dict(limits or {})
        self._engine = HSTEngine(
            self.features,
            n_trees=n_trees,
            height=height,
            window_size=window_size,
            limits=None if scale else self.limits,
            seed=seed,
        )
        self._scaler = RunningMinMax(len(self.features)) if scale else None
        lo_hi = np.array([self.limits.get(f, (0.0, 1.0)) for f in self.features], dtype=np.float64)
        # Imputed value per feature, in the space the trees see.
        self._impute = np.full(len(self.features), 0.5) if scale else lo_hi.mean(axis=1)

    # -- scoring -----------------------------------------------------------------------------

    def _inputs(self, X: np.ndarray, learn: np.ndarray) -> tuple[np.ndarray, np.ndarray, MinMaxState | None]:
        """Values to score and to learn per event (scaled, imputed), and the next scaler state."""
        missing = ~np.isfinite(X)
        if self._scaler is None:
            X_score = np.where(missing, self._impute, X)
            return X_score, X_score, None
        X_score, X_learn, scaler_state = self._scaler.transform(X, learn)
        return self._imputed(X_score, missing), self._imputed(X_learn, missing), scaler_state

    def _imputed(self, scaled: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Missing values, and values whose range is still unknown (NaN), go to mid-range."""
        return np.where(missing | ~np.isfinite(scaled), self._impute, scaled)

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        learn = np.asarray(learn, dtype=bool)
        X = batch.matrix(self.features)
        X_score, X_learn, scaler_state = self._inputs(X, learn)
        scores, engine_state = self._engine.score_and_learn(X_score, learn, X_learn)
        details = {
            "warming_up": self._engine.in_first_window(learn),
            "n_imputed": (~np.isfinite(X)).sum(axis=1),
        }
        return Step(
            scores=scores,
            details=details,
            next_state=_NextState(engine=engine_state, scaler=scaler_state, scaled=X_score),
        )

    def commit(self, step: Step) -> None:
        state: _NextState = step.next_state
        self._engine.commit(state.engine)
        if self._scaler is not None and state.scaler is not None:
            self._scaler.commit(state.scaler)

    # -- explanations ------------------------------------------------------------------------

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        score = float(step.scores[i])
        warming = bool(step.details["warming_up"][i])
        missing = [f for f in self.features if not np.isfinite(batch.column(f)[i])]
        scaled = step.next_state.scaled[i]
        details: dict[str, Any] = {
            "mass_score": score,
            "warming_up": warming,
            "window_size": self.window_size,
            "imputed": missing,
        }
        if warming:
            reasons = [f"half-space trees still learning their first window of {self.window_size} events"]
        else:
            reasons = [f"isolated quickly by the half-space trees (mass score {score:.2f})"]
        if self.scale:
            outside = self._outside_range(scaled, missing)
            details["outside_learned_range"] = {f: float(v) for f, v in outside}
            reasons += [f"{f} {'above' if v > 1 else 'below'} its learned range (scaled {v:.2f})" for f, v in outside]
        if missing:
            reasons.append(f"missing {', '.join(missing)} imputed at mid-range")
        return Explanation(details=details, reasons=reasons)

    def _outside_range(self, scaled: np.ndarray, missing: list[str]) -> list[tuple[str, float]]:
        """Features scaled outside [0, 1], i.e. beyond every value learned so far."""
        return [(f, float(v)) for f, v in zip(self.features, scaled, strict=True) if f not in missing and (v < 0.0 or v > 1.0)]

    # -- persistence -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """Hyperparameters a snapshot must agree with to be restored (the seed is not needed:
        the trees travel in the snapshot)."""
        return {
            "features": list(self.features),
            "n_trees": self.n_trees,
            "height": self.height,
            "window_size": self.window_size,
            "scale": self.scale,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "name": self.name,
            "config": self._config(),
            "engine": self._engine.state_dict(),
            "scaler": None if self._scaler is None else self._scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != self.state_version:
            version = state.get("version") if isinstance(state, dict) else None
            raise StateError(f"hst state version {version!r} != {self.state_version}")
        if state.get("config") != self._config():
            raise StateError(f"hst snapshot config {state.get('config')!r} does not match {self._config()!r}")
        # A missing engine reads as an empty one, which the engine refuses with a StateError.
        engine = HSTEngine.from_state_dict(state.get("engine", {}))
        expected = (self.features, self.n_trees, self.height, self.window_size)
        if (engine.feature_names, engine.n_trees, engine.height, engine.window_size) != expected:
            raise StateError("hst snapshot engine does not match its config")
        scaler = None
        if self.scale:
            scaler = RunningMinMax(len(self.features))
            if state.get("scaler") is None:
                raise StateError("hst snapshot has no scaler state")
            scaler.load_state_dict(state["scaler"])
        # Only replace the live state once everything loaded.
        self._engine, self._scaler = engine, scaler
