"""evaluation.measures: ROC AUC on exact values."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.evaluation import roc_auc


def test_roc_auc_exact_values():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_ranking_stats_count_the_alerts_that_share_one_value():
    from stream_detector.evaluation.measures import largest_tie, ranking_stats

    counted = np.array([True] * 7 + [False])
    fused = np.array([0.1, 0.9, 0.9, 0.9, 0.2, 0.9, 0.5, 0.9])
    surprise = np.array([0.0, 12.0, 15.0, 11.0, 0.1, 15.0, 0.3, 15.0])
    flagged = fused > 0.8
    kind = np.array([0, 1, 2, 0, 0, 1, 0, 1], dtype=np.int16)
    stats = ranking_stats(counted, fused, surprise, flagged, kind)
    # Counted alerts: events 1, 2, 3, 5 (event 7 is not counted): one fused score, surprises 12, 15, 11, 15.
    assert (stats.alerts, stats.top_score_alerts, stats.top_surprise_alerts) == (4, 4, 2)
    # Positives 1, 2, 5 (surprise 12, 15, 15) against 0, 3, 4, 6 (0, 11, 0.1, 0.3): every pair;
    # the fused score ties the normal alert 3 with the positives (10.5 of 12 pairs).
    assert stats.surprise_auc == 1.0
    assert roc_auc(kind[counted] > 0, fused[counted]) == pytest.approx(10.5 / 12)
    # Among the alerts: true 1, 2, 5 against false 3; the fused score ties them all.
    assert stats.alert_score_auc == 0.5 and stats.alert_surprise_auc == 1.0
    assert largest_tie(np.zeros(0)) == 0
    assert stats.to_dict() == {
        "surprise_auc": 1.0,
        "alert_score_auc": 0.5,
        "alert_surprise_auc": 1.0,
        "alerts": 4,
        "top_score_alerts": 4,
        "top_surprise_alerts": 2,
    }


def test_normal_after_is_the_start_of_the_first_quiet_run():
    from stream_detector.evaluation import NORMAL_RUN, normal_after

    assert NORMAL_RUN == 50
    assert normal_after(np.zeros(50, dtype=bool)) == 0  # never alerted
    assert normal_after(np.zeros(49, dtype=bool)) is None  # too few events to tell
    flags = np.zeros(100, dtype=bool)
    flags[[0, 3, 7]] = True
    assert normal_after(flags) == 8  # events 8..57 raise no alert
    flags[60] = True  # a later alert does not undo it
    assert normal_after(flags) == 8
    flags = np.zeros(100, dtype=bool)
    flags[[0, 50]] = True
    assert normal_after(flags) is None  # 1..49 and 51..99 are both short of 50 quiet events
    flags[50] = False
    assert normal_after(flags) == 1
    assert normal_after(np.array([1, 0, 0, 0], dtype=bool), run=3) == 1
