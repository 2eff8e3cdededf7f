"""RunningMinMax: the vectorised scaler against River's ``preprocessing.MinMaxScaler``."""

from __future__ import annotations

import numpy as np
from river import preprocessing

from stream_detector.detectors.minmax import RunningMinMax
from tests.unit.detectors.hst_reference import NAMES, data_matrix, learn_mask


def test_minmax_matches_river_scaler():
    X, learn = data_matrix("raw"), learn_mask("masked")
    river_scaler = preprocessing.MinMaxScaler()
    ours = RunningMinMax(len(NAMES))
    X_score, X_learn, state = ours.transform(X, learn)
    for i, row in enumerate(X):
        x = dict(zip(NAMES, row.tolist(), strict=True))
        with np.errstate(all="ignore"):
            before = river_scaler.transform_one(x)
        # Before anything was learned River gives NaN, and so do we.
        np.testing.assert_array_equal(list(before.values()), X_score[i])
        if learn[i]:
            river_scaler.learn_one(x)
            np.testing.assert_array_equal(list(river_scaler.transform_one(x).values()), X_learn[i])
    assert state.lo.tolist() == [river_scaler.min[k].get() for k in NAMES]
