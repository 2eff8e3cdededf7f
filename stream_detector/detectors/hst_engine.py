"""Half-Space Trees, score for score identical to ``river.anomaly.HalfSpaceTrees``.

River walks every tree in Python for every event (``score_one`` then ``learn_one``), which costs
around 100-300 microseconds per event with 10-25 trees. This engine computes the same numbers for
a whole batch (``bench/bench_hst.py`` measures both):

* A tree's shape (split feature and threshold per node) never changes after construction, so
  the leaf an event reaches does not depend on the learned state. Leaves are found for the
  whole batch in one descent, one numpy step per tree level.
* The walk of a tree always follows the path to that leaf, and learning adds 1 along the same
  path, so scoring and learning need only the leaves: a compiled loop (``hst_kernel``) then
  goes through the events in order, exactly as River does, window pivots included.

Trees are built as River's ``make_padded_tree`` builds them, with the same arguments, random
generator and call order as ``HalfSpaceTrees.learn_one``, so the same seed gives the same trees
(the tests compare with River). They are written straight into heap layout (importing
``river.tree`` would pull in scipy, over a second of startup): node ``k`` has children ``2k + 1`` (``value < threshold``) and
``2k + 2``; the nodes of depth ``d`` are ``2**d - 1 .. 2**(d + 1) - 2``, the leaves come last.
During the descent an event's position at depth ``d`` is ``tree * 2**d + j`` (``j``: rank of
the node within its level), whose children are ``2 * position`` and ``2 * position + 1``.

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

from stream_detector.detectors import hst_kernel
from stream_detector.errors import StateError

# 1: every node of ``feature``, ``threshold``, ``l_mass`` and ``r_mass`` (int64); still read.
# 2: split nodes only for ``feature`` and ``threshold`` (leaves never split), leaves only for
#    the masses (a parent is the sum of its children), each in the smallest integer type that
#    holds it: about a fifth of the bytes (1.6 MB -> 0.33 MB at 25 trees of height 10).
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
PADDING = 0.15  # what river.anomaly.HalfSpaceTrees passes to make_padded_tree


@dataclass(frozen=True)
class HSTState:
    """The learned masses. Arrays are replaced, never written in place, so states can be shared."""

    # int64 (n_trees, n_leaves): the current window's leaf masses (being learned). Its inner
    # nodes are sums of leaves and only needed at the pivot: see ``l_mass``.
    l_leaves: np.ndarray
    r_mass: np.ndarray  # int64 (n_trees, n_nodes): last complete window's mass (scored against)
    counter: int  # learned events in the current window
    first_window: bool  # no window completed yet: River scores 0

    @property
    def l_mass(self) -> np.ndarray:
        """int64 (n_trees, n_nodes): the current window's mass at every node (River's ``l_mass``)."""
        height = self.l_leaves.shape[1].bit_length() - 1
        return hst_kernel.tree_from_leaves(self.l_leaves, height)


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
        limits_t = {name: all_limits[name] for name in sorted(feature_names)}
        _grow(limits_t, height, PADDING, rng, 0, column, feature[t], threshold[t])
    return Trees(feature=feature, threshold=threshold)


def _level(depth: int) -> slice:
    """Heap-layout columns of the nodes at ``depth``."""
    return slice(2**depth - 1, 2 ** (depth + 1) - 1)


def _check_masses(l_mass: np.ndarray, r_mass: np.ndarray, height: int, counter: int, window_total: int) -> None:
    """Raise ``StateError`` unless restored masses are ones learning can produce.

    Learning keeps every parent's mass equal to the sum of its children's (scoring relies on
    masses never growing down a path), the roots of ``l_mass`` count the events of the current
    window and those of ``r_mass`` a whole window (0 before the first one completed).
    """
    for name, mass, root in (("l_mass", l_mass, counter), ("r_mass", r_mass, window_total)):
        if (mass < 0).any() or (mass[:, 0] != root).any():
            raise StateError(f"HST engine {name} roots are not {root} or masses are negative")
        for depth in range(height):
            children = mass[:, _level(depth + 1)]
            if not np.array_equal(mass[:, _level(depth)], children[:, 0::2] + children[:, 1::2]):
                raise StateError(f"HST engine {name}: a parent is not the sum of its children")


def _full_arrays(state: dict[str, Any], n_trees: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every node's ``feature``, ``threshold``, ``l_mass`` and ``r_mass`` from a format-2 state
    (split nodes and leaf masses): leaves carry feature 0 and threshold NaN, inner masses are
    the sums of their leaves. ``ValueError`` when the stored shapes do not fit."""
    inner, leaves = 2**height - 1, 2**height
    parts = {name: np.asarray(state[name]) for name in ("feature", "threshold", "l_leaves", "r_leaves")}
    for name, width in (("feature", inner), ("threshold", inner), ("l_leaves", leaves), ("r_leaves", leaves)):
        if parts[name].shape != (n_trees, width):
            raise ValueError(f"{name} has shape {parts[name].shape}, expected {(n_trees, width)}")
    if any(parts[name].dtype.kind not in "iu" for name in ("feature", "l_leaves", "r_leaves")):
        raise ValueError("feature and masses must be integers")
    feature = np.zeros((n_trees, inner + leaves), dtype=np.intp)
    feature[:, :inner] = parts["feature"]
    threshold = np.full((n_trees, inner + leaves), np.nan)
    threshold[:, :inner] = parts["threshold"]
    l_mass, r_mass = (hst_kernel.tree_from_leaves(parts[name].astype(np.int64), height) for name in ("l_leaves", "r_leaves"))
    return feature, threshold, l_mass, r_mass


