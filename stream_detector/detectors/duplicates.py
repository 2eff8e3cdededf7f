"""Exact duplicates: an event equal to a recent one in every field but ``event_id``.

Re-sent sales (a POS retry, a double submit) carry a new id but the same store, product,
customer, amount and timestamp. The detector remembers fingerprints of learned events for
``window_seconds`` of event time (at most ``max_entries``, oldest dropped first).

Its raw score is already ``1 - tail probability``: ``1 - probability`` for a duplicate, 0
otherwise, so it bypasses calibration (``outputs_probability``).

A remembered fingerprint counts while it is within ``window_seconds`` of both the event being
scored and the newest learned event time, checked per event, so the answer does not depend on
batch boundaries even when event time goes backwards. ``max_entries`` is a memory cap applied
when a batch is committed (oldest first): it is the one part that is batch-granular.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch


class DuplicateDetector(Detector):
    name = "duplicates"
    state_version = 1
    outputs_probability = True

    def __init__(self, window_seconds: float = 3600.0, max_entries: int = 1_000_000, probability: float = 1e-9) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.probability = probability
        # fingerprint -> event time of the last learned event with it (insertion-ordered).
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._newest = -np.inf  # latest learned event time

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        n = batch.n
        prints = batch.fingerprints.tolist() if len(batch.fingerprints) == n else [None] * n
        times = batch.event_time.tolist()
        learn_list = np.asarray(learn, dtype=bool).tolist()
        seen = self._seen
        in_batch: dict[int, float] = {}
        is_dup = np.zeros(n, dtype=bool)
        first_time = np.full(n, np.nan)
        newest = self._newest
        window = self.window_seconds
        for i, (fp, t) in enumerate(zip(prints, times)):
            if fp is None:
                continue
            earlier = in_batch.get(fp, seen.get(fp))
            if earlier is not None and t - earlier <= window and earlier >= newest - window:
                is_dup[i] = True
                first_time[i] = earlier
            if learn_list[i]:
                in_batch[fp] = t
                newest = max(newest, t)
        scores = np.where(is_dup, 1.0 - self.probability, 0.0)
        return Step(scores=scores, details={"first_seen": first_time}, next_state=(in_batch, newest))

    def commit(self, step: Step) -> None:
        seen = self._seen
        learned, self._newest = step.next_state
        for fp, t in learned.items():
            seen.pop(fp, None)
            seen[fp] = t
        self._expire()

    def _expire(self) -> None:
        """Drop the oldest entries past the window or the cap (the presence check is exact anyway)."""
        seen = self._seen
        horizon = self._newest - self.window_seconds
        while seen and (len(seen) > self.max_entries or next(iter(seen.values())) < horizon):
            seen.popitem(last=False)

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        first = step.details["first_seen"][i]
        if np.isnan(first):
            return Explanation(details={"duplicate": False}, reasons=[])
        gap = float(batch.event_time[i] - first)
        return Explanation(
            details={"duplicate": True, "seconds_since_original": gap},
            reasons=[f"exact duplicate of an event seen {gap:.0f} s earlier (all fields equal but event_id)"],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.state_version,
            "fingerprints": np.fromiter(self._seen.keys(), dtype=np.uint64, count=len(self._seen)),
            "times": np.fromiter(self._seen.values(), dtype=np.float64, count=len(self._seen)),
            "newest": self._newest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version:
            raise StateError(f"duplicates state version {state.get('version')!r}, expected {self.state_version}")
        self._seen = OrderedDict(zip(np.asarray(state["fingerprints"]).tolist(), np.asarray(state["times"]).tolist()))
        self._newest = float(state["newest"])
