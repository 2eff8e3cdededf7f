"""Calibration shared by the partitions (scoring/shared_calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.config import load_settings
from stream_detector.errors import StateError
from stream_detector.scoring.calibration import Calibrator, fit_tail
from stream_detector.scoring.factory import build_pipeline
from stream_detector.scoring.shared_calibration import (
    SUMMARY_POINTS,
    CalibrationPool,
    SharedFit,
    decode_summaries,
    encode_summaries,
    merged_window,
    scoring_fingerprint,
    summarize,
)


def _learn(calibrator: Calibrator, scores: np.ndarray) -> np.ndarray:
    p, state = calibrator.transform(scores)
    calibrator.commit(state)
    return p


def test_a_small_window_is_summarized_exactly() -> None:
    window = np.sort(np.random.default_rng(0).normal(size=300))
    summary = summarize(window, seen=300)
    assert np.array_equal(summary.values, window) and summary.weights.sum() == 300 and summary.count == 300


def test_a_summary_keeps_the_distribution_and_its_tail() -> None:
    window = np.sort(np.random.default_rng(1).exponential(size=20_000))
    summary = summarize(window, seen=25_000)
    assert len(summary.values) == SUMMARY_POINTS
    assert summary.weights.sum() == pytest.approx(20_000)
    merged = merged_window([summary], 20_000)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert np.quantile(merged, q) == pytest.approx(np.quantile(window, q), rel=0.02), q
    exact, sketched = fit_tail(window, 0.95), fit_tail(merged, 0.95)
    scores = np.array([3.0, 5.0, 8.0, 12.0])
    assert np.allclose(np.log(sketched.survival(scores)), np.log(exact.survival(scores)), rtol=0.05)


def test_merging_summaries_is_the_union_of_the_windows() -> None:
    rng = np.random.default_rng(2)
    parts = [np.sort(rng.normal(loc, 1.0, size=n)) for loc, n in ((0.0, 15_000), (3.0, 5_000))]
    union = np.sort(np.concatenate(parts))
    merged = merged_window([summarize(p, len(p)) for p in parts], 20_000)
    assert np.all(np.diff(merged) >= 0)
    for q in (0.1, 0.5, 0.75, 0.9, 0.99):
        assert np.quantile(merged, q) == pytest.approx(np.quantile(union, q), abs=0.05), q


def test_one_partition_alone_keeps_its_own_fit() -> None:
    """A topic of one partition (and replay, evaluate) scores exactly as without sharing."""
    scores = np.random.default_rng(3).exponential(size=6_000)
    alone, pooled = Calibrator(window=2_000, refresh=200, min_events=500), Calibrator(window=2_000, refresh=200, min_events=500)
    pool = CalibrationPool(2_000, 200, 500, 0.95)
    pooled.shared = pool.shared("d")
    for chunk in np.array_split(scores, 30):
        assert np.array_equal(_learn(alone, chunk), _learn(pooled, chunk))
        pool.shared("d").put("t/0", summarize(pooled.sorted_window(), pooled.seen))
    assert pool.shared("d").fit() is None


def test_two_partitions_calibrate_with_one_fit_before_either_is_ready_alone() -> None:
    rng = np.random.default_rng(4)
    pool = CalibrationPool(window=2_000, refresh=200, min_events=500, tail_quantile=0.95)
    a, b = (Calibrator(window=2_000, refresh=200, min_events=500) for _ in range(2))
    for c in (a, b):
        c.shared = pool.shared("d")
    for c, source in ((a, "t/0"), (b, "t/1")):
        _learn(c, rng.exponential(size=300))
        pool.shared("d").put(source, summarize(c.sorted_window(), c.seen))
    assert a.seen < 500 and b.seen < 500  # neither could alert alone
    assert a.ready and b.ready
    extreme = np.array([15.0])
    assert a.transform(extreme)[0][0] < 1e-3 and a.transform(extreme)[0][0] == b.transform(extreme)[0][0]


def test_the_shared_fit_refits_after_refresh_scores_in_all() -> None:
    fit = SharedFit(window=2_000, refresh=1_000, min_events=100, tail_quantile=0.95)
    rng = np.random.default_rng(5)
    for source in ("t/0", "t/1"):
        fit.put(source, summarize(np.sort(rng.exponential(size=500)), 500))
    first = fit.fit()
    assert first is not None
    fit.put("t/0", summarize(np.sort(rng.exponential(scale=3.0, size=900)), 900))  # 400 more: not yet
    assert fit.fit() is first
    fit.put("t/1", summarize(np.sort(rng.exponential(scale=3.0, size=1_200)), 1_200))  # 1,100 more
    second = fit.fit()
    assert second is not None and second is not first and second.threshold > first.threshold


def test_a_pool_takes_summaries_when_enough_was_learned_and_sends_each_once() -> None:
    settings = load_settings(environ={"STREAM_DETECTOR_AUTOENCODER__ENABLED": "false"})
    pool = CalibrationPool.from_settings(settings)
    pipeline = build_pipeline(settings)
    pool.attach(pipeline)
    calibrators = [c for c in pipeline.calibrators.values() if isinstance(c, Calibrator)]
    assert calibrators and all(c.shared is pool.shared(name) for name, c in pipeline.calibrators.items() if isinstance(c, Calibrator))
    assert not pool.contribute("t/0", pipeline)  # nothing learned yet
    for c in calibrators:
        _learn(c, np.random.default_rng(6).exponential(size=10))
    assert pool.contribute("t/0", pipeline)
    assert not pool.contribute("t/0", pipeline)  # nothing new
    outbox = pool.take_outbox()
    assert list(outbox) == ["t/0"] and pool.take_outbox() == {}
    fingerprint, summaries = decode_summaries(outbox["t/0"])
    assert fingerprint == scoring_fingerprint(settings) and set(summaries) == {c for c, k in pipeline.calibrators.items() if isinstance(k, Calibrator)}


def test_records_round_trip_and_foreign_or_damaged_ones_are_refused() -> None:
    pool = CalibrationPool(2_000, 200, 500, 0.95, fingerprint="abc")
    summary = summarize(np.sort(np.random.default_rng(7).exponential(size=3_000)), 3_000)
    record = encode_summaries("abc", {"zscore": summary})
    pool.receive("t/3", record)
    assert pool.shared("zscore").summaries["t/3"].count == 3_000
    with pytest.raises(StateError) as caught:
        pool.receive("t/3", encode_summaries("other", {"zscore": summary}))
    assert caught.value.reason == "incompatible"
    for damaged in (b"", b"not a record", record[:-7]):
        with pytest.raises(StateError) as caught:
            pool.receive("t/3", damaged)
        assert caught.value.reason == "corrupt"
    unsorted = type(summary)(summary.values[::-1].copy(), summary.weights, summary.count, summary.seen)
    with pytest.raises(StateError, match="sorted"):
        pool.receive("t/3", encode_summaries("abc", {"zscore": unsorted}))
    overcounted = type(summary)(summary.values, summary.weights, summary.count + 50, summary.seen + 50)
    with pytest.raises(StateError, match="weights sum"):
        pool.receive("t/3", encode_summaries("abc", {"zscore": overcounted}))


def test_the_fingerprint_follows_the_scoring_settings_only() -> None:
    base = load_settings(environ={})
    assert scoring_fingerprint(base) == scoring_fingerprint(load_settings(environ={"STREAM_DETECTOR_KAFKA__GROUP_ID": "other"}))
    assert scoring_fingerprint(base) != scoring_fingerprint(load_settings(environ={"STREAM_DETECTOR_SCORING__TAIL_QUANTILE": "0.9"}))


def test_a_received_summary_sets_when_that_partition_is_next_due() -> None:
    """A restarted instance reads its partitions' summaries back and goes on sending them at
    the same points, not all at once."""
    settings = load_settings(environ={"STREAM_DETECTOR_AUTOENCODER__ENABLED": "false"})
    running, restarted = CalibrationPool.from_settings(settings), CalibrationPool.from_settings(settings)
    pipeline = build_pipeline(settings)
    calibrators = [c for c in pipeline.calibrators.values() if isinstance(c, Calibrator)]
    for c in calibrators:
        _learn(c, np.random.default_rng(8).exponential(size=1_500))
    assert running.contribute("t/0", pipeline)
    restarted.receive("t/0", running.take_outbox()["t/0"])
    for c in calibrators:
        _learn(c, np.random.default_rng(9).exponential(size=300))
    assert not restarted.contribute("t/0", pipeline) and not running.contribute("t/0", pipeline)
    for c in calibrators:
        _learn(c, np.random.default_rng(10).exponential(size=settings.scoring.calibration_refresh))
    assert restarted.contribute("t/0", pipeline) and running.contribute("t/0", pipeline)