def _grow(
    limits: dict[str, tuple[float, float]],
    height: int,
    padding: float,
    rng: random.Random,
    k: int,
    column: dict[str, int],
    feature: np.ndarray,
    threshold: np.ndarray,
) -> None:
    """River's ``make_padded_tree`` (river/tree/padded.py), writing node ``k`` and its subtree
    into heap-layout arrays: the same ``rng`` calls in the same order (recursion depth = height)."""
    if height == 0:
        return
    # A feature, weighted by the width of its limits, then a padded split point.
    on = rng.choices(population=list(limits.keys()), weights=[limits[i][1] - limits[i][0] for i in limits])[0]
    a, b = limits[on]
    at = rng.uniform(a + padding * (b - a), b - padding * (b - a))
    feature[k] = column[on]
    threshold[k] = at
    tmp = limits[on]
    limits[on] = (tmp[0], at)
    _grow(limits, height - 1, padding, rng, 2 * k + 1, column, feature, threshold)
    limits[on] = tmp
    limits[on] = (at, tmp[1])
    _grow(limits, height - 1, padding, rng, 2 * k + 2, column, feature, threshold)
    limits[on] = tmp


class HSTEngine:
    """Batched Half-Space Trees; see the module docstring.

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
            raise ValueError(f"need n_trees >= 1, height >= 0, window_size >= 1; got {n_trees}, {height}, {window_size}")
        self.n_trees = int(n_trees)
        self.height = int(height)
        self.window_size = int(window_size)
        self.limits = dict(limits or {})
        self.seed = seed
        self.n_nodes = 2 ** (self.height + 1) - 1
        self.trees = _build_trees(self.feature_names, self.n_trees, self.height, self.limits, seed)
        self._set_derived()
        self.state = self.initial_state()
        hst_kernel.warm_up()

    # -- derived constants -------------------------------------------------------------------

    def _set_derived(self) -> None:
        """Constants the hot path reuses; recomputed after a restore."""
        # Same float as River's `0.1 * self.window_size`; compared against integer masses.
        self.size_limit = 0.1 * self.window_size
        self.max_score = self.n_trees * self.window_size * (2 ** (self.height + 1) - 1)
        self.n_leaves = 2**self.height
        # (X, leaves) of the last score_and_learn: a row's leaves depend on the row and the
        # (fixed) trees alone.
        self._leaf_cache: tuple[np.ndarray, np.ndarray] | None = None

    def initial_state(self) -> HSTState:
        return HSTState(
            l_leaves=np.zeros((self.n_trees, self.n_leaves), dtype=np.int64),
            r_mass=np.zeros((self.n_trees, self.n_nodes), dtype=np.int64),
            counter=0,
            first_window=True,
        )

    # -- hot path ----------------------------------------------------------------------------

    def leaves(self, X: np.ndarray) -> np.ndarray:
        """Leaf rank (0 .. 2**height - 1) each row of ``X`` reaches per tree: intp (n, n_trees)."""
        return hst_kernel.descend(np.ascontiguousarray(X, dtype=np.float64), self.trees.feature, self.trees.threshold, self.height)

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
            raise ValueError(f"X must be (n, {len(self.feature_names)}) and learn (n,); got {X.shape} and {learn.shape}")
        if X_learn is not None:
            X_learn = np.asarray(X_learn, dtype=np.float64)
            if X_learn.shape != X.shape:
                raise ValueError(f"X_learn must have X's shape {X.shape}, got {X_learn.shape}")
        # The pipeline's fixed-point rounds score the same rows again with another mask.
        # Only rows whose values changed are descended again (a flagged event that had moved a
        # min/max rescales the rows after it).
        cached = self._leaf_cache
        if cached is not None and cached[0].shape == X.shape:
            changed = np.flatnonzero((cached[0] != X).any(axis=1))
            leaves = cached[1]
            if changed.size:
                leaves = leaves.copy()
                leaves[changed] = self.leaves(X[changed])
        else:
            leaves = self.leaves(X)
        self._leaf_cache = (X.copy(), leaves)
        learn_leaves = leaves
        if X_learn is not None:
            # Descend again only for learned rows whose learned values differ from the scored ones.
            changed = np.flatnonzero(learn & (X_learn != X).any(axis=1))
            if changed.size:
                learn_leaves = leaves.copy()
                learn_leaves[changed] = self.leaves(X_learn[changed])
        state = self.state
        scores, l_leaves, r_mass, counter, first_window = hst_kernel.walk(
            leaves,
            learn_leaves,
            learn,
            state.l_leaves,
            state.r_mass,
            state.counter,
            state.first_window,
            self.window_size,
            self.size_limit,
            self.height,
            self.max_score,
        )
        return scores, HSTState(l_leaves=l_leaves, r_mass=r_mass, counter=int(counter), first_window=bool(first_window))

    def in_first_window(self, learn: np.ndarray) -> np.ndarray:
        """Rows ``score_and_learn(X, learn)`` scores 0 because no window has completed yet."""
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
        """Trees, masses and counters as numpy arrays and plain values (no seed needed).

        Only what cannot be derived (format 2, see ``STATE_VERSION``): the split nodes of the
        trees and the leaves' masses, in the smallest integer types that hold them.
        """
        inner = self.n_leaves - 1
        mass_type = np.min_scalar_type(self.window_size)
        return {
            "version": STATE_VERSION,
            "feature_names": list(self.feature_names),
            "n_trees": self.n_trees,
            "height": self.height,
            "window_size": self.window_size,
            "limits": dict(self.limits),
            "seed": self.seed,
            "feature": self.trees.feature[:, :inner].astype(np.min_scalar_type(max(len(self.feature_names) - 1, 0))),
            "threshold": self.trees.threshold[:, :inner].copy(),
            "l_leaves": self.state.l_leaves.astype(mass_type),
            "r_leaves": self.state.r_mass[:, inner:].astype(mass_type),
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
        version = state.get("version") if isinstance(state, dict) else None
        if version not in READABLE_STATE_VERSIONS:
            raise StateError(f"HST engine state version {version!r} is not one of {READABLE_STATE_VERSIONS}")
        try:
            feature_names = tuple(state["feature_names"])
            n_trees, height, window_size = (int(state["n_trees"]), int(state["height"]), int(state["window_size"]))
            n_nodes = 2 ** (height + 1) - 1
            shape = (n_trees, n_nodes)
            if version == 1:
                feature = np.asarray(state["feature"], dtype=np.intp)
                threshold = np.asarray(state["threshold"], dtype=np.float64)
                l_mass = np.asarray(state["l_mass"], dtype=np.int64)
                r_mass = np.asarray(state["r_mass"], dtype=np.int64)
            else:
                feature, threshold, l_mass, r_mass = _full_arrays(state, n_trees, height)
            counter = int(state["counter"])
            first_window = bool(state["first_window"])
            limits = dict(state.get("limits") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"HST engine state is malformed: {exc!r}") from exc
        if any(a.shape != shape for a in (feature, threshold, l_mass, r_mass)):
            raise StateError(f"HST engine arrays do not have shape {shape}")
        if feature.size and (feature.min() < 0 or feature.max() >= len(feature_names)):
            raise StateError("HST engine state has split features out of range")
        if n_trees < 1 or height < 0 or not 0 <= counter < window_size:
            raise StateError(f"HST engine state has n_trees={n_trees}, height={height}, counter={counter}, window_size={window_size}")
        _check_masses(l_mass, r_mass, height, counter, 0 if first_window else window_size)
        self.feature_names = feature_names
        self.n_trees, self.height, self.window_size = n_trees, height, window_size
        self.limits = limits
        self.seed = state.get("seed")
        self.n_nodes = n_nodes
        self.trees = Trees(feature=feature.copy(), threshold=threshold.copy())
        self._set_derived()
        self.state = HSTState(l_leaves=l_mass[:, self.n_leaves - 1 :].copy(), r_mass=r_mass.copy(), counter=counter, first_window=first_window)
