"""Level shifts: a key whose events keep deviating from its baseline in one direction.

The detectors learn only the events the pipeline does not flag, so a key whose level moves for
good (a price change, a store that changes format, a new store at another scale) would be
flagged for ever. The tracker watches, per z-score key set, key and feature:

- the run of the key's latest events whose z-score points the same way, each at least
  ``min_z`` sd off and on average ``mean_z`` sd: a shift at ``lasting`` events;
- for keys that move together (a key set's ``moves_with``: a product's currency keys), their
  runs pooled, each on average ``pooled_mean_z`` sd off, and once one of them has shifted, the
  others' first event that fits the same change (``expected``);
- for the ``gradual`` key sets (stores), a CUSUM of the z-scores (``cusum.py``), for shifts
  below ``min_z`` (a store whose baskets grow 3x moves about 1.4 sd).

At a declaration the pipeline publishes one change record per key, the z-score detector
re-learns the key (``Detector.relearn``), and for the key's next ``adapt_events`` events the
population models (``Detector.population``) may not flag it alone, its events stay out of
the calibrators' windows, and on the features the shift moved (``moving``) the key's own
baselines learn its every event (``Detector.score_adapting``) while the other key sets'
baselines no longer judge it (``Adaptation``, ``Detector.focus``): a store at 30x moves every
product's quantities, not their prices.

Short anomalies stay anomalies: on the generator (60,000 events, seed 5, with and without
drift) the longest such run of an injected short anomaly is 5 events (a refund burst in one
store) and no run of normal events reaches 8, so ``lasting`` defaults to 8.

The tracker is sequential like the detectors: whether event ``i`` declares a shift depends only
on the events before it and on its own z-scores. ``scan`` reads a settled segment without
changing anything; ``adopt`` makes what it found current.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from stream_detector.detectors.zscore_kernel import factorize
from stream_detector.errors import StateError
from stream_detector.features import FeatureBatch, moved_together
from stream_detector.scoring.cusum import CusumTable, Pending
from stream_detector.scoring.cusum_kernel import cusum

# 2: adds the CUSUM sums of gradual shifts and the changes expected of keys that move with a
# shifted key. 3: each adapting key names the features its shifts moved. (Versions 1 and 2 are
# still read: their adapting keys moved every feature of their key set.)
STATE_VERSION = 3
# Declared shifts remembered so that feedback can reject one (the oldest go first).
MAX_REMEMBERED = 1000
# Runs in progress (a key and feature whose latest events deviate one way): a few dozen in a
# normal stream; the bound keeps a flood of new keys that each deviate once from growing the
# state, which every checkpoint writes whole (the oldest runs are dropped first).
MAX_RUNS = 1_000
# Feedback labels that reject a shift (alerting/feedback.py LABELS): the old baseline returns.
REJECT_LABELS = ("reject", "false_positive")


@dataclass(frozen=True)
class LevelShift:
    """One declared shift: ``feature`` of ``key`` (in ``key_set``) moved from ``old_level`` to
    ``new_level`` (the feature's units, e.g. log amount) over ``events`` events since ``began``."""

    shift_id: str
    key_set: str
    key: str
    feature: str
    old_level: float
    new_level: float
    began: float  # event time of the run's first event
    event_time: float  # event time of the event that declared it
    events: int
    event_id: str
    # -log10 of the chance that ``events`` normal events in a row each lie ``min_z`` sd or more
    # off the same way (2 * P(Z > min_z) ** events): what the record's score and surprise say.
    surprise: float = 0.0


@dataclass(frozen=True)
class _Run:
    """A key's current run on one feature: its direction, length, summed |z|, first event time,
    summed baselines, and the key set's values at its last ``lasting`` events (to re-learn the
    key from)."""

    direction: int
    length: int
    total_z: float
    began: float
    baseline: float  # summed baseline means the run's z-scores were measured against
    values: np.ndarray  # (m, F), m <= lasting: the key set's features at the run's last events


class _Column(NamedTuple):
    """One key set's feature over a batch: its keys, z-scores, the baselines they were measured
    against, the key set's values (all its features) and the event times."""

    keys: np.ndarray
    ks: str
    feature: str
    z: np.ndarray
    baseline: np.ndarray
    values: np.ndarray
    event_time: np.ndarray
    warm: np.ndarray  # the key was scored against its own baseline

    def head(self, end: int) -> _Column:
        return _Column(self.keys[:end], self.ks, self.feature, self.z[:end], self.baseline[:end], self.values[:end], self.event_time[:end], self.warm[:end])


@dataclass(frozen=True)
class Adaptation:
    """How the level shifts change the judging of a batch's events (``Detector.focus``).

    ``moved``: (key set, feature) -> the events of that key set's keys adapting to a shift of
    that feature (``adapting_masks``). ``shifted``: (key set, feature) -> per event, the change
    of level its key is expected to take because a key it moves with took it (NaN: none), until
    the key takes it itself."""

    moved: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    shifted: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.moved or self.shifted)

    def events(self, n: int) -> np.ndarray:
        """bool (n,): the events either marks."""
        out = np.zeros(n, dtype=bool)
        for mask in self.moved.values():
            out |= mask
        for delta in self.shifted.values():
            out |= ~np.isnan(delta)
        return out

    def head(self, end: int) -> Adaptation:
        return Adaptation({k: m[:end] for k, m in self.moved.items()}, {k: d[:end] for k, d in self.shifted.items()})


