"""The fusion rule, written once: tail probabilities of k detectors -> one score in [0, 1].

Every detector's calibrator turns its raw score into a tail probability ``p`` (the chance of a
score at least this high among recent normal events). With k detectors looking at each event,
the smallest of the k probabilities is Bonferroni-adjusted: ``fused = 1 - min(1, k * min_d p_d)``.
An event is an anomaly when ``fused > threshold``, and a detector "fired" on it when its own
adjusted score ``1 - min(1, k * p_d)`` is above the same threshold; so an anomaly always has
at least one detector that fired.

The score saturates: a probability floored at 1e-12 (scoring/calibration.py) gives the same
score to every event past the floor, and ``1 - k p`` rounds to 1 far sooner. The surprise ranks
them: ``-log10(min(1, k * min_d p_d))`` from the detectors' natural log probabilities, which are
not floored, computed in log space so nothing underflows. It is 0 for an unremarkable event,
``-log10(1 - fused)`` while the probability is above the floor, and grows without bound past it;
it never orders two events against their fused scores. A detector's own surprise is the same
with its ``p_d``, so the event's surprise is the largest of its detectors'.
"""

from __future__ import annotations

import math

import numpy as np

LN10 = math.log(10.0)


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


def surprise(log_probability: np.ndarray | float, k: int) -> np.ndarray:
    """``-log10(min(1, k * p))`` from ``log p`` (natural log), without leaving log space: the
    surprise of tail probability ``p`` Bonferroni-adjusted over k detectors (0 or more)."""
    log_adjusted = math.log(k) + np.asarray(log_probability, dtype=np.float64)
    return np.maximum(-log_adjusted / LN10, 0.0) + 0.0  # + 0.0: no -0.0


def fuse_surprise(log_probabilities: dict[str, np.ndarray]) -> np.ndarray:
    """The surprise of each event from every detector's natural log tail probabilities (aligned
    arrays): ``-log10(min(1, k * min_d p_d))``, the fused score's tail in log space."""
    if not log_probabilities:
        return np.zeros(0)
    stacked = np.vstack(list(log_probabilities.values()))
    return surprise(stacked.min(axis=0), len(log_probabilities))
