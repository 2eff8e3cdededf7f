"""Online z-score per key and feature, computed on whole batches with sequential semantics.

For every key set (e.g. ``store_id``) the detector keeps a streaming count, mean and sum of
squared deviations per key and feature (Welford). An event is scored against the statistics
of the events *before* it, also inside a batch: a compiled walk over the batch in order
(``zscore_kernel``) starts each key from its committed statistics and hands every event what
its key had seen just before it. A key that has seen fewer than ``warmup`` events
is scored against the global statistics instead and reported as not warm.

Seasonality: a key set may also keep statistics per key and seasonal bucket (hour of day, day
of week, hour of week; see ``seasons``). Each event is scored against the most specific
baseline that is warm: key and hour of week, else key and hour of day, ..., else the key, else
the global statistics. A busy Saturday afternoon is then compared with earlier Saturday
afternoons, and a basket that is normal at noon can still be unusual at 3 a.m.

Raw score: the largest |z| over key sets and features (higher = more anomalous).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_detector.detectors import seasons, zscore_kernel
from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.detectors.zscore_kernel import factorize, global_scores, key_set_scores, max_abs
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch, original_value
from stream_detector.state import shards

# Explanations give the expected range as the baseline's mean +- this many sd.
EXPECTED_SD = 3.0
# Calls of the kernels per score (see ZScoreDetector.score); two settle any batch seen so far.
MAX_REJECT_PASSES = 4


@dataclass
class _Stats:
    """Count, mean and M2 per slot (rows) and feature (columns), plus last event time per slot.

    Arrays have spare capacity (grown by doubling); rows past the number of keys are empty.
    """

    count: np.ndarray  # (S, F)
    mean: np.ndarray  # (S, F)
    m2: np.ndarray  # (S, F)
    last_seen: np.ndarray  # (S,)

    @classmethod
    def empty(cls, n_features: int, capacity: int = 0) -> _Stats:
        return cls(
            np.zeros((capacity, n_features)),
            np.zeros((capacity, n_features)),
            np.zeros((capacity, n_features)),
            np.full(capacity, -np.inf),
        )

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, mean, m2) rows for ``slots``; slots beyond capacity (new keys) are empty."""
        capacity = self.count.shape[0]
        inside = slots < capacity
        if inside.all():
            return self.count[slots], self.mean[slots], self.m2[slots]
        if capacity == 0:
            empty = np.zeros((len(slots), self.count.shape[1]))
            return empty, empty.copy(), empty.copy()
        safe = np.where(inside, slots, 0)
        keep = inside[:, None]
        return (
            np.where(keep, self.count[safe], 0.0),
            np.where(keep, self.mean[safe], 0.0),
            np.where(keep, self.m2[safe], 0.0),
        )

    def ensure_capacity(self, size: int) -> None:
        capacity = self.count.shape[0]
        if size <= capacity:
            return
        extra = max(size, 2 * capacity, 64) - capacity
        pad = np.zeros((extra, self.count.shape[1]))
        self.count = np.vstack([self.count, pad])
        self.mean = np.vstack([self.mean, pad])
        self.m2 = np.vstack([self.m2, pad])
        self.last_seen = np.concatenate([self.last_seen, np.full(extra, -np.inf)])


