"""DuplicateDetector: exact re-sent copies (new event_id, every other field equal)."""

from __future__ import annotations

import pickle

import numpy as np
import orjson
import pytest

from stream_detector.detectors.duplicates import DuplicateDetector
from stream_detector.events.decode import EventSchema, decode_batch
from stream_detector.features import FeatureBatch

SCHEMA = EventSchema()
PROB = 1e-9


def sale(i: int, **over) -> dict:
    event = {
        "event_id": f"e-{i}",
        "timestamp": f"2026-01-05T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
        "store_id": f"s-{i % 3}",
        "product_id": f"p-{i % 7}",
        "quantity": 1 + i % 4,
        "unit_price": 2.5 + i,
        "amount": (1 + i % 4) * (2.5 + i),
        "currency": "USD",
        "channel": "store",
        "customer_id": f"c-{i}",
    }
    event.update(over)
    return event


def decode(events: list[dict]) -> FeatureBatch:
    decoded = decode_batch([orjson.dumps(e) for e in events], SCHEMA)
    assert not decoded.invalid
    return decoded.features


def manual_batch(prints: list[int], times: list[float]) -> FeatureBatch:
    n = len(prints)
    return FeatureBatch(
        event_time=np.asarray(times, dtype=float),
        columns={},
        keys={},
        event_ids=np.array([f"x{i}" for i in range(n)], dtype=object),
        fingerprints=np.asarray(prints, dtype=np.uint64),
    )


