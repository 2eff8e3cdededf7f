"""Calibration shared by every partition of the input topic (issue 20, docs/architecture.md).

A calibrator is population state: it says how rare a raw score is among normal events, which
does not depend on the partition an event came through. Fitted per partition, each sees 1/P of
the scores: with 12 partitions no detector alerts until each partition has scored
``calibration_min_events`` events of its own (2 of 12 never do in the generator's 60,000-event
stream), and the tails rest on 1/P of the data. So every partition publishes a summary of its
reference window, and every partition calibrates with one fit over all the summaries.

A summary is a weighted quantile sketch of the window: ``SUMMARY_POINTS`` order statistics,
half of them from the body and half from the top ``TAIL_SHARE`` (where the tail fit looks; its
highest quarter exact), each weighted by the scores it stands for. Summaries merge by concatenation; the merged fit is
``fit_sorted_tail`` over ``calibration_window`` weighted quantiles of the merge. A summary is
cumulative (a partition's whole window, not a delta), so one sent twice, or one missed, does no
harm: the next replaces it.

One partition alone keeps its own fit (``SharedFit.fit`` needs two sources), so a topic of one
partition, ``replay`` and ``evaluate`` score exactly as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from stream_detector.errors import StateError
from stream_detector.scoring.calibration import Calibrator, TailFit, fit_sorted_tail
from stream_detector.state import codec

SUMMARY_FORMAT = 1
# Points per detector in a summary: half for the body, half for the tail.
SUMMARY_POINTS = 1_000
# The share of a window counted as its tail: above ``tail_quantile`` (0.95 by default) with a
# margin, so the merged threshold falls among tail points.
TAIL_SHARE = 0.10
# A summary larger than this is refused (a hostile or foreign record cannot cost memory).
MAX_RECORD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class WindowSummary:
    """One partition's reference window for one detector: sorted ``values``, each standing for
    ``weights`` scores; ``count`` scores in all, ``seen`` learned since the partition started."""

    values: np.ndarray
    weights: np.ndarray
    count: int
    seen: int


def summarize(sorted_window: np.ndarray, seen: int, points: int = SUMMARY_POINTS) -> WindowSummary:
    """A summary of a sorted window: exact when it has at most ``points`` scores."""
    m = len(sorted_window)
    if m <= points:
        return WindowSummary(sorted_window.copy(), np.ones(m), m, seen)
    split = m - max(1, int(np.ceil(TAIL_SHARE * m)))
    half = points // 2
    # The highest scores travel exactly: a quantile point would stand for the largest few.
    exact = min(m - split, (points - half) // 2)
    parts = [
        _quantile_points(sorted_window[:split], half),
        _quantile_points(sorted_window[split : m - exact], points - half - exact),
        (sorted_window[m - exact :].copy(), np.ones(exact)),
    ]
    return WindowSummary(np.concatenate([v for v, _ in parts]), np.concatenate([w for _, w in parts]), m, seen)


def _quantile_points(sorted_values: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """``points`` order statistics of ``sorted_values`` (all of them when fewer), each weighted by
    the scores of its share of the ranks."""
    n = len(sorted_values)
    if n <= points:
        return sorted_values.copy(), np.ones(n)
    ranks = ((np.arange(points) + 0.5) * n / points).astype(np.int64)
    return sorted_values[ranks], np.full(points, n / points)


def merged_window(summaries: list[WindowSummary], size: int) -> np.ndarray:
    """A sorted pseudo-window of ``size`` scores distributed as the union of the summaries'
    windows: the weighted quantiles at ``size`` evenly spaced levels, each point of a summary
    placed at the middle of the ranks it stands for and the ranks between them interpolated
    (a step function would move the tail fit's quantiles by a point's weight)."""
    values = np.concatenate([s.values for s in summaries])
    weights = np.concatenate([s.weights for s in summaries])
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    centres = np.cumsum(weights) - weights / 2
    levels = (np.arange(size) + 0.5) * (centres[-1] + weights[-1] / 2) / size
    return np.interp(levels, centres, values)


class SharedFit:
    """One detector's fit over every partition's summary (local and remote), refitted at every
    new summary while it is not ready; then once the partitions have learned ``refresh`` more
    scores in all (as one calibrator over the whole stream refits). A refit over 12 to 48
    summaries costs 1 to 3 ms per detector on every instance; refitting less often was tried
    and cost precision (docs/architecture.md)."""

    def __init__(self, window: int, refresh: int, min_events: int, tail_quantile: float) -> None:
        self.window = window
        self.refresh = refresh
        self.min_events = min_events
        self.tail_quantile = tail_quantile
        self.summaries: dict[str, WindowSummary] = {}
        self._fit: TailFit | None = None
        self._stale = False
        self._fitted_seen = 0  # the partitions' scores learned in all at the last refit

    def put(self, source: str, summary: WindowSummary) -> None:
        self.summaries[source] = summary
        self._stale = True

    @property
    def ready(self) -> bool:
        """As of the last refit (``fit`` may refit)."""
        return self._fit is not None

    def fit(self) -> TailFit | None:
        """The merged fit, or None while fewer than two partitions have scores or they hold
        fewer than ``min_events`` in all (each partition then uses its own fit)."""
        if not self._stale:
            return self._fit
        seen = sum(s.seen for s in self.summaries.values())
        if self._fit is not None and 0 <= seen - self._fitted_seen < self.refresh:
            return self._fit
        self._stale, self._fitted_seen = False, seen
        usable = [s for s in self.summaries.values() if s.count]
        self._fit = None
        if len(usable) >= 2 and sum(s.count for s in usable) >= self.min_events:
            fit = fit_sorted_tail(merged_window(usable, self.window), self.tail_quantile)
            self._fit = fit if fit.ready else None
        return self._fit


class CalibrationPool:
    """The shared fits of one process, one per calibrated detector, fed with the summaries of
    the partitions it owns (``contribute``, after their batches) and of those other instances
    own (``receive``, from the population topic).

    A partition's summary is taken again each time its calibrators have learned another
    ``refresh`` scores, and while the shared fits are not ready, every ``refresh / partitions``
    (so the partitions together warm them up as fast as one calibrator over the whole stream:
    a lag of 10,000 events before the first exchange cost 0.12 of recall in
    bench/quality_at_scale.py, sim G). ``outbox`` holds the latest of each partition not yet
    published."""

    def __init__(self, window: int, refresh: int, min_events: int, tail_quantile: float, fingerprint: str = "") -> None:
        self.refresh = refresh
        self.fingerprint = fingerprint
        self._params = (window, refresh, min_events, tail_quantile)
        self.fits: dict[str, SharedFit] = {}
        self.outbox: dict[str, bytes] = {}
        self._taken: dict[str, int] = {}  # source -> its scores learned at its last summary

    @classmethod
    def from_settings(cls, settings: Any) -> CalibrationPool:
        s = settings.scoring
        return cls(s.calibration_window, s.calibration_refresh, s.calibration_min_events, s.tail_quantile, scoring_fingerprint(settings))

    def shared(self, detector: str) -> SharedFit:
        fit = self.fits.get(detector)
        if fit is None:
            fit = self.fits[detector] = SharedFit(*self._params)
        return fit

    def attach(self, pipeline: Any) -> None:
        """Make ``pipeline``'s calibrators score with the shared fits (a copied pipeline keeps a
        copy of them: attach every pipeline the process scores with)."""
        for name, calibrator in pipeline.calibrators.items():
            if isinstance(calibrator, Calibrator):
                calibrator.shared = self.shared(name)

    def contribute(self, source: str, pipeline: Any) -> bool:
        """Take ``source``'s summaries if its calibrators learned enough more scores since the
        last (class docstring); True if it did (the record is then in ``outbox``)."""
        calibrators = {n: c for n, c in pipeline.calibrators.items() if isinstance(c, Calibrator)}
        if not calibrators:
            return False
        seen = max(c.seen for c in calibrators.values())
        last = self._taken.get(source)
        step = self.refresh if self.ready() else max(1, self.refresh // max(1, self.sources()))
        if seen == 0 or (last is not None and 0 <= seen - last < step):
            return False  # (fewer scores than last time: rewound to a checkpoint, take it again)
        self._taken[source] = seen
        summaries = {name: summarize(c.sorted_window(), c.seen) for name, c in calibrators.items()}
        for name, summary in summaries.items():
            self.shared(name).put(source, summary)
        self.outbox[source] = encode_summaries(self.fingerprint, summaries)
        return True

    def receive(self, source: str, value: bytes | None) -> None:
        """A record of the population topic (``StateError`` if it cannot be used)."""
        fingerprint, summaries = decode_summaries(value)
        if fingerprint != self.fingerprint:
            raise StateError("summary of another scoring configuration", reason="incompatible")
        for name, summary in summaries.items():
            self.shared(name).put(source, summary)
        if summaries:
            # Where the partition's next summary is due, should it be (or become) ours: a
            # restarted instance goes on at the same points rather than sending every partition's
            # summary at once, which measurably changed the shared fit's refits
            # (evaluate --restart-every: 63 false positives against 29 without a restart).
            self._taken[source] = max(s.seen for s in summaries.values())

    def forget(self, source: str) -> None:
        """A partition this process gave up: its summary stays (still a valid sample) until
        its new owner sends the next, and so does when its next one is due (the new owner's
        summaries, read back, move it on); an unsent summary is dropped."""
        self.outbox.pop(source, None)

    def take_outbox(self) -> dict[str, bytes]:
        out, self.outbox = self.outbox, {}
        return out

    def sources(self) -> int:
        return len({source for fit in self.fits.values() for source in fit.summaries})

    def ready(self) -> bool:
        """Every shared fit ready (as of its last refit)."""
        return bool(self.fits) and all(fit.ready for fit in self.fits.values())


def scoring_fingerprint(settings: Any) -> str:
    """A digest of what gives raw scores their scale (the detectors' and calibration settings
    and the schema): summaries from another configuration are not mixed in."""
    parts = settings.model_dump(mode="json", include={"zscore", "duplicates", "river", "autoencoder", "scoring", "schema_"})
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def encode_summaries(fingerprint: str, summaries: dict[str, WindowSummary]) -> bytes:
    return codec.encode(
        {
            "format": SUMMARY_FORMAT,
            "fingerprint": fingerprint,
            # float32 on the wire: a sketch needs no more, and it halves the population topic.
            "detectors": {
                n: {"values": s.values.astype(np.float32), "weights": s.weights.astype(np.float32), "count": s.count, "seen": s.seen}
                for n, s in summaries.items()
            },
        }
    )


def decode_summaries(value: bytes | None) -> tuple[str, dict[str, WindowSummary]]:
    """The fingerprint and summaries of a record; ``StateError`` if malformed."""
    if value is None or len(value) > MAX_RECORD_BYTES:
        raise StateError(f"summary record empty or larger than {MAX_RECORD_BYTES} bytes", reason="corrupt")
    try:
        doc = codec.decode(value)
    except StateError as exc:
        raise StateError(f"summary record is not readable: {exc}", reason="corrupt") from None
    try:
        if doc.get("format") != SUMMARY_FORMAT:
            raise StateError(f"summary format {doc.get('format')!r}", reason="unsupported_format")
        out = {}
        for name, s in doc["detectors"].items():
            values = np.asarray(s["values"], dtype=np.float64)
            weights = np.asarray(s["weights"], dtype=np.float64)
            count, seen = int(s["count"]), int(s["seen"])
            if values.ndim != 1 or values.shape != weights.shape or len(values) > 2 * SUMMARY_POINTS:
                raise ValueError(f"{name}: {values.shape} values and {weights.shape} weights")
            if not (np.isfinite(values).all() and np.isfinite(weights).all() and (weights > 0).all() and np.all(np.diff(values) >= 0)):
                raise ValueError(f"{name}: values not finite and sorted, or weights not positive")
            if not 0 <= count <= seen or abs(float(weights.sum()) - count) > 1e-4 * max(count, 1) + 1e-4:
                raise ValueError(f"{name}: count {count}, seen {seen}, weights sum {weights.sum()}")
            out[str(name)] = WindowSummary(values, weights, count, seen)
        return str(doc["fingerprint"]), out
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"summary record is malformed: {exc}", reason="corrupt") from None
