"""Collective anomalies: a key (a store) that stops sending events.

No event arrives from a store that stopped, so no per-event score can say so. This detector
is a timer over per-key rates in event time:

* it learns each key's rate per hour of day, separately for weekdays and weekends
  (events per hour in that bucket / hours of that bucket the stream has covered);
* the stream's clock is the newest event time seen (other keys keep it moving);
* for a key silent since ``t``, the expected number of events since then is the integral of its
  rate; when that passes ``expected_events`` (no event has probability ``exp(-expected)``),
  it raises one alert, stamped with the event time at which the silence became that unlikely.
  The next event from the key ends the episode.

A quiet night is not an alert (the expected count stays small); a busy store going quiet is
found after about ``expected_events`` of its usual inter-arrival times.

The walk over a batch's events is compiled (``silence_kernel``); this class owns the state and
the key names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_detector.detectors import silence_kernel
from stream_detector.detectors.base import CollectiveDetector
from stream_detector.detectors.silence_kernel import BUCKETS, peak_rates, walk
from stream_detector.detectors.zscore_kernel import factorize
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch
from stream_detector.state import shards


@dataclass(frozen=True)
class SilenceAlert:
    key: str
    event_time: float  # when the silence became unlikely enough (event time)
    since: float  # the key's last event
    expected_events: float
    probability: float

    def reason(self, key_set: str) -> str:
        minutes = (self.event_time - self.since) / 60.0
        return (
            f"{key_set} {self.key} has sent nothing for {minutes:.0f} min; "
            f"{self.expected_events:.1f} events were expected by now (chance of such a silence {self.probability:.1e})"
        )


class SilenceDetector(CollectiveDetector):
    """Per-key silence timer (see module docstring). One instance per key set, e.g. store_id.

    A forgotten key (``shrink``) frees its slot, with zero counts, so it never alerts; the next
    new key reuses the slot.
    """

    name = "silence"
    state_version = 1

    def __init__(
        self,
        key_set: str = "store_id",
        expected_events: float = 8.0,
        min_events: int = 200,
        min_hours: float = 24.0,
        check_every_s: float = 60.0,
    ) -> None:
        self.key_set = key_set
        self.expected_events = expected_events
        # The timer looks every this many seconds of event time (alerts keep the exact time).
        self.check_every_s = check_every_s
        # A key needs this many events, and the stream this many hours, before alerts.
        self.min_events = min_events
        self.min_hours = min_hours
        self._keys: dict[str, int] = {}
        self._names: list[str | None] = []  # by slot; None: free
        self._free: list[int] = []
        self._changed = shards.ChangedShards()
        self._key_chars = 0
        # Per-key arrays have spare capacity (grown by doubling); rows past len(keys) are unused.
        self._counts = np.zeros((0, BUCKETS))  # events per key and bucket
        self._last = np.zeros(0)  # last event time per key
        self._alerted = np.zeros(0, dtype=bool)  # in an alerted silence episode
        # An upper bound of each key's hourly rates (kept by the walk, see silence_kernel.walk).
        # It only decides which keys get the exact check.
        self._peak = np.zeros(0)
        self._hours = np.zeros(BUCKETS)  # stream hours covered per bucket
        self._clock = -math.inf  # newest event time at the last check
        self._next_check = -math.inf
        silence_kernel.warm_up()

    @property
    def n_keys(self) -> int:
        return len(self._keys)

    @property
    def _allocated(self) -> int:
        return len(self._names)

    # -- learning and checking ---------------------------------------------------------------

    def process(self, batch: FeatureBatch) -> list[SilenceAlert]:
        """Learn the batch's events (in order) and return the silences that became unlikely.

        The walk is sequential (an alert depends on the clock and the key's last event at that
        moment) and compiled; the alerts are those of checking every key exactly at every step.
        """
        keys = batch.keys.get(self.key_set)
        if keys is None or batch.n == 0:
            return []
        present, slots = self._event_slots(keys)
        if not len(slots):
            return []
        times = np.ascontiguousarray(batch.event_time if present is None else batch.event_time[present], dtype=np.float64)
        if not np.isfinite(times).all():  # the walk indexes arrays by bucket unchecked
            raise ValueError("silence: event times must be finite")
        slot, when, since, check, self._clock, self._next_check = walk(
            times,
            slots,
            self._counts,
            self._last,
            self._alerted,
            self._peak,
            self._hours,
            float(self._clock),
            float(self._next_check),
            self._allocated,
            float(self.expected_events),
            float(self.min_events),
            float(self.min_hours),
            float(self.check_every_s),
        )
        self._changed.mark(slots)
        self._changed.mark(slot)  # alerted
        names = [str(self._names[s]) for s in slot.tolist()]  # a free slot never alerts (no events)
        # The alerts of one clock step in the order the silences became unlikely (slot order is
        # an accident of arrival); steps and per-event alerts in the order raised.
        raised = sorted(zip(check.tolist(), when.tolist(), names, since.tolist(), strict=True))
        probability = math.exp(-self.expected_events)
        return [SilenceAlert(name, t, s, self.expected_events, probability) for _, t, name, s in raised]

    def _event_slots(self, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(positions of the events that have a key, or None for all; their slots)."""
        try:  # C-level: the usual batch has only known keys
            return None, np.fromiter(map(self._keys.__getitem__, keys), dtype=np.int64, count=len(keys))
        except (KeyError, TypeError):  # a new key, or none
            pass
        present = np.flatnonzero(np.fromiter((k is not None for k in keys), dtype=bool, count=len(keys)))
        # New keys get slots in arrival order. A dict walk, not a sort: sorting a batch of long
        # ids (a flood of new 200-character keys) as a unicode array cost a tenth of the batch.
        local, distinct = factorize(keys[present].tolist())
        return present, self._slots([str(k) for k in distinct])[local]

    def _slots(self, keys: list[str]) -> np.ndarray:
        """Slots of ``keys``, adding the new ones (arrays grow by doubling)."""
        out = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            slot = self._keys.get(key)
            if slot is None:
                if self._free:
                    slot = self._free.pop()
                    self._names[slot] = key
                else:
                    slot = len(self._names)
                    self._names.append(key)
                self._keys[key] = slot
                self._key_chars += len(key)
            out[i] = slot
        n, capacity = len(self._names), len(self._last)
        if n > capacity:
            extra = max(n, 2 * capacity, 64) - capacity
            self._counts = np.vstack([self._counts, np.zeros((extra, BUCKETS))])
            self._last = np.concatenate([self._last, np.full(extra, -math.inf)])
            self._alerted = np.concatenate([self._alerted, np.zeros(extra, dtype=bool)])
            self._peak = np.concatenate([self._peak, np.zeros(extra)])
        return out

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        used = [i for i, name in enumerate(self._names) if name is not None]
        return {
            **self._base(),
            "keys": [self._names[i] for i in used],
            "counts": self._counts[used],
            "last": self._last[used],
            "alerted": self._alerted[used],
            "peak": self._peak[used],  # not read back: recomputed (see load_state_dict)
        }

    def _base(self) -> dict[str, Any]:
        return {"version": self.state_version, "hours": self._hours.copy(), "clock": self._clock, "next_check": self._next_check}

    # -- keyed state: bytes and shards (see detectors/base.py KeyedState) --------------------

    def _row_bytes(self) -> int:
        return self._counts.itemsize * BUCKETS + self._last.itemsize + self._alerted.itemsize + self._peak.itemsize

    def state_bytes(self) -> int:
        return self.n_keys * shards.KEY_OVERHEAD_BYTES + self._key_chars + len(self._last) * self._row_bytes()

    def shrink(self, free_bytes: int) -> int:
        """Forget keys (their slots are freed for new keys): those with fewer than
        ``min_events`` events first, which cannot alert yet, then those silent for longest."""
        freeable = self.n_keys * shards.KEY_OVERHEAD_BYTES + self._key_chars
        n = int(self.n_keys * min(1.0, free_bytes / freeable)) if freeable else 0
        if n <= 0:
            return 0
        used = np.array(sorted(self._keys.values()), dtype=np.int64)
        ready = self._counts[used].sum(axis=1) >= self.min_events
        dropped = used[np.lexsort((self._last[used], ready))][:n]
        for slot in dropped.tolist():
            name = self._names[slot]
            assert name is not None
            del self._keys[name]
            self._key_chars -= len(name)
            self._names[slot] = None
            self._free.append(slot)
        self._counts[dropped], self._last[dropped], self._alerted[dropped], self._peak[dropped] = 0.0, -math.inf, False, 0.0
        self._changed.mark(dropped)
        return len(dropped)

    def state_shards(self, changed_only: bool) -> dict[str, Any]:
        rows = {"counts": self._counts, "last": self._last, "alerted": self._alerted}
        return {str(i): shards.cut(self._names, rows, i) for i in self._changed.take(self._allocated, changed_only)}

    def base_state_dict(self) -> dict[str, Any]:
        return {**self._base(), "shards": shards.shard_count(self._allocated)}

    def merge_shards(self, base: dict[str, Any], shard_states: dict[str, Any]) -> dict[str, Any]:
        n = base.get("shards")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise StateError(f"silence state has {n!r} shards", reason="corrupt")
        missing = [i for i in range(n) if str(i) not in shard_states]
        if missing:
            raise StateError(f"silence state: shards {missing[:5]} of {n} not found", reason="incomplete")
        keys, rows = shards.join((shard_states[str(i)] for i in range(n)), ("counts", "last", "alerted"), "silence state")
        if not n:
            rows = {"counts": np.zeros((0, BUCKETS)), "last": np.zeros(0), "alerted": np.zeros(0, dtype=bool)}
        return {key: value for key, value in base.items() if key != "shards"} | {"keys": keys, **rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.state_version:
            raise StateError(f"silence state version {state.get('version')!r}, expected {self.state_version}")
        try:
            names = list(state["keys"])
            counts = np.array(state["counts"], dtype=np.float64)
            last = np.array(state["last"], dtype=np.float64)
            alerted = np.array(state["alerted"], dtype=bool)
            hours = np.array(state["hours"], dtype=np.float64)
            clock, next_check = float(state["clock"]), float(state["next_check"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"silence state is malformed: {exc!r}") from None
        n = len(names)
        # The numba kernels index these without bounds checks: every shape must fit.
        if not all(isinstance(k, str) for k in names) or len(set(names)) != n:
            raise StateError("silence state: keys must be distinct strings")
        if counts.shape != (n, BUCKETS) or last.shape != (n,) or alerted.shape != (n,) or hours.shape != self._hours.shape:
            raise StateError(
                f"silence state has counts {counts.shape}, last {last.shape}, alerted {alerted.shape}, hours {hours.shape} "
                f"for {n} keys; expected ({n}, {BUCKETS}), ({n},), ({n},), {self._hours.shape}"
            )
        self._names, self._keys, self._free = list(names), {k: i for i, k in enumerate(names)}, []
        self._key_chars, self._changed = sum(map(len, names)), shards.ChangedShards()
        self._counts, self._last, self._alerted, self._hours = counts, last, alerted, hours
        self._clock, self._next_check = clock, next_check
        # Recomputed, not trusted: it must bound the current rates (see __init__).
        self._peak = np.zeros(n)
        peak_rates(self._counts, self._hours, n, self._peak)
