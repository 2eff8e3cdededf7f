"""Calibrator: raw scores -> tail probabilities, batch-invariant and restorable."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

from stream_detector.scoring.calibration import MIN_PROBABILITY, Calibrator, PassThrough, fit_tail


def abs_normal(n: int, seed: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).standard_normal(n))


def run_chunks(cal: Calibrator, raw: np.ndarray, learn: np.ndarray | None, sizes: list[int]) -> np.ndarray:
    out, start, k = [], 0, 0
    while start < len(raw):
        stop = min(len(raw), start + sizes[k % len(sizes)])
        p, state = cal.transform(raw[start:stop], None if learn is None else learn[start:stop])
        cal.commit(state)
        out.append(p)
        start, k = stop, k + 1
    return np.concatenate(out)


def assert_same_state(a: Calibrator, b: Calibrator) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["seen"] == sb["seen"]
    np.testing.assert_array_equal(sa["buffer"], sb["buffer"])
    if sa["fit_reference"] is None:
        assert sb["fit_reference"] is None
    else:
        np.testing.assert_array_equal(sa["fit_reference"], sb["fit_reference"])
    fa, fb = a._state.fit, b._state.fit
    assert fa.ready == fb.ready
    np.testing.assert_array_equal(fa.reference, fb.reference)
    assert (fa.threshold, fa.tail_fraction, fa.shape, fa.scale) == (fb.threshold, fb.tail_fraction, fb.shape, fb.scale)


def test_survival_is_monotone_non_increasing():
    fit = fit_tail(abs_normal(20_000, 0), 0.95)
    assert fit.ready
    grid = np.r_[np.linspace(-1, 12, 5001), [1e3, 1e6, np.inf]]
    p = fit.survival(grid)
    assert np.all(np.diff(p) <= 0)
    assert p[0] == 1.0 or p[0] == pytest.approx(1.0, abs=1e-4)
    assert np.all((p >= MIN_PROBABILITY) & (p <= 1.0))
    # Heavy- and light-tailed data too.
    for data in (np.random.default_rng(1).pareto(2.0, 20_000), np.random.default_rng(2).uniform(0, 1, 20_000)):
        f = fit_tail(data, 0.98)
        q = f.survival(np.linspace(data.min() - 1, data.max() * 3, 3001))
        assert np.all(np.diff(q) <= 0)


def test_tail_probabilities_on_standard_normal():
    window = 200_000
    cal = Calibrator(window=window, refresh=window, min_events=window, tail_quantile=0.98)
    _, state = cal.transform(abs_normal(window, 3))
    cal.commit(state)
    assert cal.ready
    probe = np.array([1.0, 2.0, 3.0, 4.0, 4.5])
    p, _ = cal.transform(probe, np.zeros(len(probe), dtype=bool))
    truth = np.array([math.erfc(z / math.sqrt(2)) for z in probe])
    ratio = p / truth
    # Body quantiles: close; far tail (beyond the data mostly): within a factor of ~3.
    assert ratio[:3] == pytest.approx(np.ones(3), rel=0.1), ratio
    assert 1 / 3 < ratio[3] < 3, (p[3], truth[3])
    assert 1 / 5 < ratio[4] < 5, (p[4], truth[4])


def test_not_ready_before_min_events():
    cal = Calibrator(window=1000, refresh=100, min_events=500, tail_quantile=0.95)
    raw = abs_normal(1000, 4)
    p, state = cal.transform(raw[:499])
    np.testing.assert_array_equal(p, np.ones(499))
    cal.commit(state)
    assert not cal.ready
    # The 500th learned event triggers the fit; it applies from the next event on.
    p, state = cal.transform(np.array([raw[499], 10.0]))
    assert p[0] == 1.0
    assert p[1] < 1e-3
    cal.commit(state)
    assert cal.ready


def test_masked_scores_do_not_count_toward_min_events():
    cal = Calibrator(window=1000, refresh=100, min_events=500)
    raw = abs_normal(1000, 5)
    learn = np.zeros(1000, dtype=bool)
    learn[:499] = True
    p, state = cal.transform(raw, learn)
    np.testing.assert_array_equal(p, np.ones(1000))
    assert state.seen == 499
    cal.commit(state)
    assert not cal.ready


SCHEDULES = {
    "ones": [1],
    "sevens": [7],
    "mixed": [1, 99, 100, 3, 250, 1, 1, 64, 1000],
    "whole": [10_000],
}


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(6)
    raw = np.abs(rng.standard_normal(3000)) + (rng.random(3000) < 0.01) * 8
    learn = rng.random(3000) > 0.1
    return raw, learn


def _calibrator() -> Calibrator:
    return Calibrator(window=700, refresh=50, min_events=230, tail_quantile=0.95)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_batch_invariance(stream, schedule, masked):
    raw, learn = stream
    learn = learn if masked else None
    whole = _calibrator()
    p_whole = run_chunks(whole, raw, learn, [len(raw)])
    cal = _calibrator()
    p = run_chunks(cal, raw, learn, SCHEDULES[schedule])
    np.testing.assert_array_equal(p, p_whole)
    assert_same_state(cal, whole)
    assert (p < 0.01).any() and (p == 1.0).any()


@pytest.mark.parametrize("schedule", ["ones", "mixed"])
def test_log_probabilities_are_batch_invariant_and_survive_a_round_trip(stream, schedule):
    """The unfloored log probabilities follow the fit in force like the probabilities do."""
    raw, learn = stream
    raw, learn = raw.copy(), learn.copy()
    raw[::97] += 1e9  # far past the floor of every fit, and not learned
    learn[::97] = False

    def logs(cal: Calibrator, lo: int, hi: int, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        p_out, log_out, start, k = [], [], lo, 0
        while start < hi:
            stop = min(hi, start + sizes[k % len(sizes)])
            p, log_p, state = cal.transform_with_log(raw[start:stop], learn[start:stop])
            cal.commit(state)
            p_out.append(p)
            log_out.append(log_p)
            start, k = stop, k + 1
        return np.concatenate(p_out), np.concatenate(log_out)

    p_whole, log_whole = logs(_calibrator(), 0, len(raw), [len(raw)])
    first = _calibrator()
    p_head, log_head = logs(first, 0, 1234, SCHEDULES[schedule])
    restored = _calibrator()
    restored.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    p_tail, log_tail = logs(restored, 1234, len(raw), SCHEDULES[schedule])
    np.testing.assert_array_equal(np.r_[p_head, p_tail], p_whole)
    np.testing.assert_array_equal(np.r_[log_head, log_tail], log_whole)
    floored = p_whole == MIN_PROBABILITY
    assert floored.sum() > 10 and np.all(log_whole[floored] < math.log(MIN_PROBABILITY))
    np.testing.assert_array_equal(log_whole[~floored], np.log(p_whole[~floored]))
    # transform is transform_with_log without the logs.
    np.testing.assert_array_equal(run_chunks(_calibrator(), raw, learn, [333]), p_whole)


def test_state_round_trip(stream):
    raw, learn = stream
    a = _calibrator()
    run_chunks(a, raw[:1234], learn[:1234], [100])
    assert a.ready
    b = _calibrator()
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert b.ready
    pa = run_chunks(a, raw[1234:], learn[1234:], [77])
    pb = run_chunks(b, raw[1234:], learn[1234:], [77])
    np.testing.assert_array_equal(pa, pb)
    assert_same_state(a, b)


def test_state_round_trip_mismatched_window_raises():
    from stream_detector.errors import StateError

    a = _calibrator()
    b = Calibrator(window=800, refresh=50, min_events=230)
    with pytest.raises(StateError):
        b.load_state_dict(a.state_dict())


def test_pass_through_maps_one_minus_p_back_to_p():
    pt = PassThrough()
    p = np.array([1.0, 0.5, 1e-3, 1e-9, 0.0])
    got, state = pt.transform(1.0 - p)
    np.testing.assert_allclose(got[:4], p[:4], rtol=1e-6)
    assert got[4] == MIN_PROBABILITY
    assert pt.ready
    pt.commit(state)
    pt.load_state_dict(pt.state_dict())


def test_transforming_again_with_another_mask_equals_a_fresh_calibrator(stream):
    """The pipeline transforms a batch once per round: refits cached from an earlier round are
    reused only where the window is unchanged."""
    raw, learn = stream
    cal = _calibrator()
    run_chunks(cal, raw[:1000], learn[:1000], [1000])
    before = copy.deepcopy(cal)
    batch, mask = raw[1000:], learn[1000:]
    flipped_early = mask.copy()
    flipped_early[300] = not flipped_early[300]
    flipped_late = np.r_[mask[:1900], ~mask[1900:]]
    changed_scores = batch.copy()
    changed_scores[1500] += 5.0
    results = []
    for scores, m in [
        (batch, np.ones(len(batch), dtype=bool)),
        (batch, mask),
        (batch, flipped_early),
        (batch, flipped_late),
        (changed_scores, flipped_late),
        (batch, mask),
    ]:
        p, state = cal.transform(scores, m)
        p_ref, state_ref = copy.deepcopy(before).transform(scores, m)
        np.testing.assert_array_equal(p, p_ref)
        assert state.seen == state_ref.seen
        np.testing.assert_array_equal(state.buffer, state_ref.buffer)
        np.testing.assert_array_equal(state.fit.reference, state_ref.fit.reference)
        assert (state.fit.threshold, state.fit.shape, state.fit.scale) == (state_ref.fit.threshold, state_ref.fit.shape, state_ref.fit.scale)
        results.append(p)
    # The masks and scores matter (the comparison above is not vacuous).
    assert not np.array_equal(results[0], results[1]) and not np.array_equal(results[1], results[2])
    assert not np.array_equal(results[3], results[4])


@pytest.mark.parametrize("schedule", ["ones", "mixed", "whole"])
def test_every_refit_uses_the_sorted_window_of_learned_scores(stream, schedule, monkeypatch):
    """Refits slide the last fit's sorted window (not a full sort); the reference must still be
    exactly the sorted last ``window`` learned scores, ties included (rounded scores)."""
    from stream_detector.scoring import calibration_kernel

    slid = []
    original = calibration_kernel.replace_sorted

    def spy(*args):
        ok, out = original(*args)
        slid.append(ok)
        return ok, out

    monkeypatch.setattr(calibration_kernel, "replace_sorted", spy)
    raw, learn = stream
    raw = np.round(raw, 1)  # ties
    cal = _calibrator()
    learned, start, k = [], 0, 0
    sizes = SCHEDULES[schedule]
    while start < len(raw):
        stop = min(len(raw), start + sizes[k % len(sizes)])
        _, state = cal.transform(raw[start:stop], learn[start:stop])
        cal.commit(state)
        learned.extend(raw[start:stop][learn[start:stop]])
        if state.fit_seen >= 0:
            window = np.array(learned[: state.fit_seen][-cal.window :])
            np.testing.assert_array_equal(state.fit.reference, np.sort(window))
        start, k = stop, k + 1
    first_fit = -(-cal.min_events // cal.refresh) * cal.refresh  # sorted in full; later ones slide
    refits = len(range(first_fit + cal.refresh, len(learned) + 1, cal.refresh))
    assert refits > 20 and len(slid) == refits and all(slid)


def _format_1(cal: Calibrator) -> dict:
    """The calibrator's state as format 1 wrote it: a ring of ``window`` scores (score ``s`` at
    ``s % window``) and the fit's sorted window in full."""
    state = cal.state_dict()
    seen, ring = state["seen"], state["buffer"]
    old = np.zeros(cal.window)
    numbers = np.arange(max(0, seen - cal.window), seen)
    old[numbers % cal.window] = ring[numbers % len(ring)]
    return {"version": 1, "window": state["window"], "buffer": old, "seen": seen, "fit_reference": cal._state.fit.reference.copy() if cal.ready else None}


