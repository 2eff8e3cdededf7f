"""replace_sorted: a refit's sorted window moved forward by the scores that left and entered it,
against sorting the new window in full; and what it refuses to slide (the caller sorts then)."""

from __future__ import annotations

import numpy as np
import pytest


def test_replace_sorted_equals_sorting_the_new_window():
    from stream_detector.scoring.calibration_kernel import replace_sorted

    rng = np.random.default_rng(7)
    for trial in range(200):
        # Few distinct values: many ties between the reference, the removed and the added.
        window = rng.integers(0, 6, size=int(rng.integers(1, 60))).astype(float)
        removed = rng.choice(window, size=int(rng.integers(0, len(window) + 1)), replace=False)
        added = rng.integers(0, 6, size=int(rng.integers(0, 30))).astype(float)
        kept = list(window)
        for value in removed:
            kept.remove(value)
        ok, out = replace_sorted(np.sort(window), np.sort(removed), np.sort(added))
        assert ok, trial
        np.testing.assert_array_equal(out, np.sort(np.r_[kept, added]))


@pytest.mark.parametrize(
    "reference, removed, added",
    [
        ([1.0, 2.0, 3.0], [2.5], []),  # removed value not in the window
        ([1.0, 2.0, 3.0], [0.5], [4.0]),  # below everything
        ([1.0, 2.0, 3.0], [4.0], []),  # above everything
        ([1.0, 2.0], [2.0, 2.0], []),  # removed more often than present
        ([1.0, np.nan], [1.0], []),  # NaN in the window
        ([1.0, 2.0], [1.0], [np.nan]),  # NaN entering
    ],
)
def test_replace_sorted_refuses_what_it_cannot_slide(reference, removed, added):
    from stream_detector.scoring.calibration_kernel import replace_sorted

    ok, _ = replace_sorted(np.array(reference), np.array(removed), np.array(added))
    assert not ok
