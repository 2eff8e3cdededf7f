"""The detector contract: one small protocol every detector follows.

Direction: a raw score is a float, **higher = more anomalous**. Raw scores of different
detectors are not comparable; the calibrators in ``scoring/`` turn them into tail
probabilities.

Sequential semantics, computed on a whole batch:

* ``score(batch, learn)`` scores every event of the batch **in order**, as if the events were
  given one by one: event ``i`` sees the committed state plus the events ``j < i`` of the same
  batch for which ``learn[j]`` is true. It does not change the detector: it returns the scores
  and a ``Step`` that holds the state the detector would have after learning the batch.
* ``commit(step)`` makes that state current.

The pipeline decides ``learn`` (events it did not flag); because event ``i``'s flag only depends
on events before it, the pipeline finds the sequential answer with a short fixed-point loop
over ``score`` (see ``scoring/pipeline.py``). A conformance test checks for every detector that
scoring a batch equals scoring its events one at a time.

``state_dict()``/``load_state_dict()`` carry a ``version`` so snapshots can be checked on restore.

Collective detectors (alerts about keys, not events: a store that stops) follow the smaller
``CollectiveDetector`` contract at the end of this module.

Optional hooks have a default here, so callers use them on any detector without asking
whether it has them: ``guess`` (a cheap first-round proposal for the pipeline), what the
daemon exports as metrics (``n_keys``/``learning_keys`` per key set, ``device``,
``last_train_loss``/``train_steps_total``), and the keyed-state hooks of ``KeyedState`` (state
bounded in bytes, checkpoints that write only the shards of keys that changed). A detector
overrides the ones it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream_detector.features import FeatureBatch


@dataclass
class Step:
    """What ``score`` returns: scores for the batch plus the state after learning it."""

    scores: np.ndarray  # float64 (n,), higher = more anomalous
    # Per-event arrays a detector wants to explain its scores with (aligned with the batch).
    details: dict[str, np.ndarray] = field(default_factory=dict)
    # Detector-private: the state after learning the batch, applied by ``commit``.
    next_state: Any = None
    # Optional bool (n,): events no model should learn from, whether flagged or not (gross
    # outliers). Must depend only on the events before each one, like the scores.
    reject: np.ndarray | None = None


@dataclass(frozen=True)
class Explanation:
    """Why one event scored the way it did, for the anomaly record."""

    details: dict[str, Any]
    reasons: list[str]


class KeyedState:
    """Hooks of a part whose state grows with its keys (per-key statistics, per-store timers).

    Bounded in bytes: ``state_bytes`` estimates what its keys hold in memory and ``shrink``
    forgets keys, the least valuable first, to free a number of bytes (the pipeline shares
    ``state.max_bytes`` between its parts). Written as it changes: ``state_shards`` hands the
    changelog the shards of keys changed since the last checkpoint (``state/shards.py``),
    ``base_state_dict`` is ``state_dict`` without them, and ``merge_shards`` puts the two back
    together into what ``load_state_dict`` reads. The defaults: no keys, one unsharded state.
    """

    def state_bytes(self) -> int:
        """Estimated bytes of the per-key state (0 when there is none)."""
        return 0

    def shrink(self, free_bytes: int) -> int:
        """Forget keys, the least valuable first, to free about ``free_bytes`` of
        ``state_bytes()`` (allocated rows are kept for the next keys); the number forgotten."""
        return 0

    def state_shards(self, changed_only: bool) -> dict[str, Any]:
        """Shards by name (all of them, or those changed since the last call when
        ``changed_only``): each is written as its own changelog record."""
        return {}

    def base_state_dict(self) -> dict[str, Any]:
        """``state_dict`` without what ``state_shards`` holds."""
        return self.state_dict()

    def merge_shards(self, base: dict[str, Any], shards: dict[str, Any]) -> dict[str, Any]:
        """The ``state_dict`` made of a ``base_state_dict`` and every shard it names;
        ``StateError`` when a shard is missing or malformed."""
        return base

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class Detector(KeyedState, ABC):
    """Base class for detectors. Subclasses keep hyperparameters as same-named attributes."""

    name: str = "detector"
    state_version: int = 1
    # True when raw scores are already 1 - tail probability (no calibration needed).
    outputs_probability: bool = False
    # Where the detector computes (a torch device name), for the metrics; None for numpy on the CPU.
    device: str | None = None
    # False when ``state_dict`` leaves the learned state out (a River model without a signing key).
    saves_state: bool = True
    # True when an event is scored against every key's events (no per-key baseline): after a
    # level shift such a detector may not flag the shifted key alone (scoring/level_shift.py).
    population: bool = False
    # True when, among normal events, the detector's tail probability does not depend on the
    # event's values (an exact duplicate: any sale is as likely to be re-sent): where it fires,
    # its evidence multiplies the other detectors' instead of competing with it (fusion.py).
    independent_evidence: bool = False

    @abstractmethod
    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        """Score ``batch`` in order without changing the detector (see module docstring)."""

    def score_adapting(self, batch: FeatureBatch, learn: np.ndarray, adapting: dict[tuple[str, str], np.ndarray]) -> Step:
        """``score``, where ``adapting`` ((key set, feature) -> bool (n,), ``Adaptation.moved``)
        marks the events whose key in that key set adapts to a level shift of that feature: a
        detector with per-key baselines lets those keys learn the feature from their every event,
        flagged or not, so a new level's spread is learned too, not only the part of it that goes
        unflagged. Default: ``score``."""
        return self.score(batch, learn)

    @abstractmethod
    def commit(self, step: Step) -> None:
        """Adopt the state of a ``Step`` returned by ``score`` on the last batch."""

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        """Details and human-readable reasons for event ``i`` of ``batch``."""
        return Explanation(details={}, reasons=[])

    def explain_many(self, batch: FeatureBatch, step: Step, indices: Sequence[int]) -> list[Explanation]:
        """``explain`` for several events of one batch; a detector may share work between them."""
        return [self.explain(batch, step, i) for i in indices]

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the learned state, including ``version``, in plain data only (dicts,
        lists, tuples, str, int, float, bool, None, bytes, numeric numpy arrays): what
        ``state/codec.py`` stores. Never objects, never tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot made by ``state_dict``; raise ``StateError`` if incompatible."""

    # -- optional hooks (defaults: the detector has nothing to say) ---------------------------

    def guess(self, batch: FeatureBatch, learn: np.ndarray) -> np.ndarray | None:
        """Cheap approximate scores the pipeline may use to propose its first round's masks
        (never committed: ``score`` confirms them); None when there is no cheaper way."""
        return None

    def n_keys(self) -> dict[str, int]:
        """Keys with per-key state, per key set; empty for a detector without per-key state."""
        return {}

    def learning_keys(self) -> dict[str, int]:
        """Keys per key set still warming up (scored by a global baseline meanwhile)."""
        return {}

    def relearn(
        self, key_set: str, key: str, mean: np.ndarray, var: np.ndarray, event_time: float, moved: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, Any] | None:
        """Move ``key``'s baseline in ``key_set`` to a new level (the mean and variance of a run
        of its values, over the key set's features): (old means, new means, what
        ``restore_rows`` needs to undo it). ``moved``: features known to have moved (the
        declared one), moved however small the change. None: the detector has no per-key
        baseline."""
        return None

    def focus(self, step: Step, moved: dict[tuple[str, str], np.ndarray], shifted: dict[tuple[str, str], np.ndarray] | None = None) -> Step | None:
        """``step`` with the events of keys adapting to a level shift judged without the
        baselines that shift moved, its scores replaced (and whatever ``explain`` needs to name
        the views that counted): ``moved`` maps (key set, feature) to the events of that key
        set's keys adapting to a shift of that feature (LevelShiftTracker.adapting_masks), and
        another key set's view of that feature no longer counts for them (a store at 30x moves
        every product's quantities). ``shifted`` maps (key set, feature) to the change of level
        each event's key is expected to take (NaN: none; LevelShiftTracker.expected_shifts):
        that key set judges the event against its baseline moved by it. None: no such view."""
        return None

    def restore_rows(self, key_set: str, key: str, rows: Any) -> None:
        """Undo a ``relearn`` (an analyst rejected the level shift)."""

    @property
    def last_train_loss(self) -> float | None:
        """Loss of the last training step of a trained model; None for one that does not train."""
        return None

    @property
    def train_steps_total(self) -> int:
        """Optimiser steps taken so far by a trained model."""
        return 0

    def learn_one_batch(self, batch: FeatureBatch, learn: np.ndarray | None = None) -> np.ndarray:
        """Score then learn a batch; convenience for tests and simple callers."""
        if learn is None:
            learn = np.ones(batch.n, dtype=bool)
        step = self.score(batch, learn)
        self.commit(step)
        return step.scores


class KeyAlert(Protocol):
    """A collective alert: about a key at a moment of event time, not about an event."""

    @property
    def key(self) -> str: ...

    @property
    def event_time(self) -> float: ...

    def reason(self, key_set: str) -> str:
        """What happened, in words, for the record."""
        ...


class CollectiveDetector(KeyedState, ABC):
    """Base class for detectors of collective anomalies (e.g. detectors/silence.py: a store
    whose sales stop): no event carries them, so they raise alerts about the keys of
    ``key_set`` instead of scoring events. ``process`` learns every event of a batch in order
    (nothing is masked: a flagged sale still shows its store is alive) and returns the alerts
    that became due while the batch moved the clock. The pipeline calls it after the point
    detectors, on the whole batch. State as for ``Detector``: plain data with a ``version``."""

    name: str = "collective"
    state_version: int = 1
    key_set: str

    @abstractmethod
    def process(self, batch: FeatureBatch) -> Sequence[KeyAlert]:
        """Learn ``batch`` and return the alerts it made due, in event-time order."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the learned state, including ``version``, in plain data only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot made by ``state_dict``; raise ``StateError`` if incompatible."""
