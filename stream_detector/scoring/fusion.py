"""The fusion rule, written once: tail probabilities of k detectors -> one score in [0, 1].

Every detector's calibrator turns its raw score into a tail probability ``p`` (the chance of a
score at least this high among recent normal events). With k detectors looking at each event,
the smallest of the k probabilities is Bonferroni-adjusted: ``fused = 1 - min(1, k * min_d p_d)``.
An event is an anomaly when ``fused > threshold``, and a detector "fired" on it when its own
adjusted score ``1 - min(1, k * p_d)`` is above the same threshold; so an anomaly always has
at least one detector that fired.
"""

from __future__ import annotations

import numpy as np


def adjusted_score(probability: np.ndarray | float, k: int) -> np.ndarray:
    """``1 - min(1, k * p)``: the Bonferroni-adjusted score of tail probability ``p`` over k detectors."""
    return 1.0 - np.minimum(1.0, k * np.asarray(probability, dtype=np.float64))


def fuse(probabilities: dict[str, np.ndarray]) -> np.ndarray:
    """The fused score of each event from every detector's tail probabilities (aligned arrays)."""
    if not probabilities:
        return np.zeros(0)
    stacked = np.vstack(list(probabilities.values()))
    return adjusted_score(stacked.min(axis=0), len(probabilities))


def fired(probabilities: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """For each detector, the events whose adjusted score is above ``threshold``."""
    k = len(probabilities)
    return {name: adjusted_score(p, k) > threshold for name, p in probabilities.items()}