@dataclass
class _KeySetState:
    """One table: key -> slot, the statistics by slot, and the slots eviction freed.

    Evicting touches only the evicted keys (a table of 100,000 keys loses a few to the TTL in
    almost every batch); freed slots have empty rows and are reused before the table grows.
    """

    slots: dict[str, int]
    stats: _Stats
    keys: list[str | None] = field(default_factory=list)  # by slot; None: free
    free: list[int] = field(default_factory=list)
    # Shards changed since the last checkpoint, and the characters of the keys held (bytes).
    changed: shards.ChangedShards = field(default_factory=shards.ChangedShards)
    key_chars: int = 0
    # Bounds on the keys' last_seen, so a batch need not scan every slot for idle keys: no key
    # was seen before ``oldest`` (a lower bound) and ``newest`` is the latest time of any key.
    # None: not known (a fresh or restored table), the next eviction scans.
    oldest: float | None = None
    newest: float | None = None

    def note_seen(self, earliest: float, latest: float) -> None:
        """Keys were (re)stamped with times in ``earliest .. latest``: keep the bounds true."""
        if self.oldest is not None:
            self.oldest = min(self.oldest, earliest)
        if self.newest is not None:
            self.newest = max(self.newest, latest)

    def may_have_idle(self, ttl: float) -> bool:
        """Whether any key may have been idle for longer than ``ttl`` (False: certainly none)."""
        return self.oldest is None or self.newest is None or self.oldest < self.newest - ttl

    @classmethod
    def of(cls, keys: list[str], stats: _Stats) -> _KeySetState:
        return cls({key: i for i, key in enumerate(keys)}, stats, list(keys), key_chars=sum(map(len, keys)))

    def _row_bytes(self) -> int:
        st = self.stats
        return st.count.itemsize * 3 * st.count.shape[1] + st.last_seen.itemsize

    def state_bytes(self) -> int:
        """Estimated memory of the table: its keys (see state/shards.py) and its allocated rows."""
        return len(self.slots) * shards.KEY_OVERHEAD_BYTES + self.key_chars + self.stats.count.shape[0] * self._row_bytes()

    def key_bytes(self) -> int:
        """The part of ``state_bytes`` that forgetting keys frees (rows stay allocated)."""
        return len(self.slots) * shards.KEY_OVERHEAD_BYTES + self.key_chars

    def forget(self, n: int, warmup: float) -> int:
        """Drop ``n`` keys: those still warming up (fewer than ``warmup`` events) first, then
        the least recently seen, so a flood of one-off keys displaces itself before the keys
        with a baseline. The number dropped."""
        used = np.fromiter(self.slots.values(), dtype=np.int64, count=len(self.slots))  # C speed; order is set below
        n = min(n, len(used))
        if n <= 0:
            return 0
        warm = self.stats.count[used].max(axis=1, initial=0.0) >= warmup
        order = used[np.lexsort((self.stats.last_seen[used], warm))]
        self.drop(order[:n])
        self.oldest = self.newest = None  # not known any more: the next eviction scans
        return n

    @property
    def allocated(self) -> int:
        return len(self.keys)

    def new_slots(self, n: int) -> list[int]:
        """The slots the next ``n`` new keys get (``add`` gives them in this order)."""
        reused = self.free[::-1][:n]
        return reused + list(range(self.allocated, self.allocated + n - len(reused)))

    def add(self, new_keys: list[str]) -> None:
        """Give the new keys slots in ``new_slots`` order: freed ones first, then new rows."""
        slots = self.new_slots(len(new_keys))
        reused = min(len(self.free), len(new_keys))
        del self.free[len(self.free) - reused :]
        for slot, key in zip(slots[:reused], new_keys, strict=False):
            self.keys[slot] = key
        self.keys.extend(new_keys[reused:])
        self.slots.update(zip(new_keys, slots, strict=True))
        self.changed.mark(slots)
        self.key_chars += sum(map(len, new_keys))
        self.stats.ensure_capacity(self.allocated)

    def drop(self, slots: np.ndarray) -> None:
        dropped = slots.tolist()
        keys = [self.keys[slot] for slot in dropped]
        for key in keys:
            del self.slots[key]  # KeyError: a free slot (None) dropped
        self.key_chars -= sum(map(len, keys))
        for slot in dropped:
            self.keys[slot] = None
        self.free.extend(dropped)
        self.changed.mark(slots)
        st = self.stats
        st.count[slots], st.mean[slots], st.m2[slots], st.last_seen[slots] = 0.0, 0.0, 0.0, -np.inf

    def in_use(self) -> np.ndarray:
        """Slots (ascending) that hold a key."""
        return np.flatnonzero(np.fromiter((k is not None for k in self.keys), dtype=bool, count=self.allocated))


@dataclass
class _Update:
    """What learning one batch changes for one key set (or the global statistics)."""

    new_keys: list[str]  # added to the slot table in this order (``_KeySetState.new_slots``)
    touched: np.ndarray  # slots whose statistics change
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    last_seen: np.ndarray  # per touched slot: the latest event time of the batch

    def apply(self, state: _KeySetState) -> None:
        state.add(self.new_keys)
        state.changed.mark(self.touched)
        st = state.stats
        st.count[self.touched] = self.count
        st.mean[self.touched] = self.mean
        st.m2[self.touched] = self.m2
        stamped = np.maximum(st.last_seen[self.touched], self.last_seen)
        st.last_seen[self.touched] = stamped
        if stamped.size:
            state.note_seen(float(stamped.min()), float(stamped.max()))


@dataclass
class _State:
    key_sets: dict[str, _KeySetState]
    global_stats: _Stats


# Statistics per table row, (count, mean, m2), each (rows, features).
_Prior = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class _Grouping:
    """A batch's events by table row, with the prior statistics of each row: all that
    ``key_set_scores`` needs of a table besides the values and the learn mask, so the
    fixed-point rounds of one batch (same keys, same committed state) compute it once."""

    group: np.ndarray  # (n,) each event's row
    slots: np.ndarray  # (G,) each row's slot in the table
    prior: _Prior  # per row, (G, F)


