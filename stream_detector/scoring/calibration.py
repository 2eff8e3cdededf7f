"""Turn a detector's raw scores into tail probabilities, in the spirit of SPOT.

A calibrator keeps the last ``window`` raw scores. Every ``refresh`` events it refits: the
body of the distribution is the empirical survival function of the window, and the tail
above the ``tail_quantile`` is a generalised Pareto distribution fitted to the exceedances
(method of moments), so probabilities far below 1/window remain meaningful.

Like the detectors, a calibrator is sequential and pure until committed: event ``i`` is
calibrated with the fit of the last refresh point at or before it, counted in events, so the
result does not depend on how the stream was cut into batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_detector.errors import StateError
from stream_detector.scoring import calibration_kernel

# Floor for probabilities: a score beyond a bounded tail is "extremely unlikely", not impossible.
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
        """P(normal raw score >= s) for each s."""
        if not self.ready:
            return np.ones(len(scores))
        # Scores equal up to float rounding count as ties (TIE_TOLERANCE): the same event
        # scored in batches of other sizes can differ in the last bits, and must not move past
        # a tie.
        return calibration_kernel.survival(
            np.ascontiguousarray(scores, dtype=np.float64), self.reference, self.threshold, self.tail_fraction,
            self.shape, self.scale, TIE_TOLERANCE, MIN_PROBABILITY,
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
    buffer: np.ndarray  # ring buffer of raw scores
    seen: int  # scores seen in total
    fit: TailFit
    # What the next refit needs to slide the fit's sorted window instead of sorting anew: the
    # ``seen`` at which ``fit.reference`` was the sorted window, and the scores that left the
    # window since (None: not known, e.g. after a restore; the refit then sorts).
    fit_seen: int = -1
    evicted: tuple[np.ndarray, ...] | None = None


class Calibrator:
    """Streaming raw-score -> tail-probability calibration for one detector."""

    # 1: the fit's sorted window in full (``fit_reference``); still read.
    # 2: where it can be rebuilt, the position of the fit and the scores that left the window
    #    since (at most ``refresh``) instead: the rest of that window is still in the buffer.
    state_version = 2
    readable_state_versions = (1, 2)

    def __init__(self, window: int = 20_000, refresh: int = 1_000, min_events: int = 2_000, tail_quantile: float = 0.98):
        self.window = window
        self.refresh = refresh
        self.min_events = min_events
        self.tail_quantile = tail_quantile
        self._state = _CalibratorState(np.zeros(window), 0, TailFit(False, np.zeros(0)))
        # (state, [(seen, learned raw scores of the batch up to the refresh, fit)]) of the last
        # transform: the pipeline's rounds transform the same batch again, and a refit whose
        # window is unchanged (same state, same scores before it) gives the same fit.
        self._fit_cache: tuple[_CalibratorState, list[tuple[int, np.ndarray, TailFit]]] | None = None
        calibration_kernel.warm_up()

    @property
    def ready(self) -> bool:
        return self._state.fit.ready

    def transform(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, _CalibratorState]:
        """Tail probabilities for ``raw`` (in order) and the state after seeing them.

        Only scores of events that may be learned (not flagged) enter the reference window,
        as in SPOT: alarms would otherwise fatten the fitted tail and hide the next ones.
        """
        n = len(raw)
        learn = np.ones(n, dtype=bool) if learn is None else np.asarray(learn, dtype=bool)
        state = self._state
        buffer = state.buffer.copy()
        seen, fit, fit_seen = state.seen, state.fit, state.fit_seen
        evicted = None if state.evicted is None else list(state.evicted)
        out = np.empty(n)
        # Learned events counted from the batch start: refresh points fall on multiples of
        # ``refresh`` learned events, wherever the batch boundaries are.
        learned_before = np.cumsum(learn) - learn
        cache = self._fit_cache
        previous = cache[1] if cache is not None and cache[0] is state else []
        fits: list[tuple[int, np.ndarray, TailFit]] = []
        start = 0
        while start < n:
            to_refresh = self.refresh - (seen % self.refresh)
            # The segment ends right after the learned event that completes ``refresh``.
            done = learned_before[start]
            stop = int(np.searchsorted(learned_before, done + to_refresh, side="left"))
            out[start:stop] = fit.survival(raw[start:stop])
            taken = raw[start:stop][learn[start:stop]]
            if evicted is not None:
                evicted = _ring_evicted(buffer, seen, len(taken), evicted)
            _ring_write(buffer, seen, taken)
            seen += len(taken)
            if len(taken) and seen % self.refresh == 0 and seen >= self.min_events:
                so_far = raw[:stop][learn[:stop]]
                k = len(fits)
                if k < len(previous) and previous[k][0] == seen and np.array_equal(previous[k][1], so_far):
                    fit = previous[k][2]
                else:
                    fit = fit_sorted_tail(self._sorted_window(buffer, seen, fit, fit_seen, evicted), self.tail_quantile)
                fits.append((seen, so_far, fit))
                fit_seen, evicted = seen, []
            start = stop
        self._fit_cache = (state, fits)
        return out, _CalibratorState(buffer, seen, fit, fit_seen, None if evicted is None else tuple(evicted))

    def _sorted_window(
        self, buffer: np.ndarray, seen: int, fit: TailFit, fit_seen: int, evicted: list[np.ndarray] | None
    ) -> np.ndarray:
        """The window after ``seen`` scores, sorted: the last fit's sorted window slid forward by
        the scores that entered and left it since (linear), or a full sort when that is unknown.
        Both give the same array (the sorted multiset of the window)."""
        window = min(seen, self.window)
        since = seen - fit_seen
        if evicted is not None and fit_seen >= 0 and 0 < since < self.window and len(fit.reference) == min(fit_seen, self.window):
            added = buffer[(fit_seen + np.arange(since)) % self.window]
            removed = np.concatenate(evicted) if evicted else np.zeros(0)
            ok, reference = calibration_kernel.replace_sorted(fit.reference, np.sort(removed), np.sort(added))
            if ok and len(reference) == window:
                return reference
        return np.sort(buffer[:window])

    def commit(self, state: _CalibratorState) -> None:
        self._state = state
        self._fit_cache = None

    def state_dict(self) -> dict:
        """The window and what the fit in force was made from, so a restore continues exactly."""
        s = self._state
        out = {"version": self.state_version, "window": self.window, "buffer": s.buffer.copy(), "seen": s.seen}
        if not s.fit.ready:
            return {**out, "fit_reference": None}
        if s.evicted is not None and s.fit_seen >= 0 and s.seen - s.fit_seen < self.window:
            # The fit's window is what the buffer still holds from before the fit, plus these.
            evicted = np.concatenate(s.evicted) if s.evicted else np.zeros(0)
            return {**out, "fit_reference": None, "fit_seen": s.fit_seen, "fit_evicted": evicted}
        return {**out, "fit_reference": s.fit.reference.copy()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in self.readable_state_versions or state.get("window") != self.window:
            raise StateError("calibrator state does not match this configuration (version or window)")
        buffer = np.array(state["buffer"], dtype=np.float64)
        seen = int(state["seen"])
        if buffer.shape != (self.window,) or seen < 0:
            raise StateError(f"calibrator state has a buffer of shape {buffer.shape} and seen={seen}")
        reference = state.get("fit_reference")
        fit_seen = state.get("fit_seen")
        if fit_seen is not None:
            fit_seen = int(fit_seen)
            evicted = np.asarray(state["fit_evicted"], dtype=np.float64)
            kept = (np.arange(max(0, seen - self.window), fit_seen)) % self.window
            if not 0 <= seen - fit_seen < self.window or len(kept) + len(evicted) != min(fit_seen, self.window):
                raise StateError(f"calibrator state: fit at {fit_seen} with {len(evicted)} evicted scores does not fit seen={seen}")
            fit = fit_tail(np.concatenate([buffer[kept], evicted]), self.tail_quantile)
            self._state = _CalibratorState(buffer, seen, fit, fit_seen, (evicted,))
            return
        fit = TailFit(False, np.zeros(0)) if reference is None else fit_tail(np.asarray(reference), self.tail_quantile)
        self._state = _CalibratorState(buffer, seen, fit)


def _ring_evicted(buffer: np.ndarray, seen: int, count: int, evicted: list[np.ndarray]) -> list[np.ndarray] | None:
    """``evicted`` plus the scores that writing ``count`` more after ``seen`` pushes out of the
    window; None when the write wraps the whole window (the next refit sorts instead)."""
    window = len(buffer)
    if count >= window:
        return None
    first = max(seen, window)  # the first sequence number whose write replaces an older score
    if seen + count > first:
        evicted.append(buffer[(first + np.arange(seen + count - first)) % window])
    return evicted


def _ring_write(buffer: np.ndarray, seen: int, values: np.ndarray) -> None:
    """Write ``values`` into the ring buffer after ``seen`` earlier scores."""
    window = len(buffer)
    skip = max(0, len(values) - window)
    positions = (seen + skip + np.arange(len(values) - skip)) % window
    buffer[positions] = values[skip:]


class PassThrough:
    """For detectors whose raw score is already 1 - tail probability (e.g. exact duplicates)."""

    ready = True

    def transform(self, raw: np.ndarray, learn: np.ndarray | None = None) -> tuple[np.ndarray, None]:
        return np.clip(1.0 - raw, MIN_PROBABILITY, 1.0), None

    def commit(self, state: None) -> None:
        return None

    def state_dict(self) -> dict:
        return {"version": 1}

    def load_state_dict(self, state: dict) -> None:
        return None