def run_chunks(det: DuplicateDetector, batch: FeatureBatch, learn: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, start, k = [], 0, 0
    while start < batch.n:
        stop = min(batch.n, start + sizes[k % len(sizes)])
        step = det.score(batch.slice(start, stop), learn[start:stop])
        det.commit(step)
        out.append(step.scores)
        start, k = stop, k + 1
    return np.concatenate(out) if out else np.zeros(0)


def test_exact_copy_with_new_id_is_flagged_original_is_not():
    events = [sale(i) for i in range(5)]
    copy = dict(events[2], event_id="e-retry")
    batch = decode([*events, copy])
    det = DuplicateDetector(probability=PROB)
    step = det.score(batch, np.ones(batch.n, dtype=bool))
    assert step.scores.tolist() == [0.0] * 5 + [1.0 - PROB]
    assert det.explain(batch, step, 5).reasons and "duplicate" in det.explain(batch, step, 5).reasons[0]
    assert det.explain(batch, step, 2).reasons == []
    det.commit(step)
    # Across batches too.
    again = decode([dict(events[0], event_id="e-again")])
    assert det.score(again, np.ones(1, dtype=bool)).scores.tolist() == [1.0 - PROB]


def test_same_event_id_but_different_field_is_not_a_duplicate():
    base = sale(1)
    batch = decode([base, dict(base, event_id="e-x", amount=base["amount"] + 0.01), dict(base, event_id="e-y", channel="online")])
    det = DuplicateDetector()
    assert det.score(batch, np.ones(3, dtype=bool)).scores.tolist() == [0.0, 0.0, 0.0]


def test_copy_outside_window_is_not_flagged():
    det = DuplicateDetector(window_seconds=100.0, probability=PROB)
    batch = manual_batch([7, 7, 7, 8], [0.0, 100.0, 250.0, 260.0])
    step = det.score(batch, np.ones(4, dtype=bool))
    # 100 s after the first: inside (<=); 150 s after the second learned copy: outside.
    assert step.scores.tolist() == [0.0, 1.0 - PROB, 0.0, 0.0]
    # Across commits: the entry expires from memory once the window has passed.
    det2 = DuplicateDetector(window_seconds=100.0)
    det2.learn_one_batch(manual_batch([1], [0.0]))
    det2.learn_one_batch(manual_batch([2], [500.0]))
    assert det2.score(manual_batch([1], [501.0]), np.ones(1, dtype=bool)).scores.tolist() == [0.0]


def test_masked_events_are_not_remembered():
    det = DuplicateDetector(probability=PROB)
    batch = manual_batch([1, 1, 2, 2], [0.0, 1.0, 2.0, 3.0])
    learn = np.array([False, True, True, True])
    step = det.score(batch, learn)
    # The first 1 was not learned, so the second is not its duplicate; 2 is learned, its copy is.
    assert step.scores.tolist() == [0.0, 0.0, 0.0, 1.0 - PROB]
    det.commit(step)
    det2 = DuplicateDetector()
    det2.learn_one_batch(manual_batch([5], [0.0]), np.array([False]))
    assert det2.score(manual_batch([5], [1.0]), np.ones(1, dtype=bool)).scores.tolist() == [0.0]
    assert len(det2.state_dict()["fingerprints"]) == 0


def _stream(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    prints = rng.integers(0, 60, n).astype(np.uint64)  # many repeats
    times = np.cumsum(rng.exponential(20.0, n))  # in order, ~20 s apart
    learn = rng.random(n) > 0.2
    return manual_batch(prints.tolist(), times.tolist()), learn


@pytest.mark.parametrize("sizes", [[1], [7], [1, 50, 3, 200], [400]])
def test_batch_equals_one_by_one(sizes):
    batch, learn = _stream(3)
    one = run_chunks(DuplicateDetector(window_seconds=600.0), batch, learn, [1])
    got = run_chunks(DuplicateDetector(window_seconds=600.0), batch, learn, sizes)
    np.testing.assert_array_equal(got, one)
    assert 0 < (one > 0).sum() < batch.n


def test_batch_equals_one_by_one_with_late_copy():
    """Event time is not monotone on a real topic (several producers, a POS that was offline).

    A re-sent copy of an old sale arriving after a newer sale: whether it is flagged must not
    depend on where the batch boundaries fall (the detector contract).
    """
    window = 3600.0
    # Sale A at t=0, an unrelated sale B at t=5000 (more than a window later), then A's copy
    # (same fingerprint, hence same timestamp t=0).
    batch = manual_batch([1, 2, 1], [0.0, 5000.0, 0.0])
    learn = np.ones(3, dtype=bool)
    one = run_chunks(DuplicateDetector(window_seconds=window), batch, learn, [1])
    whole = run_chunks(DuplicateDetector(window_seconds=window), batch, learn, [3])
    np.testing.assert_array_equal(whole, one)


def test_max_entries_caps_memory_at_each_commit():
    """The cap is a memory bound applied per committed batch (documented as batch-granular)."""
    batch = manual_batch([1, 2, 3, 1], [0.0, 1.0, 2.0, 3.0])
    learn = np.ones(4, dtype=bool)
    det = DuplicateDetector(max_entries=2)
    one = run_chunks(det, batch, learn, [1])
    assert len(det.state_dict()["fingerprints"]) == 2
    assert not one[3], "fingerprint 1 was evicted by the cap before its copy arrived"


def test_state_round_trip():
    batch, learn = _stream(4)
    det = DuplicateDetector(window_seconds=600.0)
    run_chunks(det, batch.slice(0, 200), learn[:200], [50])
    fresh = DuplicateDetector(window_seconds=600.0)
    fresh.load_state_dict(pickle.loads(pickle.dumps(det.state_dict())))
    a = run_chunks(det, batch.slice(200, 400), learn[200:], [30])
    b = run_chunks(fresh, batch.slice(200, 400), learn[200:], [30])
    np.testing.assert_array_equal(a, b)
    assert (a > 0).any()
    sa, sb = det.state_dict(), fresh.state_dict()
    np.testing.assert_array_equal(sa["fingerprints"], sb["fingerprints"])
    np.testing.assert_array_equal(sa["times"], sb["times"])


def _reference_run(window: float, max_entries: int, prints: list[int], times: list[float], learn: list[bool], sizes: list[int]):
    """The detector's definition, one event at a time with plain dicts (what score/commit must
    compute on arrays): scores, first-seen times and the remembered entries in order."""
    from collections import OrderedDict

    seen: OrderedDict[int, float] = OrderedDict()
    newest = -np.inf
    scores, first = [], []
    start, k = 0, 0
    while start < len(prints):
        stop = min(len(prints), start + sizes[k % len(sizes)])
        in_batch: dict[int, float] = {}  # learned in this batch: first-learned order, last time
        for fp, t, ok in zip(prints[start:stop], times[start:stop], learn[start:stop], strict=True):
            earlier = in_batch.get(fp, seen.get(fp))
            dup = earlier is not None and t - earlier <= window and earlier >= newest - window
            scores.append(1.0 - PROB if dup else 0.0)
            first.append(earlier if dup else np.nan)
            if ok:
                in_batch[fp] = t
                newest = max(newest, t)
        for fp, t in in_batch.items():  # commit: re-learned fingerprints move to the back
            seen.pop(fp, None)
            seen[fp] = t
        horizon = newest - window  # expiry and the cap apply per committed batch
        while seen and (len(seen) > max_entries or next(iter(seen.values())) < horizon):
            seen.popitem(last=False)
        start, k = stop, k + 1
    return np.array(scores), np.array(first), list(seen.items())


@pytest.mark.parametrize("seed", range(6))
def test_array_scoring_equals_the_event_by_event_definition(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    prints = rng.integers(0, 300, n).tolist()  # many repeats
    times = (np.cumsum(rng.exponential(5.0, n)) - (rng.random(n) < 0.1) * rng.exponential(400.0, n)).tolist()
    learn = (rng.random(n) > 0.2).tolist()
    window = float(rng.choice([50.0, 600.0, 3600.0]))
    max_entries = int(rng.choice([20, 150, 10_000]))
    sizes = [int(s) for s in rng.choice([1, 2, 17, 500, 3000], size=3)]
    scores, first, entries = _reference_run(window, max_entries, prints, times, learn, sizes)
    det = DuplicateDetector(window_seconds=window, max_entries=max_entries, probability=PROB)
    batch = manual_batch(prints, times)
    got, got_first, start, k = [], [], 0, 0
    while start < n:
        stop = min(n, start + sizes[k % len(sizes)])
        step = det.score(batch.slice(start, stop), np.asarray(learn[start:stop]))
        det.commit(step)
        got.append(step.scores)
        got_first.append(step.details["first_seen"])
        start, k = stop, k + 1
    np.testing.assert_array_equal(np.concatenate(got), scores)
    np.testing.assert_array_equal(np.concatenate(got_first), first)
    state = det.state_dict()  # the remembered fingerprints and times, oldest first
    assert list(zip(state["fingerprints"].tolist(), state["times"].tolist(), strict=True)) == entries
    assert 0 < (scores > 0).sum() < n


def test_batch_without_fingerprints_scores_zero_and_learns_nothing():
    det = DuplicateDetector()
    det.learn_one_batch(manual_batch([1, 2], [10.0, 20.0]))
    bare = FeatureBatch(event_time=np.array([30.0, 40.0]), columns={}, keys={})
    assert det.learn_one_batch(bare).tolist() == [0.0, 0.0]
    assert det.state_dict()["fingerprints"].tolist() == [1, 2] and det.state_dict()["newest"] == 20.0
    # A restore between rounds must not reuse lookups made against the old memory.
    batch = manual_batch([1, 3], [50.0, 60.0])
    assert det.score(batch, np.ones(2, dtype=bool)).scores[0] > 0
    det.load_state_dict(DuplicateDetector().state_dict())
    assert det.score(batch, np.ones(2, dtype=bool)).scores.tolist() == [0.0, 0.0]