class ZScoreDetector(Detector):
    """Streaming z-score per key set, key and feature (see module docstring)."""

    name = "zscore"
    # 2: a key set's tables hold only its own features (1: every feature; still read).
    state_version = 2

    def __init__(
        self,
        features: tuple[str, ...] = ("log_amount", "log_quantity", "log_unit_price"),
        key_sets: tuple[str, ...] = ("store_id",),
        warmup: int = 30,
        min_std: float = 0.05,
        max_keys: int = 100_000,
        key_set_features: dict[str, tuple[str, ...]] | None = None,
        reject_z: float = 8.0,
        reject_after: int = 5,
        min_std_by_feature: dict[str, float] | None = None,
        key_ttl_seconds: float | None = None,
        key_set_seasonality: dict[str, tuple[str, ...]] | None = None,
        seasonal_warmup: int | None = None,
        learning_prior: float = 0.0,
        adapt_clip_z: float = 3.0,
    ) -> None:
        self.features = tuple(features)
        self.key_sets = tuple(key_sets)
        # Seasonal baselines per key set, coarse to fine (e.g. hour_of_day, hour_of_week).
        self.key_set_seasonality = {ks: tuple((key_set_seasonality or {}).get(ks, ())) for ks in self.key_sets}
        for periods in self.key_set_seasonality.values():
            for period in periods:
                if period not in seasons.PERIODS:
                    raise ValueError(f"unknown seasonal period {period!r}; known: {sorted(seasons.PERIODS)}")
        # Which features each key set scores (default: all): a product's unit price is
        # meaningful, a store's unit price (mixing cheap and dear products) is not.
        self.key_set_features = {ks: tuple((key_set_features or {}).get(ks, self.features)) for ks in self.key_sets}
        # Each key set's tables hold only its own features (columns of ``features``).
        self._fidx = {ks: np.array([j for j, f in enumerate(self.features) if f in self.key_set_features[ks]], dtype=np.int64) for ks in self.key_sets}
        self.warmup = warmup
        # A seasonal bucket sees a fraction of its key's events: it takes over only once its
        # own estimate is as steady as a key's (None: the same warm-up as a key).
        self.seasonal_warmup = warmup if seasonal_warmup is None else seasonal_warmup
        # Weight, in events, of the global statistics in a learning key's baseline (0: the
        # global statistics alone).
        self.learning_prior = learning_prior
        self.min_std = min_std
        self.max_keys = max_keys
        self.key_ttl_seconds = key_ttl_seconds
        # A discrete feature (quantity: 1, 2, 3 ...) needs a wider floor than a continuous one.
        self.min_std_by_feature = dict(min_std_by_feature or {})
        self._min_std = np.array([self.min_std_by_feature.get(f, min_std) for f in self.features], dtype=np.float64)
        # Learning guard: once a key (or the global statistics) has ``reject_after`` values, a
        # value more than ``reject_z`` sd away is kept out of every model, also during warm-up,
        # so one early outlier cannot inflate a variance for good.
        self.reject_z = reject_z
        self.reject_after = reject_after
        # While a key adapts to a level shift its own rows learn its every event, each held
        # within this many sd (``score_adapting``).
        self.adapt_clip_z = adapt_clip_z
        self._state = _State(
            key_sets={name: _KeySetState.of([], _Stats.empty(len(self._fidx[ks]))) for ks, name in self._state_tables()},
            global_stats=_Stats.empty(len(self.features), capacity=1),
        )
        # Per-batch work shared by the rounds of one batch; invalid once the state changes.
        self._round_cache: dict[str, tuple[tuple, int, Any]] = {}
        self._generation = 0
        zscore_kernel.warm_up()

    def _state_tables(self) -> list[tuple[str, str]]:
        """(key set, table) for every table of per-key statistics: each key set, then its
        seasonal levels."""
        return [(ks, name) for ks in self.key_sets for name in (ks, *(_level(ks, p) for p in self.key_set_seasonality[ks]))]

    # -- scoring ---------------------------------------------------------------------------

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        return self.score_adapting(batch, learn, {})

    def score_adapting(self, batch: FeatureBatch, learn: np.ndarray, adapting: dict[tuple[str, str], np.ndarray]) -> Step:
        """Scores, and the gross outliers (``reject``), of a batch whose events ``learn`` says
        may be learned; ``adapting`` ((key set, feature) -> bool (n,)): events whose key in that
        key set adapts to a level shift of that feature, learned by that key's rows on that
        feature flagged or rejected or not, each value held within ``adapt_clip_z`` sd
        (``Detector.score_adapting``).

        A rejected event is learned by none of the statistics: each kernel skips it as soon as
        it (or an earlier table) rejects it, so a key whose level jumped has all its new values
        rejected in one call, not one more per pipeline round (a chain of rejections used to
        keep batches from settling: 10x slower). A table scored before the one that rejects an
        event has learned it, so the call is repeated with those events left out until the
        rejections reproduce themselves (two calls when a batch has new rejections of that
        kind, one otherwise).
        """
        return self.score_by_key_set(batch, learn, adapting, {})

    def score_by_key_set(
        self, batch: FeatureBatch, learn: np.ndarray, adapting: dict[tuple[str, str], np.ndarray], learn_by_key_set: dict[str, np.ndarray]
    ) -> Step:
        """``score_adapting``, where ``learn_by_key_set`` replaces ``learn`` for the tables of
        the key sets it names (the global statistics follow ``learn``): what a key set owned by
        another task would learn without the pipeline's decision (docs/architecture.md, section
        4; ``bench/quality_at_scale.py`` measures it)."""
        x = np.ascontiguousarray(batch.matrix(self.features), dtype=np.float64)
        learn = np.asarray(learn, dtype=bool)
        observed = ~np.isnan(x)
        adapt: dict[str, np.ndarray] = {}  # key set -> bool (n, features)
        for (ks, feature), mask in adapting.items():
            if ks in self.key_sets and feature in self.key_set_features[ks]:
                adapt.setdefault(ks, np.zeros(x.shape, dtype=bool))[:, self.features.index(feature)] = mask
        excluded = np.zeros(batch.n, dtype=bool)  # rejected by some table
        learnable = np.logical_or.reduce([learn, *learn_by_key_set.values()])
        for _ in range(MAX_REJECT_PASSES):
            own = {ks: observed & (np.asarray(mask, dtype=bool) & ~excluded)[:, None] for ks, mask in learn_by_key_set.items()}
            step = self._score_pass(batch, x, observed & (learn & ~excluded)[:, None], adapt, own)
            assert step.reject is not None
            if np.array_equal(step.reject & learnable, excluded & learnable):
                break
            excluded = step.reject
        return step

    def _score_pass(
        self, batch: FeatureBatch, x: np.ndarray, contrib: np.ndarray, adapting: dict[str, np.ndarray], own: dict[str, np.ndarray] | None = None
    ) -> Step:
        n, n_features = batch.n, len(self.features)
        g = self._state.global_stats
        g_count, g_mean, g_m2, g_z, g_std, reject, *g_tot = global_scores(
            x, contrib, g.count[0], g.mean[0], g.m2[0], self._min_std, float(self.warmup), float(self.reject_after), float(self.reject_z)
        )

        n_sets = len(self.key_sets)
        z = np.full((n, n_sets, n_features), np.nan)
        mean = np.full((n, n_sets, n_features), np.nan)
        std = np.full((n, n_sets, n_features), np.nan)
        warm = np.zeros((n, n_sets), dtype=bool)
        # Baseline used per event and key set: 0 global, 1 the key, 2.. its seasonal levels.
        level = np.zeros((n, n_sets), dtype=np.int8)
        pending = []
        nobody = np.zeros(x.shape, dtype=bool)
        for k, ks in enumerate(self.key_sets):
            keys = batch.keys.get(ks)
            grouped, groups, prior, offsets = self._key_set_tables(ks, keys, batch.event_time, n)
            totals = key_set_scores(
                x,
                (own or {}).get(ks, contrib),
                self._fidx[ks],
                grouped[0][0] >= 0,
                batch.event_time,
                groups,
                *prior,
                g_count,
                g_mean,
                g_m2,
                g_z,
                g_std,
                self._min_std,
                float(self.warmup),
                float(self.seasonal_warmup),
                float(self.reject_after),
                float(self.reject_z),
                float(self.learning_prior),
                k,
                z,
                mean,
                std,
                warm,
                level,
                reject,
                adapting.get(ks, nobody),
                float(self.adapt_clip_z),
            )
            pending.append((ks, grouped, offsets, totals))
        details = {"z": z, "mean": mean, "std": std, "warm": warm, "level": level}
        return Step(scores=max_abs(z), details=details, next_state=(pending, g_tot), reject=reject)

    def _key_set_tables(self, ks: str, keys: np.ndarray | None, event_time: np.ndarray, n: int) -> tuple[list, np.ndarray, _Prior, list[int]]:
        """A key set's tables for a batch (the key, then its seasonal levels), stacked for
        ``key_set_scores``; computed once per batch (see ``_cached``)."""

        def compute() -> tuple[list, np.ndarray, _Prior, list[int]]:
            periods = self.key_set_seasonality[ks]
            grouped = [self._grouped(ks, (keys, event_time), n, ks)]
            grouped += [self._grouped(_level(ks, p), (keys, event_time), n, ks, p) for p in periods]
            return (grouped, *_stack([grouping for _, _, grouping in grouped]))

        return self._cached(f"{ks}:stack", (keys, event_time), compute)

    def _std(self, count: np.ndarray, m2: np.ndarray, floor: np.ndarray | None = None) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(count > 1, m2 / np.maximum(count - 1, 1), np.nan)
        return np.maximum(np.sqrt(var), self._min_std if floor is None else floor)

    def _z(self, x: np.ndarray, count: np.ndarray, mean: np.ndarray, m2: np.ndarray, floor: np.ndarray | None = None) -> np.ndarray:
        z = (x - mean) / self._std(count, m2, floor)
        return np.where(count >= self.warmup, z, np.nan)

    def _cached(self, name: str, source: tuple, compute: Any) -> Any:
        """``compute()``, reused while the batch arrays in ``source`` and the committed state
        are the same objects: the fixed-point rounds re-score one batch with other masks."""
        hit = self._round_cache.get(name)
        if hit is not None and hit[1] == self._generation and len(hit[0]) == len(source) and all(a is b for a, b in zip(hit[0], source, strict=True)):
            return hit[2]
        value = compute()
        self._round_cache[name] = (source, self._generation, value)
        return value

    def _grouped(self, name: str, source: tuple, n: int, key_set: str, period: str | None = None) -> tuple[np.ndarray, list[str], _Grouping]:
        """Slots, new keys and grouping of one table for a batch (see ``_cached``). ``source``
        is (the key set's key column, event times); ``period`` names a seasonal level."""
        keys, event_time = source

        def compute() -> tuple[np.ndarray, list[str], _Grouping]:
            if keys is None or n == 0:
                codes, uniques = np.zeros(n, dtype=np.int64), [None]
            else:
                codes, uniques = self._cached(f"{key_set}:codes", (keys,), lambda: factorize(keys.tolist()))
                if period is not None:
                    codes, uniques = seasons.seasonal_keys(codes, uniques, period, event_time)
            # One row per distinct key of the batch; the row of events without a key (slot -1)
            # is never learned or read.
            unique_slots, new_keys = self._slots(name, uniques)
            safe = np.where(unique_slots >= 0, unique_slots, 0)
            grouping = _Grouping(codes, safe, self._state.key_sets[name].stats.gather(safe))
            return unique_slots[codes], new_keys, grouping

        return self._cached(name, source, compute)

    def _slots(self, table: str, uniques: list) -> tuple[np.ndarray, list[str]]:
        """Slot of each of the batch's distinct keys (-1 for None) and the keys seen for the
        first time."""
        state = self._state.key_sets[table]
        known = state.slots
        new_keys: list[str] = []
        new_at: list[int] = []
        unique_slots = np.empty(len(uniques), dtype=np.int64)
        for u, key in enumerate(uniques):
            if key is None:
                unique_slots[u] = -1
                continue
            s = known.get(key)
            if s is None:
                new_keys.append(key)
                new_at.append(u)
                continue
            unique_slots[u] = s
        if new_keys:
            unique_slots[new_at] = state.new_slots(len(new_keys))
        return unique_slots, new_keys

    def commit(self, step: Step) -> None:
        self._generation += 1
        self._round_cache.clear()
        pending, (g_count, g_mean, g_m2) = step.next_state
        for ks, grouped, offsets, (t_count, t_mean, t_m2, touched, last) in pending:
            names = [ks, *(_level(ks, p) for p in self.key_set_seasonality[ks])]
            # The touched rows of all the key set's tables at once, then cut per table (views):
            # a handful of array operations per key set rather than per table.
            hit = np.flatnonzero(touched)
            cuts = np.searchsorted(hit, offsets).tolist()
            count, mean, m2, seen = t_count[hit], t_mean[hit], t_m2[hit], last[hit]
            for name, (_, new_keys, grouping), start, a, b in zip(names, grouped, offsets[:-1], cuts[:-1], cuts[1:], strict=True):
                state = self._state.key_sets[name]
                _Update(new_keys, grouping.slots[hit[a:b] - start], count[a:b], mean[a:b], m2[a:b], seen[a:b]).apply(state)
                self._state.key_sets[name] = self._evict(state)
        g = self._state.global_stats
        g.count[0], g.mean[0], g.m2[0] = g_count, g_mean, g_m2

    def _evict(self, state: _KeySetState) -> _KeySetState:
        """Forget keys idle past ``key_ttl_seconds`` and, over ``max_keys``, the least recently
        seen down to 90 % of it. Forgotten keys restart from the global statistics.

        Applied when a batch is committed: a memory bound, checked per batch. The slots are
        scanned (one comparison each) only when a key may be idle past the TTL, by the table's
        bounds on last_seen, or when it holds more than ``max_keys``: with the default week-long
        TTL a batch otherwise costs nothing here, where every batch used to pay a few passes
        over every slot of every table.
        """
        n = state.allocated
        if not n:
            return state
        ttl = self.key_ttl_seconds
        if len(state.slots) <= self.max_keys and (ttl is None or not state.may_have_idle(ttl)):
            return state
        last_seen = state.stats.last_seen[:n]
        alive = last_seen > -np.inf  # free slots hold -inf
        drop = np.zeros(n, dtype=bool)
        if ttl is not None:
            drop = alive & (last_seen < last_seen.max() - ttl)
        if len(state.slots) - int(drop.sum()) > self.max_keys:
            kept = np.flatnonzero(alive & ~drop)
            newest_first = kept[np.argsort(-last_seen[kept], kind="stable")]
            drop[newest_first[int(self.max_keys * 0.9) :]] = True
        if drop.any():
            state.drop(np.flatnonzero(drop))
        remaining = last_seen[alive & ~drop]
        # An empty table: bounds no key can break, and note_seen narrows them from the next key.
        state.oldest, state.newest = (float(remaining.min()), float(remaining.max())) if remaining.size else (np.inf, -np.inf)
        return state

    # -- level shifts (scoring/level_shift.py) ---------------------------------------------

    def relearn(
        self, key_set: str, key: str, mean: np.ndarray, var: np.ndarray, event_time: float, moved: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, Any]:
        """Move ``key``'s baseline to the level of a run of its values (``mean``, ``var`` over
        the key set's features). A warm key keeps its spread and its seasonal shape: the key
        row and its seasonal rows move by the change of level on each feature that moved by at
        least one sd, and on the ``moved`` ones (a gradual shift is declared below one sd). A key still learning takes the run's statistics as a warm baseline.
        Features the run never saw (NaN) keep their statistics. The undo is small (the key's
        old row and the change of level), since it travels in every checkpoint until feedback
        on the shift is taken or forgotten."""
        fi = self._fidx[key_set]
        seen = ~np.isnan(mean)
        state = self._state.key_sets[key_set]
        if key not in state.slots:  # every event of it was flagged: it starts from the run
            state.add([key])
            state.stats.last_seen[state.slots[key]] = event_time
        slot = state.slots[key]
        st = state.stats
        old = st.mean[slot].copy()
        before = (st.count[slot].copy(), old, st.m2[slot].copy())
        if st.count[slot].max(initial=0.0) >= self.warmup:
            with np.errstate(invalid="ignore"):
                far = np.abs(mean - old) >= self._std(st.count[slot], st.m2[slot], self._min_std[fi])
            if moved is not None:
                far |= moved
            delta = np.where(seen & far, mean - old, 0.0)
            st.mean[slot] += delta
        else:
            delta = np.where(seen & (st.count[slot] > 0), mean - old, 0.0)
            # A run of a few events understates the spread (quantities of a new store at 30x
            # are 30, 30, 60, ...: a MAD of 0): at least a typical warm key's spread.
            var = np.fmax(var, self._typical_variance(key_set))
            st.count[slot] = np.where(seen, float(self.warmup), st.count[slot])
            st.mean[slot] = np.where(seen, mean, st.mean[slot])
            st.m2[slot] = np.where(seen, var * (self.warmup - 1), st.m2[slot])
        state.changed.mark(np.array([slot]))
        for name, slots in self._seasonal_slots(key_set, key):
            table = self._state.key_sets[name]
            table.stats.mean[slots] += np.where(table.stats.count[slots] > 0, delta, 0.0)
            table.changed.mark(slots)
        self._generation += 1
        self._round_cache.clear()
        return old, st.mean[slot].copy(), [*before, delta]

    def _typical_variance(self, key_set: str) -> np.ndarray:
        """Per feature of ``key_set``, the median variance of its warm keys (NaN: none warm)."""
        state = self._state.key_sets[key_set]
        n = state.allocated
        count, m2 = state.stats.count[:n], state.stats.m2[:n]
        warm = (count >= self.warmup) & (state.stats.last_seen[:n, None] > -np.inf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a feature no warm key has: NaN
            return np.nanmedian(np.where(warm, m2 / np.maximum(count - 1, 1), np.nan), axis=0) if n else np.full(count.shape[1], np.nan)

    def focus(self, step: Step, moved: dict[tuple[str, str], np.ndarray], shifted: dict[tuple[str, str], np.ndarray] | None = None) -> Step | None:
        """``step`` with each marked event judged by the largest |z| over the key sets and
        features left: a key set's z on a feature counts unless another key set's adapting key
        of the event moved that feature (an event of a re-priced product in a store that
        changed format is judged by the product's price and the store's quantities); where a
        change of level is expected of the event's key (``shifted``), its z is measured from
        the baseline moved by that change. ``details["judged"]`` holds the z-scores as judged
        (NaN: did not count), which ``explain`` names; ``details["z"]`` stays as scored (the
        level-shift runs read it)."""
        shifted = shifted or {}
        if not moved and not shifted:
            return None
        marked = np.zeros(len(step.scores), dtype=bool)
        for mask in moved.values():
            marked |= mask
        judged = step.details["z"].copy()
        std = step.details["std"]
        for (ks, feature), delta in shifted.items():
            if ks in self.key_sets and feature in self.features:
                k, j = self.key_sets.index(ks), self.features.index(feature)
                expected = ~np.isnan(delta)
                with np.errstate(invalid="ignore"):
                    judged[:, k, j] = np.where(expected, judged[:, k, j] - np.where(expected, delta, 0.0) / std[:, k, j], judged[:, k, j])
                marked |= expected
        for k, ks in enumerate(self.key_sets):
            for j, feature in enumerate(self.features):
                others = [mask for (by, f), mask in moved.items() if f == feature and by != ks]
                if others:
                    judged[np.logical_or.reduce(others), k, j] = np.nan
        scores = step.scores.copy()
        scores[marked] = max_abs(judged[marked])
        return dataclasses.replace(step, scores=scores, details={**step.details, "judged": judged})

    def restore_rows(self, key_set: str, key: str, rows: Any) -> None:
        """Undo a ``relearn`` (its ``undo``: the key's old row and the change of level): the key
        row as it was, and its seasonal rows moved back, also those learned since."""
        count, mean, m2, delta = (np.asarray(a, dtype=np.float64) for a in rows)
        state = self._state.key_sets[key_set]
        if key not in state.slots:  # forgotten since: it comes back with its old baseline
            state.add([key])
        slot = state.slots[key]
        st = state.stats
        st.count[slot], st.mean[slot], st.m2[slot] = count, mean, m2
        state.changed.mark(np.array([slot]))
        for name, slots in self._seasonal_slots(key_set, key):
            table = self._state.key_sets[name]
            table.stats.mean[slots] -= np.where(table.stats.count[slots] > 0, delta, 0.0)
            table.changed.mark(slots)
        self._generation += 1
        self._round_cache.clear()

    def _seasonal_slots(self, key_set: str, key: str) -> list[tuple[str, np.ndarray]]:
        """(table, slots) of the key's rows in each seasonal table of its key set."""
        out = []
        for period in self.key_set_seasonality[key_set]:
            name = _level(key_set, period)
            slots = self._state.key_sets[name].slots
            found = [s for label in seasons.labels(period) if (s := slots.get(key + label)) is not None]
            out.append((name, np.array(found, dtype=np.int64)))
        return out

    # -- introspection ---------------------------------------------------------------------

    def n_keys(self) -> dict[str, int]:
        return {ks: len(state.slots) for ks, state in self._state.key_sets.items()}

    def learning_keys(self) -> dict[str, int]:
        """Keys per key set that have not yet seen ``warmup`` events."""
        out = {}
        for ks in self.key_sets:
            state = self._state.key_sets[ks]
            counts = state.stats.count[: state.allocated][state.stats.last_seen[: state.allocated] > -np.inf]
            out[ks] = int(np.sum(counts.max(axis=1, initial=0) < self.warmup)) if counts.size else 0
        return out

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        z = step.details.get("judged", step.details["z"])[i]  # the views that counted (focus)
        magnitude = np.abs(z)
        magnitude[np.isnan(magnitude)] = -1.0  # nanargmax without its checks (explained per anomaly)
        best = int(magnitude.argmax())
        if magnitude.flat[best] < 0:  # every z is NaN
            return Explanation(details={"warm": False}, reasons=[])
        k, f = np.unravel_index(best, z.shape)
        key_set, feature = self.key_sets[k], self.features[f]
        keys = batch.keys.get(key_set)
        key = keys[i] if keys is not None else None
        warm = bool(step.details["warm"][i, k])
        mean = float(step.details["mean"][i, k, f])
        std = float(step.details["std"][i, k, f])
        zf = float(z[k, f])
        value = float(batch.column(feature)[i])
        depth = int(step.details["level"][i, k])
        baseline = self._baseline(key_set, key, depth, float(batch.event_time[i]))
        if key_set == "global":
            scope = "all events"
        elif warm:
            scope = baseline
        elif self.learning_prior > 0:
            scope = f"all keys and {key_set} {key}'s first events (still learning)"
        else:
            scope = f"all keys ({key_set} {key} still learning)"
        scope = f"the mean of {scope}"
        field, shown, typical = _in_original_units(feature, value, mean)
        direction = "above" if zf > 0 else "below"
        low, high = (original_value(feature, mean + sign * EXPECTED_SD * std) for sign in (-1, 1))
        reason = f"{field} {shown} is {abs(zf):.1f} sd {direction} {scope}, {typical}; expected {low:,.4g} to {high:,.4g}"
        if feature.startswith("log_"):
            reason += " (log scale)"
        details = {
            "key_set": key_set,
            "key": key,
            "feature": feature,
            "value": value,
            "mean": mean,
            "std": std,
            "z": zf,
            "warm": warm,
            "baseline": baseline if warm else "global",
            # mean +- EXPECTED_SD sd of the baseline, in the event's own units
            "expected_range": [low, high],
        }
        return Explanation(details=details, reasons=[reason])

    def _baseline(self, key_set: str, key: str | None, depth: int, event_time: float) -> str:
        """The statistics an event was scored against, as a person reads them."""
        if depth <= 0 or key_set == "global":
            return "all events"
        if depth == 1:
            return f"{key_set} {key}"
        period = self.key_set_seasonality[key_set][depth - 2]
        b = int(seasons.bucket(period, np.array([event_time]))[0])
        preposition = "at" if period == "hour_of_day" else "on"
        return f"{key_set} {key} {preposition} {seasons.describe(period, b)}"

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sets = {}
        for ks, name in self._state_tables():
            state = self._state.key_sets[name]
            used = state.in_use()  # in slot order, without the free slots
            st = state.stats
            sets[name] = {
                "keys": [state.keys[i] for i in used.tolist()],
                "features": [self.features[j] for j in self._fidx[ks]],
                "count": st.count[used],
                "mean": st.mean[used],
                "m2": st.m2[used],
                "last_seen": st.last_seen[used],
            }
        return self._with_tables(sets)

    def _with_tables(self, sets: dict[str, dict]) -> dict:
        g = self._state.global_stats
        return {
            "version": self.state_version,
            "features": list(self.features),
            "key_sets": sets,
            "global": {"count": g.count.copy(), "mean": g.mean.copy(), "m2": g.m2.copy()},
        }

    # -- keyed state: bytes and shards (see detectors/base.py KeyedState) --------------------

    def state_bytes(self) -> int:
        return sum(state.state_bytes() for state in self._state.key_sets.values())

    def shrink(self, free_bytes: int) -> int:
        """The same fraction of every table's keys (``_KeySetState.forget``)."""
        freeable = sum(state.key_bytes() for state in self._state.key_sets.values())
        if free_bytes <= 0 or not freeable:
            return 0
        fraction = min(1.0, free_bytes / freeable)
        forgotten = sum(state.forget(int(len(state.slots) * fraction), self.warmup) for state in self._state.key_sets.values())
        self._generation += 1
        self._round_cache.clear()
        return forgotten

    def state_shards(self, changed_only: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _, name in self._state_tables():
            state = self._state.key_sets[name]
            st = state.stats
            rows = {"count": st.count, "mean": st.mean, "m2": st.m2, "last_seen": st.last_seen}
            for i in state.changed.take(state.allocated, changed_only):
                out[f"{name}/{i}"] = shards.cut(state.keys, rows, i)
        return out

    def base_state_dict(self) -> dict:
        sets = {}
        for ks, name in self._state_tables():
            sets[name] = {"features": [self.features[j] for j in self._fidx[ks]], "shards": shards.shard_count(self._state.key_sets[name].allocated)}
        return self._with_tables(sets)

    def merge_shards(self, base: dict, shard_states: dict[str, Any]) -> dict:
        try:
            tables = dict(base["key_sets"])
            for name, table in tables.items():
                n = table["shards"]
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise StateError(f"zscore state of {name} has {n!r} shards", reason="corrupt")
                missing = [i for i in range(n) if f"{name}/{i}" not in shard_states]
                if missing:
                    raise StateError(f"zscore state of {name}: shards {missing[:5]} of {n} not found", reason="incomplete")
                width = len(table["features"])
                keys, rows = shards.join((shard_states[f"{name}/{i}"] for i in range(n)), ("count", "mean", "m2", "last_seen"), f"zscore state of {name}")
                if not n:
                    rows = {k: np.zeros((0, width)) for k in ("count", "mean", "m2")} | {"last_seen": np.zeros(0)}
                tables[name] = {"keys": keys, "features": table["features"], **rows}
        except (KeyError, TypeError) as exc:
            raise StateError(f"zscore state is malformed: {exc!r}", reason="corrupt") from None
        return {**base, "key_sets": tables}

    def load_state_dict(self, state: dict) -> None:
        """Restore a snapshot; ``StateError`` if it does not fit the configured features and key
        sets (every array's shape is checked: the kernels index them without bounds checks)."""
        version = state.get("version")
        if version not in (1, self.state_version):
            raise StateError(f"zscore state version {version!r}, expected {self.state_version}")
        try:
            self._state = self._restored(state, version)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StateError(f"zscore state is malformed: {exc!r}") from None
        self._generation += 1
        self._round_cache.clear()

    def _restored(self, state: dict, version: int) -> _State:
        if list(state["features"]) != list(self.features):
            raise StateError(f"zscore state has features {state['features']}, configured {list(self.features)}")
        n_features = len(self.features)
        sets = {}
        for ks, name in self._state_tables():
            fi = self._fidx[ks]
            data = state["key_sets"].get(name)
            if data is None:  # e.g. a seasonal level added since the snapshot: starts empty
                sets[name] = _KeySetState.of([], _Stats.empty(len(fi)))
                continue
            cols: np.ndarray | slice  # the stored columns this key set keeps
            if version == 1:  # every feature per table: keep the key set's own columns
                cols, width = fi, n_features
            else:
                stored = list(data["features"])
                if stored != [self.features[j] for j in fi]:
                    raise StateError(f"zscore state of {name} has features {stored}, configured {[self.features[j] for j in fi]}")
                cols, width = slice(None), len(fi)
            keys = list(data["keys"])
            if not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
                raise StateError(f"zscore state of {name}: keys must be distinct strings")
            n = len(keys)
            count, mean, m2 = (_array(data[k], (n, width), f"{name}.{k}")[:, cols] for k in ("count", "mean", "m2"))
            sets[name] = _KeySetState.of(keys, _Stats(count, mean, m2, _array(data["last_seen"], (n,), f"{name}.last_seen")))
        g = state["global"]
        count, mean, m2 = (_array(g[k], (1, n_features), f"global.{k}") for k in ("count", "mean", "m2"))
        return _State(sets, _Stats(count, mean, m2, np.full(1, -np.inf)))


def _array(value: object, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A float64 copy of a stored array of exactly ``shape``; ``StateError`` otherwise."""
    array = np.array(value, dtype=np.float64)
    if array.shape != shape:
        raise StateError(f"zscore state {what} has shape {array.shape}, expected {shape}")
    return array


def _level(key_set: str, period: str) -> str:
    return f"{key_set}@{period}"


def _stack(groupings: list[_Grouping]) -> tuple[np.ndarray, _Prior, list[int]]:
    """A key set's levels as one table for ``key_set_scores``: each event's row per level (L, n),
    the prior statistics of all levels' rows stacked (R, F) x 3, and each level's first row."""
    offsets = [0]
    for g in groupings:
        offsets.append(offsets[-1] + len(g.slots))
    if groupings[0].group.size:
        # offsets has one more entry than groupings: the end of the last level's rows.
        groups = np.stack([g.group + start for g, start in zip(groupings, offsets[:-1], strict=True)])
    else:
        groups = np.zeros((len(groupings), 0), dtype=np.int64)

    def stacked(j: int) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([g.prior[j] for g in groupings]))

    return groups, (stacked(0), stacked(1), stacked(2)), offsets


def _in_original_units(feature: str, value: float, mean: float) -> tuple[str, str, str]:
    """(field name, value, typical value) as a person reads them: log features back in units."""
    if feature == "log_price_ratio":  # log(|amount| / (quantity * unit_price))
        return "amount / (quantity x unit_price)", f"{np.exp(value):,.4g}", f"{np.exp(mean):,.4g}"
    if feature.startswith("log_"):
        field = feature[4:]
        typical = float(np.sign(mean) * np.expm1(abs(mean)))
        original = float(np.sign(value) * np.expm1(abs(value)))
        return field, f"{original:,.2f}", f"{typical:,.2f}"
    return feature, f"{value:,.4g}", f"{mean:,.4g}"
