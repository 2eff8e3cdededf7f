"""Compiled walk of Half-Space Trees over a batch (numba), event by event as River does.

Per event: score against ``r_mass`` (each tree adds ``r_mass * 2**depth`` down the event's path,
stopping after the first node with ``r_mass < size_limit``), then, if the event is learned,
add 1 to ``l_mass`` along its path; every ``window_size`` learned events ``r_mass`` becomes
``l_mass`` and ``l_mass`` restarts at zero. Masses are integers and the sum per event is exact,
so the scores are River's to the last bit. Compiled, this costs well under a microsecond per
event and tree level, with no per-batch tables to build (which made small batches slow).

``l_mass`` is only read at a window's pivot, and every inner node's mass is the sum of its
leaves', so learning counts leaves alone (one increment per tree instead of one per level) and
the pivot builds the inner nodes (``tree_from_leaves``).
"""

from __future__ import annotations

import functools

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def walk(leaves, learn_leaves, learn, l_leaves0, r_mass0, counter, first_window, window_size, size_limit, height, max_score):  # pragma: no cover - compiled
    """Scores (n,) and the state after the batch: ``(scores, l_leaves, r_mass, counter, first_window)``.

    ``leaves`` (n, n_trees): each event's leaf rank within each tree (0 .. 2**height - 1) for
    scoring; ``learn_leaves`` the same for the value learned (they differ when a running scaler
    moved with the event). ``l_leaves0`` (n_trees, n_leaves): the current window's leaf masses;
    ``r_mass0`` (n_trees, n_nodes): every node's mass in the last complete window. Neither is
    modified.
    """
    n, n_trees = leaves.shape
    l_leaves = l_leaves0.copy()
    r_mass = r_mass0  # read only; a pivot replaces it
    scores = np.zeros(n)
    for i in range(n):
        if not first_window:
            total = 0
            for t in range(n_trees):
                leaf = leaves[i, t]
                for depth in range(height + 1):
                    node = (1 << depth) - 1 + (leaf >> (height - depth))
                    mass = r_mass[t, node]
                    total += mass << depth
                    if mass < size_limit:
                        break
            scores[i] = 1.0 - total / max_score
        if learn[i]:
            for t in range(n_trees):
                l_leaves[t, learn_leaves[i, t]] += 1
            counter += 1
            if counter == window_size:
                r_mass = tree_from_leaves(l_leaves, height)
                l_leaves = np.zeros_like(l_leaves)
                counter = 0
                first_window = False
    return scores, l_leaves, r_mass, counter, first_window


@numba.njit(cache=True, nogil=True)
def tree_from_leaves(leaf_mass, height):  # pragma: no cover - compiled
    """Every node's mass (n_trees, n_nodes) in heap layout from the leaves' (n_trees, n_leaves):
    a parent's mass is the sum of its children's."""
    n_trees = leaf_mass.shape[0]
    first_leaf = (1 << height) - 1
    mass = np.zeros((n_trees, 2 * first_leaf + 1), dtype=leaf_mass.dtype)
    for t in range(n_trees):
        for j in range(first_leaf + 1):
            mass[t, first_leaf + j] = leaf_mass[t, j]
        for node in range(first_leaf - 1, -1, -1):
            mass[t, node] = mass[t, 2 * node + 1] + mass[t, 2 * node + 2]
    return mass


@numba.njit(cache=True, nogil=True, error_model="numpy")
def descend(X, feature, threshold, height):  # pragma: no cover - compiled
    """Leaf rank (0 .. 2**height - 1) each row of ``X`` reaches in each tree (heap layout:
    node ``k`` has children ``2k + 1`` when ``value < threshold`` and ``2k + 2`` otherwise, so
    a NaN goes right, as in River when the key is present with a NaN value)."""
    n = X.shape[0]
    n_trees = feature.shape[0]
    first_leaf = (1 << height) - 1
    out = np.zeros((n, n_trees), dtype=np.intp)
    # Level by level over all rows: the rows' steps are independent, so the CPU overlaps their
    # loads (one row's descent is a chain of dependent loads).
    for t in range(n_trees):
        for _ in range(height):
            for i in range(n):
                node = out[i, t]
                out[i, t] = 2 * node + 1 if X[i, feature[t, node]] < threshold[t, node] else 2 * node + 2
        for i in range(n):
            out[i, t] -= first_leaf
    return out


@functools.cache
def warm_up() -> None:
    """Load (or compile) the kernels at construction rather than inside the first batch."""
    leaves = np.zeros((1, 1), dtype=np.intp)
    mass = np.zeros((1, 1), dtype=np.int64)
    walk(leaves, leaves, np.ones(1, dtype=np.bool_), mass, mass, 0, True, 1, 0.1, 0, 1)
    tree_from_leaves(mass, 0)
    descend(np.zeros((1, 1)), np.zeros((1, 1), dtype=np.intp), np.zeros((1, 1)), 0)
