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
