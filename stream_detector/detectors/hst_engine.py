"""Half-Space Trees in numpy, score for score identical to ``river.anomaly.HalfSpaceTrees``.

River walks every tree in Python for every event (``score_one`` then ``learn_one``), which costs
tens of microseconds per event. This engine computes the same numbers for a whole batch.

Why a batch can be vectorised although the model learns as it goes:

* A tree's shape (split feature and threshold per node) never changes after construction, so the
  root-to-leaf path of an event does not depend on the learned state. Paths are computed for the
  whole batch in one descent, one numpy step per tree level.
* Scores only read ``r_mass``, the masses of the previous *complete* window, and ``r_mass``
  only changes when a window pivots (every ``window_size`` learned events). Between two pivots
  all scores read the same ``r_mass``: the batch is cut at the pivots, each segment is scored
  with one gather, and each segment's learned events are added to ``l_mass`` with one
  ``bincount`` over their path nodes.

Trees are built by River's own ``make_padded_tree`` with the same arguments, random generator
and call order as ``HalfSpaceTrees.learn_one``, so the same seed gives the same trees. They are
then flattened into heap layout: node ``k`` has children ``2k + 1`` (``value < threshold``) and
``2k + 2``; internal nodes are ``0 .. 2**height - 2``, leaves follow.

Missing values: River sends an event down the heavier child (by ``l_mass``) when a split
feature is absent from the dict. This engine has no such branch: the caller must impute
missing values before calling it (``HalfSpaceTreesDetector`` does). A NaN that slips through
behaves as in River when the key is present with a NaN value: ``NaN < t`` is false, so it goes
right.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river.tree.padded import PaddedBranch, make_padded_tree

from stream_detector.errors import StateError

STATE_VERSION = 1
PADDING = 0.15  # what river.anomaly.HalfSpaceTrees passes to make_padded_tree


@dataclass(frozen=True)
class HSTState:
    """The learned masses. Arrays are replaced, never written in place, so states can be shared."""

    l_mass: np.ndarray  # int64 (n_trees, n_nodes): current window's mass (being learned)
    r_mass: np.ndarray  # int64 (n_trees, n_nodes): last complete window's mass (scored against)
    counter: int  # learned events in the current window
    first_window: bool  # no window completed yet: River scores 0


@dataclass(frozen=True)
class Trees:
    """Flattened trees in heap layout; leaves carry feature 0 and threshold NaN (never read)."""

    feature: np.ndarray  # intp (n_trees, n_nodes): column of X each node splits on
    threshold: np.ndarray  # float64 (n_trees, n_nodes)


def _build_trees(
    feature_names: Sequence[str],
    n_trees: int,
    height: int,
    limits: Mapping[str, tuple[float, float]],
    seed: int | None,
) -> Trees:
    """Build the trees exactly as ``HalfSpaceTrees.learn_one`` does on its first event."""
    rng = random.Random(seed)
    all_limits: collections.defaultdict = collections.defaultdict(lambda: (0.0, 1.0))
    all_limits.update(limits)
    column = {name: j for j, name in enumerate(feature_names)}
    n_nodes = 2 ** (height + 1) - 1
    feature = np.zeros((n_trees, n_nodes), dtype=np.intp)
    threshold = np.full((n_trees, n_nodes), np.nan)
    for t in range(n_trees):
        root = make_padded_tree(
            limits={name: all_limits[name] for name in sorted(feature_names)},
            height=height,
            padding=PADDING,
            rng=rng,
            r_mass=0,
            l_mass=0,
        )
        _flatten(root, 0, column, feature[t], threshold[t])
    return Trees(feature=feature, threshold=threshold)


def _flatten(node: Any, k: int, column: dict[str, int], feature: np.ndarray, threshold: np.ndarray) -> None:
    """Write River's linked tree into heap-layout arrays (recursion depth = height)."""
    if not isinstance(node, PaddedBranch):
        return
    feature[k] = column[node.feature]
    threshold[k] = node.threshold
    _flatten(node.children[0], 2 * k + 1, column, feature, threshold)
    _flatten(node.children[1], 2 * k + 2, column, feature, threshold)


