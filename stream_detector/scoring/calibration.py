"""Turn a detector's raw scores into tail probabilities, in the spirit of SPOT.

A calibrator keeps the last ``window`` raw scores. Every ``refresh`` events it refits: the
body of the distribution is the empirical survival function of the window, and the tail
above the ``tail_quantile`` is a generalised Pareto distribution fitted to the exceedances
(method of moments), so probabilities far below 1/window remain meaningful.

Probabilities are floored at ``MIN_PROBABILITY`` (1e-12), which is what the decisions use; their
natural logs are not floored (``transform_with_log``): they rank events far beyond the floor, a
6-sigma and a 60-sigma score apart, for the surprise of each record (scoring/fusion.py).

Like the detectors, a calibrator is sequential and pure until committed: event ``i`` is
calibrated with the fit of the last refresh point at or before it, counted in events, so the
result does not depend on how the stream was cut into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from stream_detector.errors import StateError
from stream_detector.scoring import calibration_kernel

if TYPE_CHECKING:
    from stream_detector.scoring.shared_calibration import SharedFit

# Floor for probabilities: a score beyond a bounded tail is "extremely unlikely", not impossible.
# The decisions use floored probabilities; the log probabilities (the surprise) are not floored.
MIN_PROBABILITY = 1e-12
MIN_EXCEEDANCES = 10
# Relative difference below which two raw scores are the same score.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class TailFit:
    """A fitted survival function; ``ready`` is False while there is too little data."""

    ready: bool
    reference: np.ndarray  # sorted window
    threshold: float = 0.0
    tail_fraction: float = 0.0
    shape: float = 0.0  # GPD xi
    scale: float = 1.0  # GPD sigma

    def survival(self, scores: np.ndarray) -> np.ndarray:
        """P(normal raw score >= s) for each s, at least ``MIN_PROBABILITY``."""
        return self.log_survival(scores)[0]

    def log_survival(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``survival(scores)`` and its natural log, which is not floored at ``MIN_PROBABILITY``
        (finite, and ordered like the probability: calibration_kernel.survival)."""
        if not self.ready:
            return np.ones(len(scores)), np.zeros(len(scores))
        # Scores equal up to float rounding count as ties (TIE_TOLERANCE): the same event
        # scored in batches of other sizes can differ in the last bits, and must not move past
        # a tie.
        return calibration_kernel.survival(
            np.ascontiguousarray(scores, dtype=np.float64),
            self.reference,
            self.threshold,
            self.tail_fraction,
            self.shape,
            self.scale,
            TIE_TOLERANCE,
            MIN_PROBABILITY,
        )


def fit_tail(window: np.ndarray, tail_quantile: float) -> TailFit:
    """Fit the tail above the ``tail_quantile`` of ``window`` with a GPD, from quantiles.

    The shape and scale come from the median and upper quartile of the exceedances (a
    Pickands-type estimator) rather than their moments: a few anomalies that slipped into the
    window cannot fatten the tail and hide the next ones.
    """
    return fit_sorted_tail(np.sort(window), tail_quantile)


def fit_sorted_tail(reference: np.ndarray, tail_quantile: float) -> TailFit:
    """``fit_tail`` of a window that is already sorted."""
    m = len(reference)
    threshold = float(reference[min(int(tail_quantile * m), m - 1)])
    excess = reference[reference > threshold] - threshold
    if len(excess) < MIN_EXCEEDANCES:
        # No spread in the tail (e.g. a detector still emitting constant scores): not usable.
        return TailFit(ready=False, reference=reference)
    q50, q75 = (float(v) for v in np.quantile(excess, [0.5, 0.75]))
    if q50 <= 0 or q75 <= q50:
        return TailFit(ready=False, reference=reference)
    # GPD quantiles: Q(u) = sigma/xi ((1-u)^-xi - 1)  =>  Q(.75)/Q(.5) = 2^xi + 1.
    shape = float(np.clip(np.log2(max(q75 / q50 - 1.0, 1e-9)), -0.5, 0.5))
    scale = q50 * shape / (2.0**shape - 1.0) if abs(shape) > 1e-9 else q50 / np.log(2.0)
    return TailFit(True, reference, threshold, len(excess) / m, shape, scale)


@dataclass
class _CalibratorState:
    # Ring of the last ``window + refresh`` learned scores (score number ``s`` at ``s % len``):
    # the window, plus the scores that left it since the last refit, which the next refit takes
    # out of the fit's sorted window.
    buffer: np.ndarray
    seen: int  # scores seen in total
    fit: TailFit
    # The ``seen`` at which ``fit.reference`` was the sorted window; -1: not known (no fit yet,
    # or restored from a format-1 snapshot), and the next refit sorts the window anew.
    fit_seen: int = -1


