"""Score a batch with every detector, calibrate, fuse, decide, and learn from the normal events.

The pipeline is sequential in meaning and batched in execution. Event ``i`` is scored by
detectors that learned every earlier event that was *not* flagged; whether an event is flagged
depends on those scores. Detectors score a whole batch given a learn mask, so the pipeline
starts with "learn everything", flags, and re-scores with the flagged events masked out until
the flags stop changing. The answer is the sequential one: each round fixes at least the
events up to the first flag that changed, and there is only one self-consistent assignment.
Besides flagged events, a detector may reject gross outliers from learning (``Step.reject``,
e.g. a 10-sigma value while a key is still warming up) by the same rule: the decision for event
``i`` depends only on the events before it. Almost every batch settles in two rounds; if one does not within ``max_rounds``, the settled
prefix is committed and the rest is processed as a batch of its own.

Level shifts (scoring/level_shift.py) keep this meaning: a settled segment is read by the
tracker, and if one of its events completes a lasting run, only the events up to it are
committed (scored again alone: the same scores, by the sequential semantics), the shift is
applied (the key re-learned) and the rest is processed as a segment of its own, so the event
after the shift sees the new level whatever the batch size. While a key adapts to its shift,
the masks that judge its events are fixed per segment (they depend on the key's events, not
on flags).

Cost: every round scores the whole batch, so the pipeline keeps rounds cheap. A detector may
offer a cheap ``guess(batch, learn)`` for the first round (the autoencoder scores with its committed network
instead of training clones); guesses only propose the masks, and a batch settles only on a
round where every score is exact. A detector whose learn mask did not change between rounds
is not scored again.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from stream_detector.detectors.base import CollectiveDetector, Detector, KeyAlert, KeyedState, Step
from stream_detector.errors import StateError
from stream_detector.events.event_time import EventTimeGuard
from stream_detector.features import FeatureBatch
from stream_detector.scoring import fusion
from stream_detector.scoring.calibration import ScoreCalibrator
from stream_detector.scoring.level_shift import Adaptation, LevelShift, LevelShiftTracker


@dataclass
class Segment:
    """Part of a batch processed in one go: its offset in the batch and each detector's step."""

    start: int
    batch: FeatureBatch
    steps: dict[str, Step]


@dataclass(frozen=True)
class PartFailure:
    """A part of a snapshot that was not restored (it started fresh): ``part`` is
    ``detector:<name>``, ``calibrator:<name>``, ``timer:<name>``, ``feedback``, ``level_shifts`` or ``event_time``; ``reason`` is
    a ``StateError`` reason (errors.STATE_FAILURE_REASONS)."""

    part: str
    reason: str
    message: str


@dataclass
class BatchResult:
    """Scores and decisions for one batch, aligned with its events.

    ``fused`` and ``probability`` decide (probabilities floored at 1e-12); ``log_probability``
    and ``surprise`` rank beyond the floor (scoring/fusion.py) and decide nothing.
    """

    fused: np.ndarray  # float64 (n,), in [0, 1], higher = more anomalous
    is_anomaly: np.ndarray  # bool (n,)
    probability: dict[str, np.ndarray]  # detector -> tail probability (n,)
    raw: dict[str, np.ndarray]  # detector -> raw score (n,)
    threshold: float
    segments: list[Segment] = field(default_factory=list)
    rounds: int = 0
    # Collective alerts raised while this batch moved the clock (keys that went silent).
    collective: list[KeyAlert] = field(default_factory=list)
    # detector -> natural log of the tail probability (n,), not floored; left out: the log of
    # ``probability`` (a result built without the calibrators' logs).
    log_probability: dict[str, np.ndarray] = field(default_factory=dict)
    # Keys forgotten after this batch to keep the state within ``max_state_bytes``.
    forgotten_keys: int = 0
    # Level shifts declared in this batch, in order (scoring/level_shift.py).
    level_shifts: list[LevelShift] = field(default_factory=list)
    # Detectors whose evidence multiplies the others' where they fire (fusion.py).
    independent: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.log_probability:
            with np.errstate(divide="ignore"):
                self.log_probability = {name: np.log(p) for name, p in self.probability.items()}

    @property
    def n(self) -> int:
        return len(self.fused)

    @cached_property
    def surprise(self) -> np.ndarray:
        """float64 (n,), 0 or more: ``-log10`` of the fused tail probability, not floored
        (scoring/fusion.py); ordered like ``fused``, and still apart where ``fused`` saturates."""
        return fusion.fuse_surprise(self.log_probability, self.independent, self.threshold)

    @cached_property
    def detector_surprise(self) -> dict[str, np.ndarray]:
        """detector -> its own adjusted surprise ``-log10(min(1, k * p_d))`` (n,); ``surprise``
        is the largest of them."""
        k = len(self.log_probability)
        return {name: fusion.surprise(lp, k) for name, lp in self.log_probability.items()}

    def fired(self) -> dict[str, np.ndarray]:
        """For each detector, the events it fired on (scoring/fusion.py)."""
        return fusion.fired(self.probability, self.threshold)

    def detector_scores(self, i: int) -> dict[str, float]:
        """Each detector's calibrated score (1 - tail probability) for event ``i``."""
        return {name: float(1.0 - p[i]) for name, p in self.probability.items()}