@dataclass
class Scan:
    """What ``scan`` found in a segment: the runs after its events (up to the first declaration,
    which is left out: it is scored again once the key has re-learnt), the declaring event
    (None: none) and its run."""

    runs: dict[tuple[str, str, str], _Run]
    # (key set, feature, direction) -> the CUSUM state of the batch's keys after it.
    sums: dict[tuple[str, str, int], Pending] = field(default_factory=dict)
    declared: int | None = None
    run: _Run | None = None
    where: tuple[str, str, str] | None = None
    gradual: bool = False  # declared by the CUSUM of a gradual shift, not by a run
    # Keys that move with the declaring one (``together``) and whose open runs counted toward
    # its declaration: declared with it, each from its own run.
    also: list[tuple[tuple[str, str, str], _Run]] = field(default_factory=list)


@dataclass
class LevelShiftTracker:
    """Runs per (key set, key, feature) over a z-score detector's scores (module docstring).

    ``key_sets``: the key sets tracked, each with the names of its features in the detector's
    column order; ``axis``: each one's position among the detector's key sets (the second axis
    of its ``details["z"]``, whose last axis is the detector's ``features``)."""

    key_sets: dict[str, tuple[str, ...]]
    features: tuple[str, ...]
    axis: dict[str, int]
    lasting: int = 8
    min_z: float = 2.0
    mean_z: float = 3.0
    adapt_events: int = 5000
    detector: str = "zscore"
    # key set -> positions of the key fields whose keys shift together (``moves_with``).
    together: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # How far off on average each pooled run must be (``together``).
    pooled_mean_z: float = 4.5
    # Key sets watched for gradual shifts too, and their CUSUM (cusum_kernel.py): each event
    # adds min(z, cap) - slack, a shift is declared at ``threshold``.
    gradual: tuple[str, ...] = ()
    gradual_slack: float = 0.5
    gradual_cap: float = 2.0
    gradual_threshold: float = 25.0
    runs: dict[tuple[str, str, str], _Run] = field(default_factory=dict)
    # (key set, key) -> events of the key still to come before the population models may flag
    # it alone again.
    adapting: dict[tuple[str, str], int] = field(default_factory=dict)
    # (key set, key) -> the features its shifts moved (each declared one, and those composed of
    # it: a re-priced product moves its prices and amounts, not its quantities), while it adapts.
    moving: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # shift id -> (key set, key, feature, the rows ``relearn`` replaced), for a rejection.
    undo: dict[str, tuple[str, str, str, Any]] = field(default_factory=dict)
    # Shifts an analyst rejected: (key set, key, feature) -> shift id. Their runs declare no
    # shift again: the new level keeps alerting.
    rejected: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # Shift ids with feedback taken, and its label (a second feedback is a duplicate).
    decided: dict[str, str] = field(default_factory=dict)
    # (key set, feature, direction) -> the CUSUM of each key of a ``gradual`` key set.
    sums: dict[tuple[str, str, int], CusumTable] = field(default_factory=dict)
    # (key set, shared fields' values, feature) -> (the shifted key, its change of level): a
    # key sharing those fields takes the same change at its first event that fits it, while
    # the shifted key adapts.
    expected: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)

    # -- scanning ------------------------------------------------------------------------------

    def scan(self, batch: FeatureBatch, z: np.ndarray, baseline: np.ndarray, warm: np.ndarray | None = None) -> Scan:
        """The runs after ``batch`` given its z-scores and the baseline means they were measured
        against (both (n, key sets, features)), up to the first event that declares a shift
        (the first column wins a tie), that event left out."""
        runs: dict[tuple[str, str, str], _Run] = dict(self.runs)
        sums: dict[tuple[str, str, int], Pending] = {}
        columns = self._columns(batch, z, baseline, warm)
        hits = [(*hit, False) for column in columns if (hit := self._walk(column, runs, declare=True)) is not None]
        hits += [(*sum_hit, [], True) for column in columns if column.ks in self.gradual and (sum_hit := self._drift(column, sums, declare=True)) is not None]
        if not hits:
            return Scan(runs, sums)
        index, where, run, also, gradual = min(hits, key=lambda hit: hit[0])
        # Each column stopped at its own first declaration: walk them again up to ``index``,
        # which is not walked: the pipeline scores it again once the key has re-learnt.
        runs, sums = dict(self.runs), {}
        end = index
        for column in columns:
            self._walk(column.head(end), runs, declare=False)
            if column.ks in self.gradual:
                self._drift(column.head(end), sums, declare=False)
        for relearnt in [where[:2]] + [w[:2] for w, _ in also]:
            for stale in [r for r in runs if r[:2] == relearnt]:
                del runs[stale]  # the key re-learns: every feature's run starts again
            for (ks, _, _), pending in sums.items():
                if ks == relearnt[0]:
                    pending.reset(relearnt[1])
        return Scan(runs, sums, index, run, where, gradual, also)

    def _columns(self, batch: FeatureBatch, z: np.ndarray, baseline: np.ndarray, warm: np.ndarray | None) -> list[_Column]:
        """Each tracked key set's features over the batch (``warm``: (n, key sets), whether the
        event's key was scored against its own baseline; None: all were)."""
        out = []
        for ks, names in self.key_sets.items():
            keys = batch.keys.get(ks)
            if keys is None:
                continue
            k = self.axis[ks]
            values = batch.matrix(names)
            own = np.ones(batch.n, dtype=bool) if warm is None else np.asarray(warm[:, k], dtype=bool)
            out += [
                _Column(keys, ks, feature, z[:, k, j], baseline[:, k, j], values, batch.event_time, own)
                for feature, j in zip(names, map(self.features.index, names), strict=True)
            ]
        return out

    def _walk(
        self, column: _Column, runs: dict[tuple[str, str, str], _Run], declare: bool
    ) -> tuple[int, tuple[str, str, str], _Run, list[tuple[tuple[str, str, str], _Run]]] | None:
        """Walk one feature's events in order, updating ``runs``; with ``declare``, stop at the
        first declaration and return (index, run key, run, the runs declared with it). Only the
        events of keys that have or start a run are visited.

        Keys that move together (``together``) pool their open runs the same way: a product
        re-priced in every currency is declared once its currency keys' runs reach ``lasting``
        events together, each run counted while on average ``pooled_mean_z`` sd off. A key's run still
        ends at its own next event that does not deviate, so a change in one currency only is
        declared by that key's run.

        An event whose value has not the sign of its baseline does not extend a run: the log
        features are sign * log1p(|x|), so that is a refund or a zero among sales, another kind
        of event rather than a new level (a refund burst at a quiet hour is 8-15 in a row)."""
        keys, ks, feature, z, baseline, values, event_time, _ = column
        column_values = values[:, self.key_sets[ks].index(feature)]
        with np.errstate(invalid="ignore"):
            deviating = (np.abs(z) >= self.min_z) & (column_values * baseline > 0)
        # Every event of a key that has or starts a run: a non-deviating one ends the run. Looked
        # up from the batch's keys, so the cost does not grow with the runs held.
        expected = self._expected_for(ks, feature) if declare else None
        # entity -> keys of it with a run on this feature (some may have ended since).
        pooled: dict[str, set[str]] | None = None
        if declare and ks in self.together:
            pooled = {}
            for r_ks, r_key, r_feature in runs:
                if r_ks == ks and r_feature == feature:
                    pooled.setdefault(self.entity(ks, r_key), set()).add(r_key)
        key_list = keys.tolist()
        watched = {key for key in set(key_list) if (ks, key, feature) in runs} | set(keys[deviating].tolist())
        watched.discard(None)
        if not watched:
            return None
        # Only the watched keys' events are walked (found at C speed); plain lists, as numpy
        # scalars (and np.isin on objects) cost more than the work per event.
        visit = np.flatnonzero(np.fromiter(map(watched.__contains__, key_list), dtype=bool, count=len(key_list)))
        z_list, dev_list = z.tolist(), deviating.tolist()
        for i in visit.tolist():
            key = key_list[i]
            zi = z_list[i]
            if zi != zi:  # NaN: not scored on this feature
                continue
            where = (ks, key, feature)
            if not dev_list[i]:
                runs.pop(where, None)
                continue
            run = runs.get(where)
            direction = 1 if zi > 0 else -1
            row = values[i : i + 1]
            if run is None or run.direction != direction:
                run = _Run(direction, 1, abs(zi), float(event_time[i]), float(baseline[i]), row.copy())
            else:
                kept = np.vstack([run.values[1 - self.lasting :] if self.lasting > 1 else run.values[:0], row])
                run = _Run(direction, run.length + 1, run.total_z + abs(zi), run.began, run.baseline + float(baseline[i]), kept)
            runs[where] = run
            if not declare or where in self.rejected:
                continue
            if run.length >= self.lasting and run.total_z / run.length >= self.mean_z:
                return i, where, run, []
            if expected is not None and self._fits_expected(expected, ks, key, zi, float(column_values[i]), float(baseline[i])):
                # Re-learnt from this event alone: earlier ones of its run may be a price error.
                return i, where, dataclasses.replace(run, values=row.copy()), []
            if pooled is not None:
                partners = pooled.setdefault(self.entity(ks, key), set())
                partners.add(key)
                also = self._pooled(runs, ks, feature, key, run, partners)
                if also is not None:
                    return i, where, run, also
        return None

    def _pooled(
        self, runs: dict[tuple[str, str, str], _Run], ks: str, feature: str, key: str, run: _Run, partners: set[str]
    ) -> list[tuple[tuple[str, str, str], _Run]] | None:
        """The other keys' runs to declare with ``key``'s when their pooled length reaches
        ``lasting`` (None: not yet): runs the same way, each on average ``mean_z`` sd off."""
        if run.total_z / run.length < self.pooled_mean_z:
            return None
        also = []
        for other in partners:
            where = (ks, other, feature)
            theirs = runs.get(where)
            if other == key or theirs is None or theirs.direction != run.direction or where in self.rejected:
                continue
            if theirs.total_z / theirs.length >= self.pooled_mean_z:
                also.append((where, theirs))
        if not also or run.length + sum(r.length for _, r in also) < self.lasting:
            return None
        return also

    def _drift(self, column: _Column, sums: dict[tuple[str, str, int], Pending], declare: bool) -> tuple[int, tuple[str, str, str], _Run] | None:
        """The CUSUM of one feature's events, both ways, into ``sums`` (the state of their keys
        after them); with ``declare``, the first event whose sum reaches ``gradual_threshold`` (and
        its excursion as a run: ``scan`` then walks the events up to it again).
        Events counted as by ``_walk`` (a value of the other sign than its baseline, a refund
        among sales, is not), and only those of keys scored against their own baseline: a key
        still learning has no level to drift from (and a flood of new keys, each seen once,
        would each hold a sum)."""
        keys, ks, feature, z, baseline, values, event_time, warm = column
        with np.errstate(invalid="ignore"):
            counted = (values[:, self.key_sets[ks].index(feature)] * baseline > 0) & ~np.isnan(z) & warm
        groups = _KeyGroups.of(keys)
        codes, distinct = groups.codes, groups.distinct
        for g, key in enumerate(distinct):  # a key adapting to a shift is not summed
            left = self.adapting.get((ks, key)) if key is not None else None
            if left is not None:
                counted[groups.events(g)[:left]] = False
        column_values = values[:, self.key_sets[ks].index(feature)]
        last = groups.order[groups.bounds[1:] - 1]  # each key's last event in the batch (None's: unused)
        first: tuple[int, tuple[str, str, str], _Run] | None = None
        named = [key for key in distinct if key is not None]
        mine = np.array([key is not None for key in distinct], dtype=bool)
        for direction in (1, -1):
            table = self.sums.get((ks, feature, direction), CusumTable())
            # Per distinct key (None included, at 0): the state it held before the batch.
            totals, bases, values_sum = np.zeros(len(distinct)), np.zeros(len(distinct)), np.zeros(len(distinct))
            lengths, held_began = np.zeros(len(distinct), dtype=np.int64), np.full(len(distinct), np.nan)
            totals[mine], lengths[mine], bases[mine], values_sum[mine], held_began[mine] = table.gather(named)
            signed = np.where(counted, direction * z, np.nan)
            s, length, base, total, start = cusum(
                codes, signed, baseline, column_values, totals, lengths, bases, values_sum, self.gradual_cap, self.gradual_slack
            )
            if declare:
                reached = np.flatnonzero(counted & (s >= self.gradual_threshold)).tolist()
                crossed = [i for i in reached if (ks, distinct[codes[i]], feature) not in self.rejected]
                if crossed and (first is None or crossed[0] < first[0]):
                    i = crossed[0]
                    g = int(codes[i])
                    began = float(event_time[start[i]]) if start[i] >= 0 else float(held_began[g])
                    # The excursion's mean value, for ``relearn``: the one feature it summed.
                    row = np.full((1, len(self.key_sets[ks])), np.nan)
                    row[0, self.key_sets[ks].index(feature)] = total[i] / length[i]
                    first = (i, (ks, distinct[g], feature), _Run(direction, int(length[i]), float(s[i]), began, float(base[i]), row))
            # When each key's excursion began: at its last event's ``start`` in the batch, or before.
            at = last[mine]
            began_now = np.where(start[at] >= 0, event_time[np.maximum(start[at], 0)], held_began[mine])
            sums[(ks, feature, direction)] = Pending(named, totals[mine], lengths[mine], bases[mine], values_sum[mine], began_now, event_time[at])
        return first

    def _expected_for(self, ks: str, feature: str) -> dict[str, tuple[str, float]] | None:
        """Shared fields' values -> (shifted key, change of level) for the changes keys of
        ``ks`` may take on ``feature`` now (None: none)."""
        if ks not in self.together or not self.expected:
            return None
        out = {
            entity: change
            for (e_ks, entity, e_feature), change in self.expected.items()
            if e_ks == ks and e_feature == feature and (ks, change[0]) in self.adapting
        }
        return out or None

    def entity(self, ks: str, key: str) -> str:
        """The values of ``key``'s fields that move together (``together``), joined."""
        parts = key.split("|")
        return "|".join(parts[p] for p in self.together[ks] if p < len(parts))

    def _fits_expected(self, expected: dict[str, tuple[str, float]], ks: str, key: str, z: float, value: float, baseline: float) -> bool:
        """Whether an event of ``key`` that deviates ``z`` sd from ``baseline`` lies within
        ``min_z`` sd of the level a shifted key sharing its fields moved to."""
        change = expected.get(self.entity(ks, key))
        if change is None or change[0] == key or value == baseline:
            return False
        delta = change[1]
        std = (value - baseline) / z
        return delta * z > 0 and abs(value - baseline - delta) / abs(std) < self.min_z

    # -- adopting --------------------------------------------------------------------------------

    def adopt(self, scan: Scan, batch: FeatureBatch) -> None:
        """Make a scan's runs current and count the segment's events against the adapting keys
        (``batch``: the segment, up to a declaration, the declaring event left out)."""
        self.runs = scan.runs
        _bound(self.runs, MAX_RUNS)
        for where, pending in scan.sums.items():
            self.sums.setdefault(where, CusumTable()).apply(pending)
        if not self.adapting:
            return
        for ks, key, events in self._adapting_events(batch):
            left = self.adapting[(ks, key)]
            if events.size >= left:
                del self.adapting[(ks, key)]
                self.moving.pop((ks, key), None)
            else:
                self.adapting[(ks, key)] = left - events.size

    def _adapting_events(self, batch: FeatureBatch) -> list[tuple[str, str, np.ndarray]]:
        """(key set, key, its events in the batch, in order) for each adapting key the batch
        holds: one pass over each key set's keys, however many keys adapt (a price list moves
        hundreds of products at once)."""
        out = []
        for ks in {ks for ks, _ in self.adapting}:
            keys = batch.keys.get(ks)
            if keys is None or not len(keys):
                continue
            groups = _KeyGroups.of(keys)
            out += [(ks, key, groups.events(g)) for g, key in enumerate(groups.distinct) if key is not None and (ks, key) in self.adapting]
        return out

    def declared(
        self,
        scan: Scan,
        batch: FeatureBatch,
        new: np.ndarray,
        undo: Any,
        which: tuple[tuple[str, str, str], _Run] | None = None,
        moved: tuple[str, ...] = (),
    ) -> LevelShift:
        """Record the shift ``scan`` declared (after ``adopt``), or ``which`` of the runs
        declared with it (``scan.also``): the key adapts from now on. Its old level is the
        baseline the run was measured against (a key still learning is measured against every
        key's events), its new level the key's after ``relearn``. ``moved``: the features whose
        level ``relearn`` moved (the declared one always): a store declared on its amounts whose
        quantities moved too."""
        assert scan.declared is not None and scan.run is not None and scan.where is not None
        (ks, key, feature), run = which if which is not None else (scan.where, scan.run)
        names = self.key_sets[ks]
        j = names.index(feature)
        i = scan.declared
        event_id = str(batch.event_ids[i]) if len(batch.event_ids) else str(i)
        shift = LevelShift(
            shift_id=f"level_shift:{ks}:{key}:{feature}:{event_id}",
            key_set=ks,
            key=key,
            feature=feature,
            old_level=run.baseline / run.length,
            new_level=float(new[j]),
            began=run.began,
            event_time=float(batch.event_time[i]),
            events=run.length,
            event_id=event_id,
            surprise=self._surprise(scan),
        )
        self.adapting[(ks, key)] = self.adapt_events
        self.moving[(ks, key)] = moved_together((*self.moving.get((ks, key), ()), *moved, feature))
        _bound(self.adapting)  # a key that never comes back would keep its place for ever
        if len(self.moving) > len(self.adapting):
            self.moving = {where: moved for where, moved in self.moving.items() if where in self.adapting}
        if ks in self.together:
            where = (ks, self.entity(ks, key), feature)
            lead = self.expected.get(where)
            if lead is None or (ks, lead[0]) not in self.adapting or lead[0] == key:
                self.expected[where] = (key, shift.new_level - shift.old_level)
                _bound(self.expected)
        self.undo[shift.shift_id] = (ks, key, feature, undo)
        _bound(self.undo)
        return shift

    def _surprise(self, scan: Scan) -> float:
        """-log10 of the chance of the declaring evidence among normal events: ``length`` events
        in a row each ``min_z`` sd off the same way (a run), or, for a CUSUM, their mean clipped
        z-score as far off (2 * P(Z > mean * sqrt(length)))."""
        assert scan.run is not None
        run = scan.run
        if not scan.gradual:  # pooled runs: all their events
            events = run.length + sum(r.length for _, r in scan.also)
            return -(math.log10(2.0) + events * math.log10(0.5 * math.erfc(self.min_z / math.sqrt(2.0))))
        mean = (run.total_z + self.gradual_slack * run.length) / run.length
        tail = 0.5 * math.erfc(mean * math.sqrt(run.length) / math.sqrt(2.0))
        return -math.log10(2.0 * max(tail, 1e-300))

    # -- feedback --------------------------------------------------------------------------------

    def knows(self, shift_id: str) -> bool:
        return shift_id in self.undo or shift_id in self.decided

    def feedback(self, shift_id: str, label: str) -> tuple[str, tuple[str, str, Any] | None]:
        """Take an analyst's verdict on a shift: (outcome, what to restore). ``reject`` (or
        ``false_positive``) gives (applied, (key set, key, rows)): the caller puts the rows back;
        the key adapts no more and its run on that feature declares no shift again. ``accept``
        (or ``true_positive``) keeps the new level: (recorded, None). A second verdict:
        (duplicate, None); an unknown id: (unknown_event, None)."""
        if shift_id in self.decided:
            return "duplicate", None
        entry = self.undo.pop(shift_id, None)
        if entry is None:
            return "unknown_event", None
        ks, key, feature, rows = entry
        self.decided[shift_id] = label
        _bound(self.decided)
        if label not in REJECT_LABELS:
            return "recorded", None
        self.adapting.pop((ks, key), None)
        self.moving.pop((ks, key), None)
        for gone in [w for w, (lead, _) in self.expected.items() if w[0] == ks and lead == key]:
            del self.expected[gone]  # the keys that move with it keep their own baselines
        for stale in [r for r in self.runs if r[:2] == (ks, key)]:
            del self.runs[stale]
        for (table_ks, _, _), table in self.sums.items():
            if table_ks == ks:
                table.reset(key)
        self.rejected[(ks, key, feature)] = shift_id
        _bound(self.rejected)
        return "applied", (ks, key, rows)

    def adaptation(self, batch: FeatureBatch) -> Adaptation:
        """What the shifts change about judging ``batch`` (``Adaptation``)."""
        return Adaptation(self.adapting_masks(batch), self.expected_shifts(batch))

    def expected_shifts(self, batch: FeatureBatch) -> dict[tuple[str, str], np.ndarray]:
        """(key set, feature) -> per event, the change of level a key moving with a shifted key
        is expected to take (NaN: none): events of keys that have not taken it yet, while the
        shifted key adapts. Their key set judges them against their old level moved by it, so
        the event that takes the change (``_fits_expected``) raises no alert. One pass over the
        batch's keys per key set, however many changes are expected (a price list changes
        hundreds of products at once)."""
        active: dict[str, dict[str, dict[str, tuple[str, float]]]] = {}  # key set -> feature -> entity -> change
        for (ks, entity, feature), (lead, delta) in self.expected.items():
            if (ks, lead) in self.adapting:
                active.setdefault(ks, {}).setdefault(feature, {})[entity] = (lead, delta)
        out: dict[tuple[str, str], np.ndarray] = {}
        for ks, by_feature in active.items():
            keys = batch.keys.get(ks)
            if keys is None:
                continue
            groups = _KeyGroups.of(keys)
            # Per distinct key, then to its events: a key's entity is computed once a batch.
            entities = [None if key is None else self.entity(ks, key) for key in groups.distinct]
            for feature, changes in by_feature.items():
                per_key = np.full(len(groups.distinct) + 1, np.nan)  # the last: events without a key
                for g, (key, of) in enumerate(zip(groups.distinct, entities, strict=True)):
                    change = changes.get(of) if of is not None else None
                    if change is not None and key != change[0] and (ks, key) not in self.adapting:
                        per_key[g] = change[1]
                column = per_key[groups.codes]
                if not np.isnan(column).all():
                    out[(ks, feature)] = column
        return out

    def adapting_masks(self, batch: FeatureBatch) -> dict[tuple[str, str], np.ndarray]:
        """(key set, feature) -> bool (n,): the batch's events of that key set's keys that adapt
        to a shift (within ``adapt_events`` of it), for each feature their shifts moved and each
        composed of those (a new level moves the other key sets' baselines of those: a store at
        30x moves every product's quantities, a re-priced product its stores' amounts but not
        their quantities); pairs without such events are left out."""
        masks: dict[tuple[str, str], np.ndarray] = {}
        for ks, key, events in self._adapting_events(batch):
            mine = events[: self.adapting[(ks, key)]]
            for feature in self.moving.get((ks, key)) or moved_together(self.key_sets[ks]):
                masks.setdefault((ks, feature), np.zeros(batch.n, dtype=bool))[mine] = True
        return masks

    @staticmethod
    def run_statistics(run: _Run) -> tuple[np.ndarray, np.ndarray]:
        """(level, variance) of the key set's features over a run's last events, robust to a
        point anomaly among them (a price error in the run of a re-priced product): the median,
        and the squared scaled median absolute deviation (NaN where a feature was never seen)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, by design
            level = np.nanmedian(run.values, axis=0)
            spread = 1.4826 * np.nanmedian(np.abs(run.values - level), axis=0)
        return level, spread * spread

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "runs": [[ks, key, f, r.direction, r.length, r.total_z, r.began, r.baseline, r.values] for (ks, key, f), r in self.runs.items()],
            "adapting": [[ks, key, left, list(self.moving.get((ks, key), ()))] for (ks, key), left in self.adapting.items()],
            "undo": [[shift_id, ks, key, f, rows] for shift_id, (ks, key, f, rows) in self.undo.items()],
            "rejected": [[ks, key, f, shift_id] for (ks, key, f), shift_id in self.rejected.items()],
            "decided": [[shift_id, label] for shift_id, label in self.decided.items()],
            "expected": [[ks, entity, f, key, delta] for (ks, entity, f), (key, delta) in self.expected.items()],
            "drifts": [[ks, key, f, direction, *entry] for (ks, f, direction), table in self.sums.items() for key, *entry in table.entries()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, 2, STATE_VERSION):
            raise StateError(f"level shift state version {state.get('version')!r}, expected {STATE_VERSION}")
        try:
            runs = {(ks, key, f): run for ks, key, f, run in self._load_runs(state["runs"])}
            loaded: dict[tuple[str, str, int], list[tuple[str, float, int, float, float, float, float]]] = {}
            for ks, key, f, direction, total, length, began, base, value, seen in state.get("drifts", []):
                if f not in self.key_sets.get(ks, ()) or int(length) < 1:
                    raise StateError(f"level shift sum of {ks} {f} does not fit the key sets", reason="incompatible")
                entry = (str(key), float(total), int(length), float(began), float(base), float(value), float(seen))
                loaded.setdefault((str(ks), str(f), int(direction)), []).append(entry)
            sums = {where: _table(entries) for where, entries in loaded.items()}
            adapting = {(str(ks), str(key)): int(left) for ks, key, left, *_ in state["adapting"]}
            # Before version 3: every feature of the key set (``adapting_masks``' default).
            moving = {(str(ks), str(key)): tuple(str(f) for f in rest[0]) for ks, key, _, *rest in state["adapting"] if rest and rest[0]}
            undo = {str(shift_id): (str(ks), str(key), str(f), rows) for shift_id, ks, key, f, rows in state["undo"]}
            rejected = {(str(ks), str(key), str(f)): str(shift_id) for ks, key, f, shift_id in state["rejected"]}
            decided = {str(shift_id): str(label) for shift_id, label in state["decided"]}
            expected = {(str(ks), str(entity), str(f)): (str(key), float(delta)) for ks, entity, f, key, delta in state.get("expected", [])}
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"level shift state is malformed: {exc!r}", reason="corrupt") from None
        self.runs, self.adapting, self.undo, self.rejected, self.decided = runs, adapting, undo, rejected, decided
        self.moving = moving
        self.sums, self.expected = sums, expected

    def _load_runs(self, entries: list[Any]) -> list[tuple[str, str, str, _Run]]:
        out = []
        for ks, key, f, direction, length, total_z, began, baseline, values in entries:
            kept = np.asarray(values, dtype=np.float64)
            if f not in self.key_sets[ks] or kept.ndim != 2 or kept.shape[1] != len(self.key_sets[ks]) or not 0 < len(kept) <= self.lasting:
                raise StateError(f"level shift run of {ks} {f} does not fit the key set", reason="incompatible")
            out.append((str(ks), str(key), str(f), _Run(int(direction), int(length), float(total_z), float(began), float(baseline), kept)))
        return out


def _table(entries: list[tuple[str, float, int, float, float, float, float]]) -> CusumTable:
    """A CUSUM table holding ``entries`` (key, sum, length, began, summed baselines and values,
    last seen)."""
    table = CusumTable()
    keys, total, length, began, base, value, seen = zip(*entries, strict=True)
    table.apply(Pending(list(keys), np.array(total), np.array(length, dtype=np.int64), np.array(base), np.array(value), np.array(began), np.array(seen)))
    return table


class _KeyGroups(NamedTuple):
    """A batch's events grouped by key: each event's code (-1: no key), the distinct keys (None
    among them where some events have none), and each key's events in order (``events``)."""

    codes: np.ndarray
    distinct: list[Any]
    order: np.ndarray
    bounds: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray) -> _KeyGroups:
        codes, distinct = factorize(keys.tolist())
        if None in distinct:
            codes = np.where(codes == distinct.index(None), -1, codes)
        order = np.argsort(codes, kind="stable")  # a stable sort: each key's events stay in order
        return cls(codes, distinct, order, np.searchsorted(codes[order], np.arange(len(distinct) + 1)))

    def events(self, g: int) -> np.ndarray:
        return self.order[self.bounds[g] : self.bounds[g + 1]]


def _bound(remembered: dict[Any, Any], most: int = MAX_REMEMBERED) -> None:
    """Forget the oldest entries past ``most``."""
    while len(remembered) > most:
        del remembered[next(iter(remembered))]
