"""Per-key CUSUM state of one key set's feature and direction, in arrays.

``LevelShiftTracker`` sums the z-scores of every key of its ``gradual`` key sets (store keys by
default). A table holds a slot per key it has seen: the sum, the events of the current
excursion (0: none), when it began, and the excursion's summed baselines and values. A batch is
summed by one compiled pass over the keys' slots (``cusum_kernel.cusum``); its result is a
``Pending`` update that the tracker applies once the batch is settled, as it does with its runs.
Arrays rather than an object per key: a key set of 10,000 stores has thousands of excursions
under way, and building one object each per batch cost 4 µs an event.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

# A key whose sum is back at 0 keeps its slot; once the table holds this many keys, those
# without an excursion are dropped (they come back as new keys).
MAX_IDLE_KEYS = 50_000
# Most excursions held: past it, those of the keys seen longest ago end (like the runs in
# progress, whose bound keeps keys that never come back from holding state for ever).
MAX_EXCURSIONS = 1_000


@dataclass
class Pending:
    """The state after a batch of the keys in ``keys`` (aligned arrays)."""

    keys: list[str]
    sums: np.ndarray
    lengths: np.ndarray
    bases: np.ndarray
    values: np.ndarray
    began: np.ndarray
    seen: np.ndarray  # each key's latest event time in the batch

    def reset(self, key: str) -> None:
        """``key`` re-learnt: its excursion ends."""
        for i, k in enumerate(self.keys):
            if k == key:
                self.sums[i] = self.bases[i] = self.values[i] = 0.0
                self.lengths[i] = 0


@dataclass
class CusumTable:
    slots: dict[str, int] = field(default_factory=dict)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bases: np.ndarray = field(default_factory=lambda: np.zeros(0))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    began: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def gather(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(sums, lengths, summed baselines, summed values, began) of ``keys``; 0 (began NaN)
        for keys without a slot."""
        slots = np.fromiter(map(self.slots.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))
        known = slots >= 0
        at = np.where(known, slots, 0)

        def take(column: np.ndarray, empty: float) -> np.ndarray:
            return np.where(known, column[at], empty) if column.size else np.full(len(keys), empty, dtype=column.dtype)

        return take(self.sums, 0.0), take(self.lengths, 0).astype(np.int64), take(self.bases, 0.0), take(self.values, 0.0), take(self.began, np.nan)

    def apply(self, pending: Pending) -> None:
        """Write a batch's state; keys without a slot get one only if an excursion is under way."""
        new = [k for k, n in zip(pending.keys, pending.lengths.tolist(), strict=True) if n > 0 and k not in self.slots]
        if new:
            start = len(self.slots)
            self.slots.update(zip(new, range(start, start + len(new)), strict=True))
            grow = len(self.slots) - self.sums.size
            if grow > 0:
                self.sums = np.concatenate([self.sums, np.zeros(grow)])
                self.lengths = np.concatenate([self.lengths, np.zeros(grow, dtype=np.int64)])
                self.bases = np.concatenate([self.bases, np.zeros(grow)])
                self.values = np.concatenate([self.values, np.zeros(grow)])
                self.began = np.concatenate([self.began, np.full(grow, np.nan)])
                self.seen = np.concatenate([self.seen, np.full(grow, -np.inf)])
        slots = np.fromiter(map(self.slots.get, pending.keys, itertools.repeat(-1)), dtype=np.int64, count=len(pending.keys))
        mine = slots >= 0
        at = slots[mine]
        self.sums[at], self.lengths[at], self.bases[at] = pending.sums[mine], pending.lengths[mine], pending.bases[mine]
        self.values[at], self.began[at], self.seen[at] = pending.values[mine], pending.began[mine], pending.seen[mine]
        active = np.flatnonzero(self.lengths > 0)
        if active.size > MAX_EXCURSIONS:
            oldest = active[np.argsort(self.seen[active], kind="stable")[: active.size - MAX_EXCURSIONS]]
            self.sums[oldest] = self.bases[oldest] = self.values[oldest] = 0.0
            self.lengths[oldest] = 0
        if len(self.slots) > MAX_IDLE_KEYS + int(np.count_nonzero(self.lengths)):
            self._drop_idle()

    def reset(self, key: str) -> None:
        slot = self.slots.get(key)
        if slot is not None:
            self.sums[slot] = self.bases[slot] = self.values[slot] = 0.0
            self.lengths[slot] = 0

    def entries(self) -> list[tuple[str, float, int, float, float, float, float]]:
        """(key, sum, length, began, summed baselines, summed values, last seen) of each
        excursion under way."""
        return [
            (key, float(self.sums[s]), int(self.lengths[s]), float(self.began[s]), float(self.bases[s]), float(self.values[s]), float(self.seen[s]))
            for key, s in self.slots.items()
            if self.lengths[s] > 0
        ]

    def _drop_idle(self) -> None:
        kept = [(key, s) for key, s in self.slots.items() if self.lengths[s] > 0]
        index = np.array([s for _, s in kept], dtype=np.int64)
        self.slots = {key: i for i, (key, _) in enumerate(kept)}
        self.sums, self.lengths, self.bases = self.sums[index], self.lengths[index], self.bases[index]
        self.values, self.began, self.seen = self.values[index], self.began[index], self.seen[index]