class ScoreCalibrator(Protocol):
    """What the pipeline needs of a detector's calibrator: ``Calibrator``, or ``PassThrough``
    for a detector whose raw scores are probabilities already. Pure until committed, like a
    detector: ``transform`` returns the probabilities and the state ``commit`` adopts;
    ``transform_with_log`` also their natural logs, not floored at ``MIN_PROBABILITY``."""

    @property
    def ready(self) -> bool: ...

    def transform(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, Any]: ...

    def transform_with_log(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]: ...

    def commit(self, state: Any) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Calibrator:
    """Streaming raw-score -> tail-probability calibration for one detector."""

    # 1: a ring of ``window`` scores and the fit's sorted window in full (``fit_reference``);
    #    still read.
    # 2: a ring of ``window + refresh`` scores and the position of the fit (``fit_seen``): the
    #    fit's window is still in the ring, so its sorted copy is not stored.
    state_version = 2
    readable_state_versions = (1, 2)

    def __init__(self, window: int = 20_000, refresh: int = 1_000, min_events: int = 2_000, tail_quantile: float = 0.98):
        self.window = window
        self.refresh = refresh
        self.min_events = min_events
        self.tail_quantile = tail_quantile
        self.capacity = window + refresh
        self._state = _CalibratorState(np.zeros(self.capacity), 0, TailFit(False, np.zeros(0)))
        # (state, [(seen, learned raw scores of the batch up to the refresh, fit)]) of the last
        # transform: the pipeline's rounds transform the same batch again, and a refit whose
        # window is unchanged (same state, same scores before it) gives the same fit.
        self._fit_cache: tuple[_CalibratorState, list[tuple[int, np.ndarray, TailFit]]] | None = None
        # The fit over every partition's window (scoring/shared_calibration.py), set by the
        # daemon and backtest on each partition's pipeline: scores are calibrated with it once it
        # is ready, and this calibrator's own window still learns (it is what the partition
        # contributes). Not saved: it is rebuilt from the population topic.
        self.shared: SharedFit | None = None
        calibration_kernel.warm_up()

    @property
    def ready(self) -> bool:
        return self._state.fit.ready or self._shared_fit() is not None

    @property
    def seen(self) -> int:
        """Scores learned in total."""
        return self._state.seen

    def sorted_window(self) -> np.ndarray:
        """The reference window as of now, sorted (what this calibrator contributes to a shared fit)."""
        s = self._state
        if s.fit.ready and s.fit_seen == s.seen:
            return s.fit.reference
        return self._sorted_window(s.buffer, s.seen, s.fit, s.fit_seen)

    def _shared_fit(self) -> TailFit | None:
        return None if self.shared is None else self.shared.fit()

    def transform(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, _CalibratorState]:
        """Tail probabilities for ``raw`` (in order) and the state after seeing them.

        Only scores of events that may be learned (not flagged) enter the reference window,
        as in SPOT: alarms would otherwise fatten the fitted tail and hide the next ones.
        """
        out, _, state = self.transform_with_log(raw, learn)
        return out, state

    def transform_with_log(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, _CalibratorState]:
        """``transform``, with the natural log of each tail probability (not floored)."""
        n = len(raw)
        learn = np.ones(n, dtype=bool) if learn is None else np.asarray(learn, dtype=bool)
        state = self._state
        buffer = state.buffer.copy()
        seen, fit, fit_seen = state.seen, state.fit, state.fit_seen
        out = np.empty(n)
        log_out = np.empty(n)
        # Learned events counted from the batch start: refresh points fall on multiples of
        # ``refresh`` learned events, wherever the batch boundaries are.
        learned_before = np.cumsum(learn) - learn
        cache = self._fit_cache
        previous = cache[1] if cache is not None and cache[0] is state else []
        fits: list[tuple[int, np.ndarray, TailFit]] = []
        # Fixed for the batch: the shared fit changes only between batches.
        shared = self._shared_fit()
        start = 0
        while start < n:
            to_refresh = self.refresh - (seen % self.refresh)
            # The segment ends right after the learned event that completes ``refresh``.
            done = learned_before[start]
            stop = int(np.searchsorted(learned_before, done + to_refresh, side="left"))
            out[start:stop], log_out[start:stop] = (shared or fit).log_survival(raw[start:stop])
            taken = raw[start:stop][learn[start:stop]]
            _ring_write(buffer, seen, taken)
            seen += len(taken)
            if len(taken) and seen % self.refresh == 0 and seen >= self.min_events:
                so_far = raw[:stop][learn[:stop]]
                k = len(fits)
                if k < len(previous) and previous[k][0] == seen and np.array_equal(previous[k][1], so_far):
                    fit = previous[k][2]
                else:
                    fit = fit_sorted_tail(self._sorted_window(buffer, seen, fit, fit_seen), self.tail_quantile)
                fits.append((seen, so_far, fit))
                fit_seen = seen
            start = stop
        self._fit_cache = (state, fits)
        return out, log_out, _CalibratorState(buffer, seen, fit, fit_seen)

    def _sorted_window(self, buffer: np.ndarray, seen: int, fit: TailFit, fit_seen: int) -> np.ndarray:
        """The window after ``seen`` scores, sorted: the last fit's sorted window slid forward by
        the scores that entered and left it since (linear; both are still in the ring), or a
        full sort when that fit is unknown. Both give the same array (the window's sorted
        multiset)."""
        since = seen - fit_seen
        if fit_seen >= 0 and 0 < since <= self.refresh and len(fit.reference) == min(fit_seen, self.window):
            added = _ring_read(buffer, fit_seen, seen)
            removed = _ring_read(buffer, max(0, fit_seen - self.window), max(0, seen - self.window))
            ok, reference = calibration_kernel.replace_sorted(fit.reference, np.sort(removed), np.sort(added))
            if ok and len(reference) == min(seen, self.window):
                return reference
        return np.sort(_ring_read(buffer, max(0, seen - self.window), seen))

    def commit(self, state: _CalibratorState) -> None:
        self._state = state
        self._fit_cache = None

    def state_dict(self) -> dict:
        """The ring and the position of the fit in force, so a restore continues exactly."""
        s = self._state
        out = {"version": self.state_version, "window": self.window, "buffer": s.buffer.copy(), "seen": s.seen}
        if not s.fit.ready:
            return {**out, "fit_seen": None, "fit_reference": None}
        if s.fit_seen >= 0 and s.seen - s.fit_seen <= self.refresh:
            return {**out, "fit_seen": s.fit_seen, "fit_reference": None}  # its window is in the ring
        return {**out, "fit_seen": None, "fit_reference": s.fit.reference.copy()}  # restored from format 1

    def load_state_dict(self, state: dict) -> None:
        """Restore a format-1 or format-2 state (also after ``refresh`` changed: the ring is
        re-laid for this calibrator's capacity); ``StateError`` if it does not fit."""
        if state.get("version") not in self.readable_state_versions or state.get("window") != self.window:
            raise StateError("calibrator state does not match this configuration (version or window)")
        try:
            self._load(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"calibrator state is malformed: {exc!r}") from None

    def _load(self, state: dict) -> None:
        stored = np.array(state["buffer"], dtype=np.float64)
        seen = int(state["seen"])
        if stored.ndim != 1 or len(stored) < self.window or seen < 0:
            raise StateError(f"calibrator state has a buffer of shape {stored.shape} and seen={seen}")
        kept_from = max(0, seen - min(len(stored), self.capacity))
        buffer = np.zeros(self.capacity)
        _ring_write(buffer, kept_from, _ring_read(stored, kept_from, seen))
        fit_seen = state.get("fit_seen")
        reference = state.get("fit_reference")
        if fit_seen is not None:
            fit_seen = int(fit_seen)
            if not (0 < fit_seen <= seen and max(0, fit_seen - self.window) >= seen - len(stored)):
                raise StateError(f"calibrator state: a fit at {fit_seen} is not in the ring of {len(stored)} scores at seen={seen}")
            fit = fit_tail(_ring_read(stored, max(0, fit_seen - self.window), fit_seen), self.tail_quantile)
            self._state = _CalibratorState(buffer, seen, fit, fit_seen)
            return
        if reference is not None:
            reference = np.array(reference, dtype=np.float64)
            if reference.ndim != 1 or not 0 < len(reference) <= self.window:
                raise StateError(f"calibrator state has a fit reference of shape {reference.shape}")
        fit = TailFit(False, np.zeros(0)) if reference is None else fit_tail(reference, self.tail_quantile)
        self._state = _CalibratorState(buffer, seen, fit)


def _ring_read(buffer: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Scores number ``start .. stop - 1`` of the ring (the caller knows they are still in it)."""
    return buffer[np.arange(start, stop) % len(buffer)]


def _ring_write(buffer: np.ndarray, seen: int, values: np.ndarray) -> None:
    """Write ``values`` into the ring buffer after ``seen`` earlier scores."""
    window = len(buffer)
    skip = max(0, len(values) - window)
    positions = (seen + skip + np.arange(len(values) - skip)) % window
    buffer[positions] = values[skip:]


class PassThrough:
    """For detectors whose raw score is already 1 - tail probability (e.g. exact duplicates).
    Such a score holds no probability below float rounding, so the log is that of the floored
    probability."""

    ready = True

    def transform(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, None]:
        return np.clip(1.0 - raw, MIN_PROBABILITY, 1.0), None

    def transform_with_log(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, None]:
        p, state = self.transform(raw, learn)
        return p, np.log(p), state

    def commit(self, state: None) -> None:
        return None

    def state_dict(self) -> dict:
        return {"version": 1}

    def load_state_dict(self, state: dict) -> None:
        return None
