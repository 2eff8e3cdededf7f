"""The metric maths: ROC AUC, precision, recall, F1 and false-positive rate over point labels,
and recall and detection delay over window labels. Definitions: the package docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_detector.evaluation.labels import POINT_KINDS, ChangeLabel, WindowMatch
from stream_detector.evaluation.report import ChangeStats, KindStats, RankingStats, WindowStats

#: A changed key is normal again once this many of its events in a row raise no alert.
NORMAL_RUN = 50

NO_COLLECTIVE_NOTE = "no collective alerts were produced (is silence.enabled false?), so {kind} recall is 0"


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties counted half); None when a class is empty."""
    y = np.asarray(y_true, dtype=bool)
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average 1-based ranks over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ratio(num: float, den: float) -> float | None:
    """``num / den``; None when there is nothing to divide by."""
    return num / den if den else None


def f1_score(precision: float | None, recall: float | None) -> float | None:
    """The harmonic mean of precision and recall; None when either is undefined."""
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def point_measures(
    counted: np.ndarray,
    fused: np.ndarray,
    flagged: np.ndarray,
    kind: np.ndarray,
    fired: np.ndarray,
    kinds: list[str],
    names: list[str],
) -> dict[str, Any]:
    """The point-label fields of an EvaluationReport, over the ``counted`` events.

    Per event: ``fused`` score, ``flagged`` decision, ``kind`` code (0 normal, i: ``kinds[i - 1]``)
    and ``fired`` (events x detectors, columns in the order of ``names``).
    """
    fused, flagged, kind, fired = fused[counted], flagged[counted], kind[counted], fired[counted]
    positive = kind > 0
    normal = ~positive
    tp = int((flagged & positive).sum())
    fp = int((flagged & normal).sum())
    fn = int((~flagged & positive).sum())
    tn = int((~flagged & normal).sum())
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    per_kind: dict[str, KindStats] = {}
    for code, name in enumerate(kinds, start=1):
        mine = kind == code
        n_k, tp_k = int(mine.sum()), int((flagged & mine).sum())
        if n_k == 0 and name not in POINT_KINDS:
            continue
        p_k, r_k = ratio(tp_k, tp_k + fp), ratio(tp_k, n_k)
        subset = mine | normal
        per_kind[name] = KindStats(name, n_k, tp_k, p_k, r_k, f1_score(p_k, r_k), roc_auc(mine[subset], fused[subset]))
    detectors = {}
    n_normal = int(normal.sum())
    for j, name in enumerate(names):
        fired_normal = int((fired[:, j] & normal).sum())
        detectors[name] = {
            "fired_normal": fired_normal,
            "false_positive_rate": ratio(fired_normal, n_normal),
            "fired_anomalies": int((fired[:, j] & positive).sum()),
            "recall": {
                kname: ratio(int((fired[:, j] & (kind == code)).sum()), int((kind == code).sum()))
                for code, kname in enumerate(kinds, start=1)
                if kname in per_kind
            },
        }
    return {
        "counted": int(counted.sum()),
        "normal": n_normal,
        "labelled": int(positive.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": f1_score(precision, recall),
        "false_positive_rate": ratio(fp, fp + tn),
        "auc": roc_auc(positive, fused),
        "kinds": per_kind,
        "detectors": detectors,
    }


def largest_tie(values: np.ndarray) -> int:
    """How many of ``values`` share the most common value (0 when there are none)."""
    if values.size == 0:
        return 0
    return int(np.unique(values, return_counts=True)[1].max())


def ranking_stats(counted: np.ndarray, fused: np.ndarray, surprise: np.ndarray, flagged: np.ndarray, kind: np.ndarray) -> RankingStats:
    """The surprise's ROC AUC (point anomalies against every other counted event), the ROC AUCs
    of the fused score and the surprise among the alerts (true against false alerts), and how
    many counted alerts share one fused score and one surprise value."""
    fused, surprise, flagged, kind = fused[counted], surprise[counted], flagged[counted], kind[counted]
    true_alert = kind[flagged] > 0
    return RankingStats(
        surprise_auc=roc_auc(kind > 0, surprise),
        alert_score_auc=roc_auc(true_alert, fused[flagged]),
        alert_surprise_auc=roc_auc(true_alert, surprise[flagged]),
        alerts=int(flagged.sum()),
        top_score_alerts=largest_tie(fused[flagged]),
        top_surprise_alerts=largest_tie(surprise[flagged]),
    )


def window_stats(kind: str, matches: list[WindowMatch], any_alerts: bool) -> WindowStats:
    """Recall and detection delays of the windows of one kind; a note when no collective alert
    was raised at all (then no window could have been detected)."""
    delays = np.array([m.delay_s for m in matches if m.detected], dtype=np.float64)
    detected = int(delays.size)
    note = None
    if not any_alerts:
        note = (
            NO_COLLECTIVE_NOTE.format(kind=kind)
            if matches
            else (f"no collective alerts were produced (is silence.enabled false?), and the labels have no {kind} windows")
        )
    return WindowStats(
        kind=kind,
        windows=len(matches),
        detected=detected,
        recall=ratio(detected, len(matches)) if matches else None,
        delay_median_s=float(np.median(delays)) if detected else None,
        delay_mean_s=float(delays.mean()) if detected else None,
        delay_max_s=float(delays.max()) if detected else None,
        note=note,
        matches=matches,
    )


def normal_after(flags: np.ndarray, run: int = NORMAL_RUN) -> int | None:
    """The first index from which ``run`` events in a row are unflagged (0 when the first
    ``run`` are); None when no such run fits before the end."""
    f = np.asarray(flags, dtype=np.int64)
    if f.size < run:
        return None
    totals = np.r_[0, np.cumsum(f)]
    quiet = np.flatnonzero(totals[run:] - totals[:-run] == 0)
    return int(quiet[0]) if quiet.size else None


def change_stats(change: ChangeLabel, flagged: np.ndarray, labelled: np.ndarray, run: int = NORMAL_RUN, shifts: int = 0) -> ChangeStats:
    """One change's cost from the flags (and point-label marks) of its key's counted events
    from the change on, in stream order, and its ``shifts`` (level_shift records)."""
    alerts = np.flatnonzero(flagged)
    return ChangeStats(
        change=change,
        events=int(flagged.size),
        alerts=int(alerts.size),
        normal_after=normal_after(flagged, run),
        last_alert=int(alerts[-1]) if alerts.size else None,
        labelled=int(np.count_nonzero(labelled)),
        shifts=shifts,
        labelled_alerts=int(np.count_nonzero(flagged & labelled)),
    )
