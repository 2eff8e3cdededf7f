"""evaluation.datasets: River's data sets load without a download."""

from __future__ import annotations

from stream_detector.evaluation import load_dataset


def test_datasets_ship_with_river():
    shuttle = load_dataset("shuttle")
    assert shuttle.X.shape == (49_097, 9)
    assert shuttle.y is not None and int(shuttle.y.sum()) == 3_511
    water = load_dataset("waterflow")
    assert water.X.shape == (1_268, 1)
    assert water.y is None  # no anomaly labels in WaterFlow
