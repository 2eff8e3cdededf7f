"""The fusion rule and the surprise: ``-log10`` of the fused tail probability, from the
calibrators' log probabilities, which are not floored at 1e-12 as the probabilities are.

The references are written out here: the Bonferroni bound ``min(1, k * min_d p_d)`` from the
probabilities, and the Gaussian tail ``erfc(z / sqrt 2)`` for |z| scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_detector.scoring import fusion
from stream_detector.scoring.calibration import MIN_PROBABILITY, Calibrator, PassThrough, fit_tail


def abs_normal(n: int, seed: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).standard_normal(n))


def ready_calibrator(data: np.ndarray) -> Calibrator:
    cal = Calibrator(window=len(data), refresh=len(data), min_events=len(data), tail_quantile=0.98)
    _, state = cal.transform(data)
    cal.commit(state)
    assert cal.ready
    return cal


def test_a_6_sd_and_a_60_sd_event_get_different_surprises_in_the_right_order():
    # |z| scores of normal events; the fitted tail is bounded (shape < 0) as the z-score's and the
    # autoencoder's are on the generated stream, so 6 sd is already past the 1e-12 floor.
    cal = ready_calibrator(abs_normal(50_000, 1))
    assert cal._state.fit.shape < 0
    probe = np.array([3.0, 6.0, 60.0, 600.0])
    p, log_p, _ = cal.transform_with_log(probe, np.zeros(len(probe), dtype=bool))
    k = 4
    others = {name: np.ones(len(probe)) for name in ("b", "c", "d")}
    fused = fusion.fuse({"z": p, **others})
    surprise = fusion.fuse_surprise({"z": log_p, **{name: np.zeros(len(probe)) for name in others}})
    # The floored probability makes 6, 60 and 600 sd one fused score ...
    assert p[1] == p[2] == p[3] == MIN_PROBABILITY
    assert fused[1] == fused[2] == fused[3] == 1.0 - k * MIN_PROBABILITY
    # ... the surprise keeps them apart, in order, finite, past -log10(k * 1e-12).
    assert np.all(np.diff(surprise) > 0), surprise
    assert np.all(np.isfinite(surprise))
    assert surprise[1] > -math.log10(k * MIN_PROBABILITY)
    assert surprise[2] > surprise[1] + 10, surprise  # 60 sd is many decades beyond 6 sd
    # Where nothing is floored the surprise is -log10(min(1, k p)) of the same probability.
    assert surprise[0] == pytest.approx(-math.log10(min(1.0, k * p[0])), rel=1e-12)


@pytest.mark.parametrize(
    "data",
    [abs_normal(20_000, 0), np.random.default_rng(1).pareto(2.0, 20_000), np.random.default_rng(2).uniform(0, 1, 20_000)],
    ids=["normal", "heavy (shape > 0)", "bounded (shape < 0)"],
)
def test_log_survival_is_the_log_of_the_probability_above_the_floor_and_goes_on_below_it(data):
    fit = fit_tail(data, 0.98)
    assert fit.ready
    grid = np.r_[np.linspace(data.min() - 1, data.max() * 3, 4001), data.max() * np.array([10.0, 1e3, 1e6, 1e300]), np.inf]
    p, log_p = fit.log_survival(grid)
    np.testing.assert_array_equal(p, fit.survival(grid))
    above = p > MIN_PROBABILITY
    assert above.any() and (~above).any(), "the grid reaches past the floor"
    np.testing.assert_array_equal(log_p[above], np.log(p[above]))
    assert np.all(log_p[~above] <= math.log(MIN_PROBABILITY))
    # Non-increasing over the whole grid, strictly decreasing past the floor up to the last
    # finite score; finite even for an infinite score.
    assert np.all(np.diff(log_p) <= 0)
    beyond = log_p[~above][:-1]
    assert np.all(np.diff(beyond) < 0), beyond
    assert np.all(np.isfinite(log_p))


def test_a_bounded_tail_goes_on_past_its_end_point_as_an_exponential_of_its_scale():
    fit = fit_tail(np.random.default_rng(2).uniform(0, 1, 20_000), 0.98)
    assert fit.shape < 0
    end = fit.threshold + fit.scale / -fit.shape  # where the fitted tail reaches probability 0
    _, log_p = fit.log_survival(np.array([end, end + fit.scale, end + 11 * fit.scale]))
    assert np.all(np.isfinite(log_p))
    assert log_p[1] - log_p[2] == pytest.approx(10.0, rel=1e-9)  # e^-10 per 10 scales
    assert log_p[0] - log_p[1] == pytest.approx(1.0, rel=1e-9)


def test_a_nan_score_carries_no_evidence():
    fit = fit_tail(abs_normal(20_000, 0), 0.98)
    p, log_p = fit.log_survival(np.array([np.nan]))
    assert p[0] == 1.0 and log_p[0] == 0.0


def test_surprise_is_ordered_like_the_fused_score_and_is_its_tail_where_nothing_underflows():
    rng = np.random.default_rng(5)
    k, n = 3, 20_000
    # Log probabilities from about 1 down to 1e-40; the probabilities floored as a calibrator does.
    log_p = {f"d{j}": -rng.exponential(4.0, n) * rng.choice([1.0, 10.0], n) for j in range(k)}
    p = {name: np.maximum(np.exp(lp), MIN_PROBABILITY) for name, lp in log_p.items()}
    for name in p:  # above the floor the log is the log of the same number (calibration_kernel)
        above = p[name] > MIN_PROBABILITY
        log_p[name][above] = np.log(p[name][above])
    fused = fusion.fuse(p)
    surprise = fusion.fuse_surprise(log_p)
    # No inversion: sorted by fused score (ties by surprise), the surprise never decreases.
    order = np.lexsort((surprise, fused))
    assert np.all(np.diff(surprise[order]) >= 0)
    # The ties the floor makes are broken.
    floored = fused == fused.max()
    assert floored.sum() > 100 and np.unique(surprise[floored]).size == floored.sum()
    # Equal to -log10(min(1, k p_min)) wherever that does not underflow, and 0 or more.
    p_min = np.min(np.vstack(list(p.values())), axis=0)
    exact = p_min > MIN_PROBABILITY
    np.testing.assert_allclose(surprise[exact], -np.log10(np.minimum(1.0, k * p_min[exact])), rtol=1e-12, atol=1e-15)
    assert np.all(surprise >= 0) and not np.signbit(surprise).any()
    assert np.all(surprise[~exact] >= -math.log10(k * MIN_PROBABILITY))


def test_the_fused_surprise_is_the_largest_detector_surprise():
    log_p = {"a": np.log(np.array([0.5, 1e-3, 1e-30, 1.0])), "b": np.log(np.array([0.9, 1e-5, 1e-20, 1.0]))}
    fused = fusion.fuse_surprise(log_p)
    each = {name: fusion.surprise(lp, 2) for name, lp in log_p.items()}
    np.testing.assert_array_equal(fused, np.maximum(each["a"], each["b"]))
    np.testing.assert_allclose(fused, [0.0, -math.log10(2e-5), -math.log10(2e-30), 0.0], rtol=1e-12)
    assert fusion.fuse_surprise({}).shape == (0,)


def test_pass_through_gives_the_log_of_its_probability():
    p, log_p, state = PassThrough().transform_with_log(1.0 - np.array([1.0, 1e-3, 0.0]))
    np.testing.assert_allclose(log_p, np.log(p))
    assert p[2] == MIN_PROBABILITY and state is None


# -- evidence independent of the event's values (Detector.independent_evidence) -----------------


def test_a_duplicate_s_evidence_multiplies_the_others_and_keeps_its_flag():
    rng = np.random.default_rng(3)
    n, k, threshold = 5000, 4, 0.9999
    p = {name: rng.uniform(0, 1, n) for name in ("z", "hst", "ae")}
    p["dup"] = np.where(rng.random(n) < 0.2, 1e-9, 1.0)
    log_p = {name: np.log(v) for name, v in p.items()}
    plain, plain_surprise = fusion.fuse(p), fusion.fuse_surprise(log_p)
    fused = fusion.fuse(p, {"dup"}, threshold)
    surprise = fusion.fuse_surprise(log_p, {"dup"}, threshold)
    dup = p["dup"] < 1
    # Elsewhere nothing changes; the flags do not change at all.
    np.testing.assert_array_equal(fused[~dup], plain[~dup])
    np.testing.assert_array_equal(surprise[~dup], plain_surprise[~dup])
    np.testing.assert_array_equal(fused > threshold, plain > threshold)
    # A duplicate's tail: k * p_dup times the Sidak-adjusted smallest of the other three.
    smallest = np.min(np.vstack([p["z"], p["hst"], p["ae"]]), axis=0)
    expected = -np.log10(k * 1e-9 * (1 - (1 - smallest) ** 3))
    np.testing.assert_allclose(surprise[dup], expected[dup], rtol=1e-9)
    np.testing.assert_allclose(fused[dup], 1 - 10 ** -expected[dup], rtol=0, atol=1e-15)
    # The duplicates no longer share one score: an odd re-sent sale ranks above an ordinary one.
    assert np.unique(plain_surprise[dup]).size == 1
    assert np.unique(surprise[dup]).size == dup.sum()
    order = np.lexsort((surprise, fused))
    assert np.all(np.diff(surprise[order]) >= 0)  # never against the fused score


def test_independent_evidence_that_does_not_fire_multiplies_nothing():
    p = {"z": np.array([0.5, 1e-7]), "dup": np.array([0.01, 0.01])}  # 2 * 0.01: not past 0.9999
    log_p = {name: np.log(v) for name, v in p.items()}
    np.testing.assert_array_equal(fusion.fuse(p, {"dup"}, 0.9999), fusion.fuse(p))
    np.testing.assert_array_equal(fusion.fuse_surprise(log_p, {"dup"}, 0.9999), fusion.fuse_surprise(log_p))


def test_the_joint_tail_is_finite_far_past_the_floor():
    log_p = {"z": np.array([-5000.0, -0.0]), "dup": np.log(np.array([1e-9, 1e-9]))}
    surprise = fusion.fuse_surprise(log_p, {"dup"}, 0.9999)
    assert np.all(np.isfinite(surprise))
    # 2 * 1e-9 times 1 - (1 - p)^1 = p: e^-5000 adds 5000 / ln 10 decades; p = 1 adds none.
    np.testing.assert_allclose(surprise, [-math.log10(2e-9) + 5000 / math.log(10), -math.log10(2e-9)], rtol=1e-12)