@pytest.mark.parametrize("stop", [150, 700, 1234, 2600])
def test_state_stores_the_fit_position_not_the_whole_fit_window(stream, stop):
    """The ring holds the window plus the scores that left it since the last refit, so the
    fit's window is still in it: a snapshot holds the fit's position instead of its sorted
    window, and a restore (of this or of format 1) continues exactly, sliding its next refits
    as before."""
    raw, learn = stream
    a = _calibrator()
    run_chunks(a, raw[:stop], learn[:stop], [61])
    state = a.state_dict()
    assert state["fit_reference"] is None and len(state["buffer"]) == a.window + a.refresh
    if a.ready:
        assert state["fit_seen"] == a._state.fit_seen
    tail = run_chunks(copy.deepcopy(a), raw[stop:], learn[stop:], [77])
    for saved in (state, _format_1(a)):
        b = _calibrator()
        b.load_state_dict(pickle.loads(pickle.dumps(saved)))
        assert b.ready == a.ready
        np.testing.assert_array_equal(b._state.fit.reference, a._state.fit.reference)
        np.testing.assert_array_equal(run_chunks(b, raw[stop:], learn[stop:], [77]), tail)


def test_a_state_restores_into_a_calibrator_with_another_refresh(stream):
    """The ring is re-laid for the new capacity; the fit in force is the same."""
    raw, learn = stream
    a = _calibrator()
    run_chunks(a, raw[:2000], learn[:2000], [100])
    for refresh in (20, 50, 130):
        b = Calibrator(window=a.window, refresh=refresh, min_events=a.min_events, tail_quantile=a.tail_quantile)
        b.load_state_dict(a.state_dict())
        np.testing.assert_array_equal(b._state.fit.reference, a._state.fit.reference)
        window = np.arange(max(0, a._state.seen - a.window), a._state.seen)
        np.testing.assert_array_equal(b._state.buffer[window % b.capacity], a._state.buffer[window % a.capacity])
        run_chunks(b, raw[2000:], learn[2000:], [77])  # and goes on


def test_a_corrupt_fit_position_is_refused(stream):
    from stream_detector.errors import StateError

    raw, learn = stream
    a = _calibrator()
    run_chunks(a, raw[:2000], learn[:2000], [100])
    state = a.state_dict()
    b = _calibrator()
    with pytest.raises(StateError, match="fit at"):
        b.load_state_dict({**state, "fit_seen": state["seen"] + 1})  # after the last score
    with pytest.raises(StateError, match="fit at"):  # its window has left the ring
        b.load_state_dict({**state, "fit_seen": state["seen"] - a.refresh - 1})
    with pytest.raises(StateError, match="buffer"):
        b.load_state_dict({**state, "buffer": state["buffer"][: a.window - 1]})