class ScoringPipeline:
    """Detectors + calibrators + fusion. Owns their state; not thread-safe."""

    def __init__(
        self,
        detectors: list[Detector],
        calibrators: dict[str, ScoreCalibrator],
        threshold: float,
        max_rounds: int = 8,
        collective: list[CollectiveDetector] | None = None,
        feedback: Any = None,
        event_time: EventTimeGuard | None = None,
        level_shifts: LevelShiftTracker | None = None,
    ) -> None:
        if not detectors:
            raise ValueError("at least one detector must be enabled")
        self.detectors = detectors
        self.calibrators = calibrators
        self.threshold = threshold
        # Detectors whose evidence multiplies the others' where they fire (fusion.py).
        self.independent = frozenset(d.name for d in detectors if d.independent_evidence)
        self.max_rounds = max_rounds
        # Timers over per-key rates (detectors/silence.py): they learn every event and raise
        # alerts about keys, not events.
        self.collective = list(collective or [])
        # Analysts' false-positive rules for this pipeline's keys (alerting/feedback.py): not
        # used for scoring, only kept here so they travel in the same state snapshot.
        self.feedback = feedback
        # The partition's event time guard and watermark (events/event_time.py): applied by
        # scoring/batch.py before decoding finishes; kept here so the watermark travels in the
        # same state snapshot and survives a restart.
        self.event_time = event_time if event_time is not None else EventTimeGuard()
        # Lasting changes of a key's level (scoring/level_shift.py): declared at the event that
        # completes the run, where the batch is cut so the rest sees the re-learned key.
        self.level_shifts = level_shifts
        # Bytes the per-key state may hold (None: no bound). After each batch, the parts over
        # it forget their least recently seen keys down to 90 % of it, in proportion to their
        # size, so a flood of new keys costs a bounded amount of memory (the daemon sets it
        # from state.max_bytes, shared by the partitions it owns).
        self.max_state_bytes: int | None = None

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self.detectors]

    def process(self, batch: FeatureBatch) -> BatchResult:
        """Score, decide and learn one batch (see the module docstring)."""
        if batch.n == 0:  # e.g. every record of a consumed batch was dead-lettered
            return self._empty(0)
        parts: list[BatchResult] = []
        start = 0
        while start < batch.n:
            part = self._process_settled_prefix(batch.slice(start, batch.n), start)
            parts.append(part)
            start += part.n
        result = _concat(parts, self.threshold)
        for timer in self.collective:
            result.collective.extend(timer.process(batch))
        result.forgotten_keys = self.shrink_to(self.max_state_bytes)
        return result

    # -- keyed state (detectors/base.py KeyedState) ------------------------------------------

    def _keyed_parts(self) -> dict[str, KeyedState]:
        return {f"detector:{d.name}": d for d in self.detectors} | {f"timer:{t.name}": t for t in self.collective}

    def state_bytes(self) -> int:
        """Estimated bytes of the per-key state of every part."""
        return sum(part.state_bytes() for part in self._keyed_parts().values())

    def shrink_to(self, max_bytes: int | None) -> int:
        """Over ``max_bytes``, the keyed parts forget keys to come down to 90 % of it (the
        margin spares a scan after every batch), each in proportion to its size; keys forgotten."""
        total = self.state_bytes()
        if max_bytes is None or total <= max_bytes:
            return 0
        excess = total - 0.9 * max_bytes
        return sum(part.shrink(int(excess * part.state_bytes() / total)) for part in self._keyed_parts().values())

    def changelog_state(self, changed_only: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """What a checkpoint writes: ``state_dict`` without the keyed parts' shards, and those
        shards by part (all, or only those changed since the last call when ``changed_only``).
        ``load_state_dict(base, shards)`` reads them back."""
        base = self.state_dict(sharded=True)
        shards = {name: found for name, part in self._keyed_parts().items() if (found := part.state_shards(changed_only))}
        return base, shards

    def _process_settled_prefix(self, batch: FeatureBatch, offset: int) -> BatchResult:
        # Events of keys adapting to a level shift: the population models may not flag them alone.
        adapting = self.level_shifts.adaptation(batch) if self.level_shifts is not None else Adaptation()
        # Nor do they enter the calibrators' reference windows: while a key's baseline moves to
        # its new level, its scores run high (a new store at 30x, a tenth of the stream, fattened
        # the z-score's fitted tail: a 12-sd quantity burst elsewhere fell from 1e-12 to 5e-5).
        transitional = adapting.events(batch.n)
        # learn: what the detectors learn (not flagged, not rejected as a gross outlier);
        # calibrate: what enters the calibrators' reference windows (not flagged, not adapting).
        learn = np.ones(batch.n, dtype=bool)
        calibrate = ~transitional
        # Exact steps by detector, with the learn mask they were scored with: a round whose mask
        # a detector already scored (only the calibrate mask changed, or a guess is confirmed)
        # reuses the step instead of scoring the batch again.
        exact: dict[str, tuple[np.ndarray, Step]] = {}
        # Round 1 may use a detector's cheap guess (Detector.guess); a guess only proposes the
        # masks, it is never committed: a batch settles only on a round where every score is exact.
        guessing = self.max_rounds >= 2
        changed = 0
        for rounds in range(1, self.max_rounds + 1):
            steps, probs, logs, cal_states, all_exact = self._score(batch, learn, calibrate, exact, guessing, adapting)
            guessing = False
            fused, flagged = self._decide(probs, adapting)
            new_learn = ~flagged & ~_rejected(steps, batch.n)
            new_calibrate = ~flagged & ~transitional
            if np.array_equal(new_learn, learn) and np.array_equal(new_calibrate, calibrate):
                if all_exact:
                    return self._commit_until_shift(batch, offset, learn, calibrate, adapting, (steps, probs, logs, cal_states), fused, flagged, rounds)
                continue  # confirm the guessed detectors with exact scores for the same masks
            if all_exact:
                changed = int(np.flatnonzero((new_learn != learn) | (new_calibrate != calibrate))[0])
            learn, calibrate = new_learn, new_calibrate
        # Not settled: events before the first change of the last (exact) round are final.
        # Redo them alone and commit.
        prefix = max(changed, 1)
        sub = batch.slice(0, prefix)
        sub_adapting = adapting.head(prefix)
        scored = self._score(sub, learn[:prefix], calibrate[:prefix], {}, False, sub_adapting)[:4]
        fused, flagged = self._decide(scored[1], sub_adapting)
        return self._commit_until_shift(sub, offset, learn[:prefix], calibrate[:prefix], sub_adapting, scored, fused, flagged, self.max_rounds + 1)

    def _commit_until_shift(self, batch, offset, learn, calibrate, adapting, scored, fused, flagged, rounds) -> BatchResult:
        """Commit a settled segment, or only its events up to the first that declares a level
        shift (scored again alone: the same scores, by the sequential semantics), then apply the
        shift so the events after it see the re-learned key."""
        tracker = self.level_shifts
        steps, probs, logs, cal_states = scored
        relearner = next((d for d in self.detectors if tracker is not None and d.name == tracker.detector), None)
        if tracker is None or relearner is None:
            return self._commit(batch, offset, steps, probs, logs, cal_states, fused, flagged, rounds)
        details = steps[relearner.name].details
        scan = tracker.scan(batch, details["z"], details["mean"], details["warm"])
        if scan.declared is None:
            tracker.adopt(scan, batch)
            return self._commit(batch, offset, steps, probs, logs, cal_states, fused, flagged, rounds)
        # The segment ends before the declaring event: once the key has re-learnt, that event is
        # scored against the new level (the next segment starts with it), so a change costs the
        # run's other events only. ``scan`` walked the events before it for the same reason.
        whole, end = batch, scan.declared
        if end < batch.n:
            batch = batch.slice(0, end)
            learn, calibrate = learn[:end], calibrate[:end]
            adapting = adapting.head(end)
            if end:
                steps, probs, logs, cal_states, _ = self._score(batch, learn, calibrate, {}, False, adapting)
                fused, flagged = self._decide(probs, adapting)
        result = self._commit(batch, offset, steps, probs, logs, cal_states, fused, flagged, rounds) if end else self._empty(rounds)
        tracker.adopt(scan, batch)
        assert scan.run is not None and scan.where is not None
        # The declaring key, then the keys whose runs were pooled with its own (LevelShiftTracker).
        at = float(whole.event_time[scan.declared])
        for which in [(scan.where, scan.run), *scan.also]:
            (ks, key, feature), run = which
            mean, var = tracker.run_statistics(run)
            declared = np.array([f == feature for f in tracker.key_sets[ks]])
            relearned = relearner.relearn(ks, key, mean, var, at, moved=declared)
            if relearned is not None:
                old, new, undo = relearned
                with np.errstate(invalid="ignore"):
                    moved = tuple(f for f, was, now in zip(tracker.key_sets[ks], old, new, strict=True) if was != now or f == feature)
                result.level_shifts.append(tracker.declared(scan, whole, new, undo, which=which, moved=moved))
        return result

    def _empty(self, rounds: int) -> BatchResult:
        """The result of a segment of no events (a level shift declared at its first event)."""
        empty = np.zeros(0)
        names = self.detector_names
        nothing = dict.fromkeys(names, empty)
        return BatchResult(empty, np.zeros(0, dtype=bool), nothing, nothing, self.threshold, rounds=rounds, independent=self.independent)

    def _score(
        self,
        batch: FeatureBatch,
        learn: np.ndarray,
        calibrate: np.ndarray,
        exact: dict[str, tuple[np.ndarray, Step]],
        guessing: bool,
        adapting: Adaptation | None = None,
    ) -> tuple[dict[str, Step], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any], bool]:
        steps: dict[str, Step] = {}
        probs: dict[str, np.ndarray] = {}
        logs: dict[str, np.ndarray] = {}  # natural log of each tail probability, not floored
        cal_states: dict[str, Any] = {}
        all_exact = True
        for detector in self.detectors:
            name = detector.name
            known = exact.get(name)
            # ``Detector.guess``: cheap approximate scores (or None), used only to propose the
            # first round's masks.
            guess = detector.guess(batch, learn) if guessing and known is None else None
            if guess is not None:
                step = Step(scores=guess)
                all_exact = False
            elif known is not None and np.array_equal(known[0], learn):
                step = known[1]
            else:
                step = detector.score_adapting(batch, learn, adapting.moved) if adapting is not None and adapting.moved else detector.score(batch, learn)
                exact[name] = (learn, step)
            if adapting and guess is None:
                # Events of keys adapting to a level shift: not judged by the other key sets'
                # baselines of the features the shift moved.
                focused = detector.focus(step, adapting.moved, adapting.shifted)
                if focused is not None:
                    step = focused
            steps[name] = step
            probs[name], logs[name], cal_states[name] = self.calibrators[name].transform_with_log(step.scores, calibrate)
        return steps, probs, logs, cal_states, all_exact

    def _decide(self, probs: dict[str, np.ndarray], adapting: Adaptation | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fused score and flags (scoring/fusion.py). An ``adapting`` event (its key adapts to
        a level shift) is flagged only if a detector with a per-key view fires on it, so the
        population models learn the key's new kind of event instead of flagging it for ever."""
        fused = fusion.fuse(probs, self.independent, self.threshold)
        flagged = fused > self.threshold
        if adapting:
            mine = adapting.events(len(fused))
            fired = fusion.fired(probs, self.threshold)
            keyed = np.zeros(len(fused), dtype=bool)
            for detector in self.detectors:
                if not detector.population:
                    keyed |= fired[detector.name]
            flagged &= ~mine | keyed
        return fused, flagged

    def _commit(self, batch, offset, steps, probs, logs, cal_states, fused, flagged, rounds) -> BatchResult:
        for detector in self.detectors:
            detector.commit(steps[detector.name])
            self.calibrators[detector.name].commit(cal_states[detector.name])
        return BatchResult(
            fused=fused,
            is_anomaly=flagged,
            probability=probs,
            raw={name: step.scores for name, step in steps.items()},
            threshold=self.threshold,
            segments=[Segment(offset, batch, steps)],
            rounds=rounds,
            log_probability=logs,
            independent=self.independent,
        )

    def level_shift_feedback(self, shift_id: str, label: str) -> str:
        """An analyst's verdict on a level shift this pipeline declared (``LevelShiftTracker.feedback``):
        a rejection puts the key's old baseline back. The outcome, as for FeedbackMemory.apply."""
        if self.level_shifts is None:
            return "unknown_event"
        outcome, restore = self.level_shifts.feedback(shift_id, label)
        if restore is not None:
            for detector in self.detectors:
                if detector.name == self.level_shifts.detector:
                    detector.restore_rows(*restore)
        return outcome

    # -- explanations ----------------------------------------------------------------------

    def explain(self, result: BatchResult, i: int) -> tuple[dict[str, Any], list[str]]:
        """Per-detector details and human-readable reasons for event ``i`` of the batch."""
        return self.explain_many(result, [i])[0]

    def explain_many(self, result: BatchResult, indices: list[int]) -> list[tuple[dict[str, Any], list[str]]]:
        """``explain`` for several events; each detector explains a segment's events together."""
        starts = [s.start for s in result.segments]
        by_segment: dict[int, list[int]] = {}
        for k, i in enumerate(indices):
            by_segment.setdefault(bisect.bisect_right(starts, i) - 1, []).append(k)
        out: list[tuple[dict[str, Any], list[str]]] = [({}, []) for _ in indices]
        k_detectors = len(self.detectors)
        for s, ks in by_segment.items():
            segment = result.segments[s]
            rows = [indices[k] - segment.start for k in ks]
            explained = {d.name: d.explain_many(segment.batch, segment.steps[d.name], rows) for d in self.detectors}
            for r, k in enumerate(ks):
                i = indices[k]
                details, reasons = out[k]
                for detector in self.detectors:
                    name = detector.name
                    p = float(result.probability[name][i])
                    explanation = explained[name][r]
                    fired = bool(fusion.adjusted_score(p, k_detectors) > self.threshold)
                    details[name] = {
                        "score": 1.0 - p,
                        "raw": float(result.raw[name][i]),
                        "tail_probability": p,
                        "surprise": float(result.detector_surprise[name][i]),
                        "fired": fired,
                        **explanation.details,
                    }
                    if fired:
                        reasons.extend(explanation.reasons or [f"{name} score {1.0 - p:.4f} (tail probability {p:.2e})"])
        return out

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, sharded: bool = False) -> dict[str, Any]:
        """Every part's state; ``sharded``: the keyed parts' base states only (see
        ``changelog_state``)."""
        return {
            "version": 1,
            "detectors": {d.name: d.base_state_dict() if sharded else d.state_dict() for d in self.detectors},
            "calibrators": {name: c.state_dict() for name, c in self.calibrators.items()},
            "collective": {t.name: t.base_state_dict() if sharded else t.state_dict() for t in self.collective},
            "feedback": self.feedback.state_dict() if self.feedback is not None else None,
            "event_time": self.event_time.state_dict(),
            "level_shifts": self.level_shifts.state_dict() if self.level_shifts is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], shards: dict[str, dict[str, Any]] | None = None) -> list[PartFailure]:
        """Restore each part (detector, calibrator, timer, feedback) on its own; a part that does
        not load (damaged, or no longer fitting the configuration) stays fresh and is returned,
        while the others keep their state. A detector that stays fresh takes its calibrator with
        it: the calibrator learned the scores of the model that was dropped. A part the snapshot
        does not have (a detector enabled since) starts fresh without a failure.

        ``shards``: a ``changelog_state`` was saved, ``state`` is its base and these are the
        keyed parts' shards (by part name, ``detector:zscore``): each keyed part is merged from
        the two; one whose shards are missing stays fresh (reason ``incomplete``).

        ``StateError`` if the snapshot as a whole is not a pipeline state of this version.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise StateError(f"pipeline state version {version!r}, this version reads 1")
        failures: list[PartFailure] = []
        detectors, calibrators = _section(state, "detectors"), _section(state, "calibrators")
        timers, reset = _section(state, "collective"), set()
        for i, detector in enumerate(self.detectors):
            name = detector.name
            if name in detectors:
                loaded = _load_part(f"detector:{name}", detector, detectors[name], failures, shards)
                if loaded is None:
                    reset.add(name)
                else:
                    self.detectors[i] = loaded
        for name, calibrator in self.calibrators.items():
            if name in reset:
                continue  # fresh, like its detector
            if name in calibrators:
                loaded = _load_part(f"calibrator:{name}", calibrator, calibrators[name], failures)
                if loaded is not None:
                    self.calibrators[name] = loaded
        for i, timer in enumerate(self.collective):
            if timer.name in timers:
                loaded = _load_part(f"timer:{timer.name}", timer, timers[timer.name], failures, shards)
                if loaded is not None:
                    self.collective[i] = loaded
        if self.feedback is not None and state.get("feedback"):
            loaded = _load_part("feedback", self.feedback, state["feedback"], failures)
            if loaded is not None:
                self.feedback = loaded
        if self.level_shifts is not None and state.get("level_shifts"):  # absent: none tracked yet
            loaded = _load_part("level_shifts", self.level_shifts, state["level_shifts"], failures)
            if loaded is not None:
                self.level_shifts = loaded
        if "event_time" in state:  # absent from snapshots older than the guard: no watermark yet
            loaded = _load_part("event_time", self.event_time, state["event_time"], failures)
            if loaded is not None:
                self.event_time = loaded
        return failures


def _section(state: dict[str, Any], key: str) -> dict[str, Any]:
    """One section of a pipeline state (parts by name); a damaged section has no parts."""
    section = state.get(key)
    return section if isinstance(section, dict) else {}


def _load_part(part: str, owner: Any, state: Any, failures: list[PartFailure], shards: dict[str, dict[str, Any]] | None = None) -> Any:
    """A copy of ``owner`` with ``state`` loaded (merged with its ``shards`` first, when the
    state was saved sharded), or None (and a failure) if it does not load. Loaded into a copy,
    so a part that fails half-way leaves nothing half-restored."""
    candidate = copy.deepcopy(owner)
    try:
        if not isinstance(state, dict):
            raise StateError(f"holds a {type(state).__name__}, not a dict", reason="corrupt")
        if shards is not None:
            state = candidate.merge_shards(state, shards.get(part, {}))
        candidate.load_state_dict(state)
    except StateError as exc:
        failures.append(PartFailure(part, exc.reason, str(exc)))
        return None
    except Exception as exc:  # any error restoring one part only resets that part
        failures.append(PartFailure(part, "incompatible", f"{type(exc).__name__}: {exc}"))
        return None
    return candidate


def _rejected(steps: dict[str, Step], n: int) -> np.ndarray:
    """Events some detector wants kept out of every model (gross outliers, even unflagged)."""
    rejected = np.zeros(n, dtype=bool)
    for step in steps.values():
        if step.reject is not None:
            rejected |= step.reject
    return rejected


def _concat(parts: list[BatchResult], threshold: float) -> BatchResult:
    if len(parts) == 1:
        return parts[0]
    names = list(parts[0].probability)
    return BatchResult(
        fused=np.concatenate([p.fused for p in parts]),
        is_anomaly=np.concatenate([p.is_anomaly for p in parts]),
        probability={n: np.concatenate([p.probability[n] for p in parts]) for n in names},
        raw={n: np.concatenate([p.raw[n] for p in parts]) for n in names},
        threshold=threshold,
        segments=[s for p in parts for s in p.segments],
        rounds=max(p.rounds for p in parts),
        log_probability={n: np.concatenate([p.log_probability[n] for p in parts]) for n in names},
        level_shifts=[shift for p in parts for shift in p.level_shifts],
        independent=parts[0].independent,
    )
