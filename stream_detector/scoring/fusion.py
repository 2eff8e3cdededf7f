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

Evidence independent of the event's values (``Detector.independent_evidence``: an exact
duplicate, since any sale is as likely to be re-sent) multiplies the rest instead of competing
with it. Where such a detector fires, the event's tail is ``min(1, k p_i)`` times the others'
(their smallest probability, Sidak-adjusted over them: ``1 - (1 - p_min)^m``), for fused score
and surprise alike. The flags do not change (the event was flagged by ``p_i`` already), but
duplicates no longer share one score: a re-sent sale of an odd amount ranks above a re-sent
ordinary one (before, 23-26 % of the generator's alerts shared the duplicates' surprise).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

LN10 = math.log(10.0)
# Below this log probability ``1 - (1 - p)^m`` is ``m p`` to within 1e-9 and is computed so,
# where ``1 - p`` would round to 1.
_SMALL_LOG_P = -20.0


def adjusted_score(probability: np.ndarray | float, k: int) -> np.ndarray:
    """``1 - min(1, k * p)``: the Bonferroni-adjusted score of tail probability ``p`` over k detectors."""
    return 1.0 - np.minimum(1.0, k * np.asarray(probability, dtype=np.float64))


def fuse(probabilities: dict[str, np.ndarray], independent: Collection[str] = (), threshold: float = 1.0) -> np.ndarray:
    """The fused score of each event from every detector's tail probabilities (aligned arrays);
    ``independent``: detectors whose evidence multiplies the others' where it fires above
    ``threshold`` (module docstring)."""
    if not probabilities:
        return np.zeros(0)
    stacked = np.vstack(list(probabilities.values()))
    fused = adjusted_score(stacked.min(axis=0), len(probabilities))
    if not any(name in independent for name in probabilities):
        return fused  # no logs to take: the pipeline decides on this every round
    with np.errstate(divide="ignore"):
        joint = _joint_log(_logs(probabilities), independent, threshold)
    if joint is not None:
        where = ~np.isnan(joint)
        fused[where] = np.maximum(fused[where], -np.expm1(joint[where]))
    return fused


def _logs(probabilities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.log(p) for name, p in probabilities.items()}


def _joint_log(log_probabilities: dict[str, np.ndarray], independent: Collection[str], threshold: float) -> np.ndarray | None:
    """Natural log of the joint tail of the events an ``independent`` detector fires on: the sum
    of each firing one's ``log(k p_i)`` and of the Sidak-adjusted smallest probability of the
    others; NaN where none fires. None: no independent detector, or no other."""
    mine = [name for name in log_probabilities if name in independent]
    others = [name for name in log_probabilities if name not in independent]
    if not mine or not others:
        return None
    k = len(log_probabilities)
    # fires: 1 - min(1, k p) > threshold (``fired``), in log space.
    limit = math.log1p(-threshold) if threshold < 1.0 else -math.inf
    total = np.zeros(len(log_probabilities[mine[0]]))
    fires = np.zeros(len(total), dtype=bool)
    for name in mine:
        adjusted = math.log(k) + log_probabilities[name]
        here = adjusted < limit
        total += np.where(here, adjusted, 0.0)
        fires |= here
    smallest = np.vstack([log_probabilities[name] for name in others]).min(axis=0)
    total += _log_sidak(smallest, len(others))
    return np.where(fires, total, np.nan)


def _log_sidak(log_p: np.ndarray, m: int) -> np.ndarray:
    """``log(1 - (1 - p)^m)`` from ``log p``: the chance that the smallest of m independent
    uniform probabilities is at most ``p``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.log(-np.expm1(m * np.log1p(-np.exp(log_p))))
    return np.where(log_p < _SMALL_LOG_P, math.log(m) + log_p, exact)


def fired(probabilities: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """For each detector, the events whose adjusted score is above ``threshold``."""
    k = len(probabilities)
    return {name: adjusted_score(p, k) > threshold for name, p in probabilities.items()}


def surprise(log_probability: np.ndarray | float, k: int) -> np.ndarray:
    """``-log10(min(1, k * p))`` from ``log p`` (natural log), without leaving log space: the
    surprise of tail probability ``p`` Bonferroni-adjusted over k detectors (0 or more)."""
    log_adjusted = math.log(k) + np.asarray(log_probability, dtype=np.float64)
    return np.maximum(-log_adjusted / LN10, 0.0) + 0.0  # + 0.0: no -0.0


def fuse_surprise(log_probabilities: dict[str, np.ndarray], independent: Collection[str] = (), threshold: float = 1.0) -> np.ndarray:
    """The surprise of each event from every detector's natural log tail probabilities (aligned
    arrays): ``-log10(min(1, k * min_d p_d))``, the fused score's tail in log space, and where an
    ``independent`` detector fires, of the joint tail (``fuse``)."""
    if not log_probabilities:
        return np.zeros(0)
    stacked = np.vstack(list(log_probabilities.values()))
    out = surprise(stacked.min(axis=0), len(log_probabilities))
    joint = _joint_log(log_probabilities, independent, threshold)
    if joint is not None:
        where = ~np.isnan(joint)
        out[where] = np.maximum(out[where], -joint[where] / LN10)
    return out
