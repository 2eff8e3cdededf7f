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

# Memory of one remembered fingerprint: its OrderedDict node and entry, the int and the float
# (tracemalloc measures about 165 bytes, CPython 3.11), rounded up.
ENTRY_BYTES = 200


class DuplicateDetector(Detector):
    name = "duplicates"
    state_version = 1
    outputs_probability = True
    # Whether a sale is re-sent does not depend on its amount, store or product.
    independent_evidence = True

    def __init__(self, window_seconds: float = 3600.0, max_entries: int = 1_000_000, probability: float = 1e-9) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.probability = probability
        # fingerprint -> event time of the last learned event with it (insertion-ordered).
        self._seen: OrderedDict[int, float] = OrderedDict()
        self._newest = -np.inf  # latest learned event time
        # What score() derives from the fingerprints alone (grouping, remembered times), for the
        # pipeline's rounds on the same batch; dropped at commit.
        self._grouping: tuple[np.ndarray, tuple[np.ndarray, ...]] | None = None

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        """Event by event in meaning, on arrays: each event is compared with the time of the
        last learned event with its fingerprint before it in the batch, else the remembered one,
        and with the newest learned event time before it."""
        n = batch.n
        first_time = np.full(n, np.nan)
        if len(batch.fingerprints) != n or n == 0:  # no fingerprints: nothing to compare or learn
            nothing = (np.zeros(0, dtype=np.uint64), np.zeros(0), np.zeros(0, dtype=np.int64))
            return Step(scores=np.zeros(n), details={"first_seen": first_time}, next_state=(nothing, self._newest))
        prints = batch.fingerprints
        times = batch.event_time
        learn = np.asarray(learn, dtype=bool)
        window = self.window_seconds

        # Newest learned time before each event.
        learned_times = np.where(learn, times, -np.inf)
        newest_before = np.empty(n)
        newest_before[0] = self._newest
        np.maximum(np.maximum.accumulate(learned_times[:-1]), self._newest, out=newest_before[1:])

        order, first_of_group, group, known, values = self._group(prints)
        # Last learned event of the same fingerprint before each event (in batch order).
        last_learned = np.maximum.accumulate(np.where(learn[order], np.arange(n), -1))
        before = np.r_[-1, last_learned[:-1]]
        in_batch = before >= first_of_group
        earlier_sorted = np.where(in_batch, times[order][np.maximum(before, 0)], np.nan)
        # Otherwise the remembered time.
        earlier = np.empty(n)
        has_earlier = np.empty(n, dtype=bool)
        earlier[order] = np.where(in_batch, earlier_sorted, values[group])
        has_earlier[order] = in_batch | known[group]

        with np.errstate(invalid="ignore"):
            is_dup = has_earlier & (times - earlier <= window) & (earlier >= newest_before - window)
        first_time[is_dup] = earlier[is_dup]
        scores = np.where(is_dup, 1.0 - self.probability, 0.0)
        learned_rows = np.flatnonzero(learn)
        newest = max(self._newest, float(times[learned_rows].max())) if learned_rows.size else self._newest
        return Step(scores=scores, details={"first_seen": first_time}, next_state=((prints, times, learned_rows), newest))

    def _group(self, prints: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sort order, group start per sorted row, group per sorted row, and per distinct
        fingerprint whether and when it is remembered (one dict lookup each)."""
        cached = self._grouping
        if cached is not None and cached[0] is prints:
            return cached[1]
        n = len(prints)
        order = np.argsort(prints, kind="stable")
        sorted_prints = prints[order]
        group_start = np.ones(n, dtype=bool)
        group_start[1:] = sorted_prints[1:] != sorted_prints[:-1]
        first_of_group = np.maximum.accumulate(np.where(group_start, np.arange(n), 0))
        remembered = [self._seen.get(fp) for fp in sorted_prints[group_start].tolist()]
        known = np.fromiter((t is not None for t in remembered), dtype=bool, count=len(remembered))
        values = np.fromiter((0.0 if t is None else t for t in remembered), dtype=np.float64, count=len(remembered))
        grouping = (order, first_of_group, np.cumsum(group_start) - 1, known, values)
        self._grouping = (prints, grouping)
        return grouping

    def commit(self, step: Step) -> None:
        seen = self._seen
        (prints, times, rows), self._newest = step.next_state
        self._grouping = None
        # Learned fingerprints in order of first appearance, each with its last learned time
        # (what inserting them one by one into a dict gives).
        learned = dict(zip(prints[rows].tolist(), times[rows].tolist(), strict=True))
        # Re-learned fingerprints move to the back (the newest end) of the insertion order.
        for fp in seen.keys() & learned.keys():
            del seen[fp]
        seen.update(learned)
        self._expire()

    def _expire(self) -> None:
        """Drop the oldest entries past the window or the cap (the presence check is exact anyway)."""
        seen = self._seen
        horizon = self._newest - self.window_seconds
        excess = len(seen) - self.max_entries
        drop = 0
        for t in seen.values():
            if drop < excess or t < horizon:
                drop += 1
            else:
                break
        for _ in range(drop):
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

    def state_bytes(self) -> int:
        return len(self._seen) * ENTRY_BYTES

    def shrink(self, free_bytes: int) -> int:
        """Forget the oldest fingerprints (the window's first to expire anyway)."""
        n = min(len(self._seen), max(0, free_bytes) // ENTRY_BYTES)
        for _ in range(n):
            self._seen.popitem(last=False)
        self._grouping = None
        return n

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
        try:
            fingerprints, times = np.asarray(state["fingerprints"]), np.asarray(state["times"], dtype=np.float64)
            newest = float(state["newest"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"duplicates state is malformed: {exc!r}") from None
        if fingerprints.dtype != np.uint64 or fingerprints.ndim != 1 or times.shape != fingerprints.shape:
            raise StateError(f"duplicates state has fingerprints {fingerprints.dtype}{fingerprints.shape} and times {times.shape}, expected uint64 (n,) each")
        self._seen = OrderedDict(zip(fingerprints.tolist(), times.tolist(), strict=True))
        self._newest = newest
        self._grouping = None