class HSTEngine:
    """Vectorised Half-Space Trees; see the module docstring.

    ``score_and_learn`` is pure and returns the state to ``commit``; scores are River's
    ``1 - mass / max_mass`` (higher = more anomalous, 0 during the first window).
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        n_trees: int = 10,
        height: int = 8,
        window_size: int = 250,
        limits: Mapping[str, tuple[float, float]] | None = None,
        seed: int | None = None,
    ) -> None:
        self.feature_names = tuple(feature_names)
        if not self.feature_names or len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature_names must be non-empty and unique: {self.feature_names}")
        if n_trees < 1 or height < 0 or window_size < 1:
            raise ValueError(
                f"need n_trees >= 1, height >= 0, window_size >= 1; "
                f"got {n_trees}, {height}, {window_size}"
            )
        self.n_trees = int(n_trees)
        self.height = int(height)
        self.window_size = int(window_size)
        self.limits = dict(limits or {})
        self.seed = seed
        self.n_nodes = 2 ** (self.height + 1) - 1
        self.trees = _build_trees(self.feature_names, self.n_trees, self.height, self.limits, seed)
        self._set_derived()
        self.state = self.initial_state()

    # -- derived constants -------------------------------------------------------------------

    def _set_derived(self) -> None:
        """Constants the hot path reuses; recomputed after a restore."""
        # Same float as River's `0.1 * self.window_size`; compared against integer masses.
        self.size_limit = 0.1 * self.window_size
        self.max_score = self.n_trees * self.window_size * (2 ** (self.height + 1) - 1)
        self._pow2 = (1 << np.arange(self.height + 1, dtype=np.int64))
        self._tree_offset = np.arange(self.n_trees, dtype=np.intp) * self.n_nodes
        self._child_shift = 2 - self._tree_offset
        self._feature_flat = self.trees.feature.ravel()
        self._threshold_flat = self.trees.threshold.ravel()

    def initial_state(self) -> HSTState:
        zeros = np.zeros((self.n_trees, self.n_nodes), dtype=np.int64)
        return HSTState(l_mass=zeros, r_mass=zeros, counter=0, first_window=True)

    # -- hot path ----------------------------------------------------------------------------

    def paths(self, X: np.ndarray) -> np.ndarray:
        """Flat node index (``tree * n_nodes + node``) visited per depth, event and tree.

        Returns intp (height + 1, n, n_trees): level-major, so each level is one contiguous
        block for the per-level steps here and in ``_mass_scores``.
        """
        n, d = X.shape
        values = np.ascontiguousarray(X).ravel()
        row_start = (np.arange(n, dtype=np.intp) * d)[:, None]
        out = np.empty((self.height + 1, n, self.n_trees), dtype=np.intp)
        out[0] = self._tree_offset
        for depth in range(self.height):
            node, child = out[depth], out[depth + 1]
            value = values.take(row_start + self._feature_flat.take(node))
            go_left = value < self._threshold_flat.take(node)  # River: left iff value < threshold
            # Heap child in flat indices: offset + 2 * (node - offset) + 2 - go_left.
            np.multiply(node, 2, out=child)
            child += self._child_shift
            child -= go_left
        return out

    def _mass_scores(self, paths: np.ndarray, r_mass_flat: np.ndarray) -> np.ndarray:
        """River's ``_walk_score`` summed over trees, for all events of one window segment.

        The walk adds ``r_mass * 2**depth`` per level and stops after a node whose
        ``r_mass < size_limit``; the leaf level is always added when reached. Integer sums are
        exact, so the result equals River's float accumulation bit for bit.
        """
        r = r_mass_flat.take(paths)  # (height + 1, m, n_trees)
        mass = r[0].sum(axis=1)
        if self.height:
            # reached[d - 1]: the walk got to depth d (every node above had enough mass).
            reached = r[:-1] >= self.size_limit
            for depth in range(1, self.height):
                np.logical_and(reached[depth - 1], reached[depth], out=reached[depth])
            mass += self._pow2[1:] @ np.multiply(r[1:], reached).sum(axis=2)
        return 1.0 - mass / self.max_score

    def _visits(self, leaves: np.ndarray) -> np.ndarray:
        """Flat ``l_mass`` increment for events ending in ``leaves`` (flat leaf indices).

        Learning adds 1 to every node on the path, so a node's increment is the number of
        events whose leaf lies below it: count the leaves once, then sum pairs of children up
        the heap, level by level (nodes of one level are contiguous, siblings adjacent).
        """
        counts = np.bincount(leaves.ravel(), minlength=self.n_trees * self.n_nodes)
        counts = counts.reshape(self.n_trees, self.n_nodes)
        for depth in range(self.height - 1, -1, -1):
            first, width = 2**depth - 1, 2**depth
            children = counts[:, first + width : first + 3 * width]
            counts[:, first : first + width] = children.reshape(self.n_trees, width, 2).sum(axis=2)
        return counts.ravel()

    def _learned_leaves(
        self, X: np.ndarray, X_learn: np.ndarray, score_paths: np.ndarray, learned_rows: np.ndarray
    ) -> np.ndarray:
        """Leaf per learned row and tree; descends again only for rows whose learned values
        differ from the scored ones (with a running scaler: only rows that moved a min/max)."""
        leaves = score_paths[-1].take(learned_rows, axis=0)
        if X_learn is not X:
            changed = np.flatnonzero((X_learn[learned_rows] != X[learned_rows]).any(axis=1))
            if changed.size:
                leaves[changed] = self.paths(X_learn[learned_rows[changed]])[-1]
        return leaves

    def score_and_learn(
        self,
        X: np.ndarray,
        learn: np.ndarray,
        X_learn: np.ndarray | None = None,
    ) -> tuple[np.ndarray, HSTState]:
        """Score the rows of ``X`` in order and learn the rows flagged in ``learn``.

        Row ``i`` is scored against the committed state plus the learned rows ``j < i``, as
        River's ``score_one(x_i)`` followed (if ``learn[i]``) by ``learn_one(x_i)``. Rows not
        learned do not advance the window. ``X_learn`` (default ``X``) gives the values learned
        for each row when they differ from the scored ones (River's MinMaxScaler pipeline scales
        an event with its own value included before learning it). Does not change ``self``.
        """
        X = np.asarray(X, dtype=np.float64)
        learn = np.asarray(learn, dtype=bool)
        n = X.shape[0]
        if X.ndim != 2 or X.shape[1] != len(self.feature_names) or learn.shape != (n,):
            raise ValueError(
                f"X must be (n, {len(self.feature_names)}) and learn (n,); "
                f"got {X.shape} and {learn.shape}"
            )
        X_learn = X if X_learn is None else np.asarray(X_learn, dtype=np.float64)
        if X_learn.shape != X.shape:
            raise ValueError(f"X_learn must have the shape of X {X.shape}, got {X_learn.shape}")
        state = self.state
        scores = np.zeros(n)
        if n == 0:
            return scores, state

        W = self.window_size
        learned_rows = np.flatnonzero(learn)
        n_learned = learned_rows.size
        score_paths = self.paths(X)
        learned_leaves = self._learned_leaves(X, X_learn, score_paths, learned_rows)

        # Window (counted from the current one) each row is scored in, and segment bounds.
        learned_before = np.cumsum(learn) - learn
        window_of_row = (state.counter + learned_before) // W
        n_windows = (state.counter + n_learned) // W + 1
        row_bounds = np.searchsorted(window_of_row, np.arange(n_windows + 1))

        l_mass = state.l_mass.ravel()
        r_mass = state.r_mass.ravel()
        first_window = state.first_window
        for w in range(n_windows):
            lo, hi = row_bounds[w], row_bounds[w + 1]
            if hi > lo and not first_window:
                scores[lo:hi] = self._mass_scores(score_paths[:, lo:hi], r_mass)
            # Learned rows of window w: ranks [w*W - counter, (w+1)*W - counter) among learned.
            a = max(0, w * W - state.counter)
            b = min(n_learned, (w + 1) * W - state.counter)
            if b > a:
                l_mass = l_mass + self._visits(learned_leaves[a:b])
            if w < n_windows - 1:  # window w completed inside this batch: pivot
                r_mass = l_mass
                l_mass = np.zeros_like(l_mass)
                first_window = False

        shape = (self.n_trees, self.n_nodes)
        next_state = HSTState(
            l_mass=l_mass.reshape(shape),
            r_mass=r_mass.reshape(shape),
            counter=int((state.counter + n_learned) % W),
            first_window=first_window,
        )
        return scores, next_state

    def in_first_window(self, learn: np.ndarray) -> np.ndarray:
        """Which rows ``score_and_learn(X, learn)`` would score 0 because no window completed yet."""
        learn = np.asarray(learn, dtype=bool)
        if not self.state.first_window:
            return np.zeros(learn.shape, dtype=bool)
        learned_before = np.cumsum(learn) - learn
        return self.state.counter + learned_before < self.window_size

    def commit(self, state: HSTState) -> None:
        """Adopt the state returned by ``score_and_learn`` on the last batch."""
        self.state = state

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trees, masses and counters as numpy arrays and plain values (no seed needed)."""
        return {
            "version": STATE_VERSION,
            "feature_names": list(self.feature_names),
            "n_trees": self.n_trees,
            "height": self.height,
            "window_size": self.window_size,
            "limits": dict(self.limits),
            "seed": self.seed,
            "feature": self.trees.feature.copy(),
            "threshold": self.trees.threshold.copy(),
            "l_mass": self.state.l_mass.copy(),
            "r_mass": self.state.r_mass.copy(),
            "counter": self.state.counter,
            "first_window": self.state.first_window,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HSTEngine:
        """A new engine from a snapshot, without rebuilding trees from a seed."""
        engine = cls.__new__(cls)
        engine.load_state_dict(state)
        return engine

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` snapshot, trees included; ``StateError`` if it does not fit."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise StateError(f"HST engine state version {version!r} != {STATE_VERSION}")
        try:
            feature_names = tuple(state["feature_names"])
            n_trees, height, window_size = (
                int(state["n_trees"]), int(state["height"]), int(state["window_size"])
            )
            n_nodes = 2 ** (height + 1) - 1
            shape = (n_trees, n_nodes)
            feature = np.asarray(state["feature"], dtype=np.intp)
            threshold = np.asarray(state["threshold"], dtype=np.float64)
            l_mass = np.asarray(state["l_mass"], dtype=np.int64)
            r_mass = np.asarray(state["r_mass"], dtype=np.int64)
            counter = int(state["counter"])
            first_window = bool(state["first_window"])
            limits = dict(state.get("limits") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"HST engine state is malformed: {exc!r}") from exc
        if any(a.shape != shape for a in (feature, threshold, l_mass, r_mass)):
            raise StateError(f"HST engine arrays do not have shape {shape}")
        if feature.size and (feature.min() < 0 or feature.max() >= len(feature_names)):
            raise StateError("HST engine state has split features out of range")
        if not 0 <= counter < window_size:
            raise StateError(f"HST engine counter {counter} outside [0, {window_size})")
        self.feature_names = feature_names
        self.n_trees, self.height, self.window_size = n_trees, height, window_size
        self.limits = limits
        self.seed = state.get("seed")
        self.n_nodes = n_nodes
        self.trees = Trees(feature=feature.copy(), threshold=threshold.copy())
        self._set_derived()
        self.state = HSTState(
            l_mass=l_mass.copy(), r_mass=r_mass.copy(), counter=counter, first_window=first_window
        )
