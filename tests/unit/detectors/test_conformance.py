"""One conformance suite over every point detector (River's ``check_estimator`` is the model).

Each detector the factory can build runs through the same checks of the contract written in
``stream_detector/detectors/base.py``:

- scoring a stream in batches gives the scores of scoring it one event at a time;
- ``score`` changes nothing: scoring the same batch twice gives the same scores;
- a masked event is not learned: learning a batch under a mask equals learning the batch
  without the masked events;
- state is plain data: it survives a ``state_dict`` / ``load_state_dict`` round trip through
  the state encoding (``state/codec.py``, which holds no objects), and a snapshot of another
  version is refused with ``StateError``;
- an empty batch scores to nothing and changes nothing; an event with missing features is
  scored without error;
- keyed state written as checkpoints write it (a base plus only the shards changed since the
  previous checkpoint, ``KeyedState``) restores to the same detector, and ``shrink`` frees
  about the bytes asked for;
- recovery after a lasting shift: a detector with per-key baselines re-learns a key from its
  new level (``relearn``) and ``restore_rows`` undoes it; a population model learns it.

A new detector is added to ``DETECTORS`` below; its own test file covers what is specific to it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import orjson
import pytest

from stream_detector.config import load_settings
from stream_detector.detectors.base import Detector
from stream_detector.errors import StateError
from stream_detector.events.decode import decode_batch
from stream_detector.features import FeatureBatch
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.scoring.factory import build_autoencoder, event_schema
from stream_detector.state import codec, shards


def _zscore() -> Detector:
    from stream_detector.detectors.zscore import ZScoreDetector

    return ZScoreDetector(
        features=("log_amount", "log_unit_price"),
        key_sets=("store_id",),
        key_set_features={"store_id": ("log_amount", "log_unit_price")},
        warmup=5,
    )


def _duplicates() -> Detector:
    from stream_detector.detectors.duplicates import DuplicateDetector

    return DuplicateDetector(window_seconds=3600.0, max_entries=10_000)


def _hst() -> Detector:
    from stream_detector.detectors.hst import HalfSpaceTreesDetector

    return HalfSpaceTreesDetector(features=("log_amount", "log_quantity", "log_unit_price"), seed=7, n_trees=5, height=6, window_size=50)


def _river_loda() -> Detector:
    from stream_detector.detectors.river_model import RiverModelDetector

    # Signed: without a key a River model's state is not saved (detectors/river_model.py).
    return RiverModelDetector(model="LODA", features=("log_amount", "log_quantity", "log_unit_price"), seed=7, signing_key=b"conformance-test-key")


def _autoencoder() -> Detector:
    settings = load_settings(None, environ={})
    overrides = {"warmup_events": 64, "train_batch_size": 32, "device": "cpu", "seed": 7}
    settings = settings.model_copy(update={"autoencoder": settings.autoencoder.model_copy(update=overrides)})
    return build_autoencoder(settings)


DETECTORS: dict[str, Callable[[], Detector]] = {
    "zscore": _zscore,
    "duplicates": _duplicates,
    "hst": _hst,
    "river_loda": _river_loda,
    "autoencoder": _autoencoder,
}
N_EVENTS = 600
RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def stream() -> FeatureBatch:
    """A generated sales stream with anomalies and duplicates, decoded into features."""
    settings = load_settings(None, environ={})
    generator = SalesGenerator(GeneratorConfig(seed=3, anomaly_rate=0.05))
    values = [orjson.dumps(event) for event, _label in generator.generate(N_EVENTS)]
    decoded = decode_batch(values, event_schema(settings))
    assert decoded.features.n == N_EVENTS
    return decoded.features


@pytest.fixture(params=sorted(DETECTORS))
def make(request: pytest.FixtureRequest) -> Callable[[], Detector]:
    return DETECTORS[request.param]


def _scores_in_chunks(detector: Detector, batch: FeatureBatch, sizes: list[int], learn: np.ndarray | None = None) -> np.ndarray:
    learn = np.ones(batch.n, dtype=bool) if learn is None else learn
    out, start, i = [], 0, 0
    while start < batch.n:
        stop = min(batch.n, start + sizes[i % len(sizes)])
        step = detector.score(batch.slice(start, stop), learn[start:stop])
        detector.commit(step)
        out.append(step.scores)
        start, i = stop, i + 1
    return np.concatenate(out)


def _every_other_tenth_masked(n: int) -> np.ndarray:
    learn = np.ones(n, dtype=bool)
    learn[::10] = False
    return learn


def test_batch_equals_one_by_one(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    learn = _every_other_tenth_masked(stream.n)
    one_by_one = _scores_in_chunks(make(), stream, [1], learn)
    batched = _scores_in_chunks(make(), stream, [97, 250, 3, 250], learn)
    np.testing.assert_allclose(batched, one_by_one, rtol=RTOL, atol=ATOL)
    # The stream must exercise the detector: scores that never vary would make every check here pass.
    assert np.ptp(one_by_one[np.isfinite(one_by_one)]) > 0


def test_score_adapting_batch_equals_one_by_one_and_without_adapting_keys_is_score(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    """``score_adapting`` (the pipeline's call while a key adapts to a level shift) keeps the
    sequential semantics; with no adapting key it is ``score``."""
    learn = _every_other_tenth_masked(stream.n)
    stores = stream.keys["store_id"].astype(str)
    # The busiest store shifted its quantities (and so its amounts).
    adapting = dict.fromkeys([("store_id", "log_quantity"), ("store_id", "log_amount")], stores == np.unique(stores)[0])

    def chunks(detector: Detector, sizes: list[int], marks: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
        out, start, i = [], 0, 0
        while start < stream.n:
            stop = min(stream.n, start + sizes[i % len(sizes)])
            step = detector.score_adapting(stream.slice(start, stop), learn[start:stop], {ks: m[start:stop] for ks, m in marks.items()})
            detector.commit(step)
            out.append(step.scores)
            start, i = stop, i + 1
        return np.concatenate(out)

    np.testing.assert_array_equal(chunks(make(), [250], {}), _scores_in_chunks(make(), stream, [250], learn))
    if type(make()).score_adapting is Detector.score_adapting:
        return  # it is ``score``, whose sequential semantics test_batch_equals_one_by_one checks
    one_by_one = chunks(make(), [1], adapting)
    np.testing.assert_allclose(chunks(make(), [97, 250, 3, 250], adapting), one_by_one, rtol=RTOL, atol=ATOL)
    assert not np.allclose(one_by_one, _scores_in_chunks(make(), stream, [250], learn))  # adapting changed what was learned


def test_score_changes_nothing(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 400), [200])
    before = codec.encode(detector.state_dict())
    rest = stream.slice(400, stream.n)
    learn = np.ones(rest.n, dtype=bool)
    first = detector.score(rest, learn).scores
    second = detector.score(rest, learn).scores
    np.testing.assert_array_equal(first, second)
    assert codec.encode(detector.state_dict()) == before


def test_masked_events_are_not_learned(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    head, tail = stream.slice(0, 400), stream.slice(400, stream.n)
    learn = _every_other_tenth_masked(head.n)
    masked, filtered = make(), make()
    _scores_in_chunks(masked, head, [100], learn)
    kept = np.flatnonzero(learn)
    filtered.commit(filtered.score(_take(head, kept), np.ones(kept.size, dtype=bool)))
    all_of_tail = np.ones(tail.n, dtype=bool)
    np.testing.assert_allclose(masked.score(tail, all_of_tail).scores, filtered.score(tail, all_of_tail).scores, rtol=RTOL, atol=ATOL)


def test_state_round_trip_continues_identically(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    original = make()
    _scores_in_chunks(original, stream.slice(0, 400), [128])
    restored = make()
    restored.load_state_dict(codec.decode(codec.encode(original.state_dict())))
    rest = stream.slice(400, stream.n)
    np.testing.assert_allclose(_scores_in_chunks(restored, rest, [50]), _scores_in_chunks(original, rest, [50]), rtol=RTOL, atol=ATOL)


def test_state_from_changed_shards_continues_identically(make: Callable[[], Detector], stream: FeatureBatch, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the changelog holds after several checkpoints (the newest copy of every shard,
    each written only when it changed) restores the detector: a change that is not marked
    leaves a stale shard, and the scores after the restore differ."""
    monkeypatch.setattr(shards, "SHARD_SLOTS", 4)  # many shards from the stream's few keys
    original = make()
    latest: dict = {}
    for start in range(0, 400, 80):
        _scores_in_chunks(original, stream.slice(start, start + 80), [80])
        latest.update(codec.decode(codec.encode(original.state_shards(changed_only=True))))
    base = codec.decode(codec.encode(original.base_state_dict()))
    restored = make()
    restored.load_state_dict(restored.merge_shards(base, latest))
    rest = stream.slice(400, stream.n)
    np.testing.assert_allclose(_scores_in_chunks(restored, rest, [50]), _scores_in_chunks(original, rest, [50]), rtol=RTOL, atol=ATOL)


def test_shrink_frees_about_the_bytes_asked_for(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 400), [100])
    held = detector.state_bytes()
    forgotten = detector.shrink(held // 2)
    assert (forgotten > 0) == (held > 0)
    assert detector.state_bytes() <= held - 0.3 * held  # allocated rows stay: not all of it
    scores = _scores_in_chunks(detector, stream.slice(400, stream.n), [50])  # and it goes on
    assert scores.shape == (stream.n - 400,)


def test_foreign_state_version_is_refused(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 100), [100])
    state = detector.state_dict()
    assert "version" in state
    with pytest.raises(StateError):
        make().load_state_dict({**state, "version": 999})


def test_empty_batch_scores_nothing_and_changes_nothing(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 200), [200])
    before = codec.encode(detector.state_dict())
    step = detector.score(stream.slice(0, 0), np.ones(0, dtype=bool))
    assert step.scores.shape == (0,)
    detector.commit(step)
    assert codec.encode(detector.state_dict()) == before


def test_missing_features_are_scored(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 300), [300])
    rest = stream.slice(300, 340)
    holes = {name: column.copy() for name, column in rest.columns.items()}
    for column in holes.values():
        column[::3] = np.nan
    batch = FeatureBatch(rest.event_time, holes, rest.keys, rest.event_ids, rest.fingerprints)
    scores = detector.score(batch, np.ones(batch.n, dtype=bool)).scores
    assert scores.shape == (batch.n,)
    assert not np.isinf(scores).any()


def _take(batch: FeatureBatch, rows: np.ndarray) -> FeatureBatch:
    return FeatureBatch(
        event_time=batch.event_time[rows],
        columns={k: v[rows] for k, v in batch.columns.items()},
        keys={k: v[rows] for k, v in batch.keys.items()},
        event_ids=batch.event_ids[rows],
        fingerprints=batch.fingerprints[rows] if batch.fingerprints.size else batch.fingerprints,
    )


def _shifted(batch: FeatureBatch, factor: float) -> tuple[FeatureBatch, np.ndarray]:
    """``batch`` with the busiest store selling ``factor`` times the quantities at the same
    prices (a lasting change of its level), and which events are that store's."""
    keys = batch.keys["store_id"]
    names, counts = np.unique(keys.astype(str), return_counts=True)
    mine = keys == names[counts.argmax()]
    columns = {name: column.copy() for name, column in batch.columns.items()}
    for name in ("amount", "quantity"):
        columns[name][mine] *= factor
        columns[f"log_{name}"][mine] = np.sign(columns[name][mine]) * np.log1p(np.abs(columns[name][mine]))
    return FeatureBatch(batch.event_time, columns, batch.keys, batch.event_ids, batch.fingerprints), mine


def test_recovery_after_a_lasting_shift(make: Callable[[], Detector], stream: FeatureBatch) -> None:
    """A store sells 100x the quantities for good. A detector with per-key baselines re-learns the key
    from the new level when told (``relearn``: the pipeline does at a declared level shift) and
    ``restore_rows`` undoes exactly that; one without (population models) recovers by learning
    the new events, which the pipeline lets it do while the key adapts (scoring/level_shift.py)."""
    detector = make()
    _scores_in_chunks(detector, stream.slice(0, 300), [300])
    shifted, mine = _shifted(stream.slice(300, stream.n), 100.0)
    before = codec.encode(detector.state_dict())
    level = shifted.matrix(["log_amount", "log_unit_price"])[mine]
    relearned = detector.relearn(
        "store_id", str(shifted.keys["store_id"][mine][0]), np.nanmedian(level, axis=0), np.nanvar(level, axis=0), float(shifted.event_time[0])
    )
    if relearned is None:  # no per-key baseline: nothing moved
        assert codec.encode(detector.state_dict()) == before
        if not detector.population:
            return  # e.g. exact duplicates: a level is nothing to them
        scores = _scores_in_chunks(detector, shifted, [50])[mine]
        assert scores[-20:].mean() < scores[:20].mean()  # learned the new level
        return
    old, new, undo = relearned
    assert (new > old).any()
    frozen = np.zeros(shifted.n, dtype=bool)  # scored against the baseline as it is, learning nothing
    at_new_level = detector.score(shifted, frozen).scores[mine]
    detector.restore_rows("store_id", str(shifted.keys["store_id"][mine][0]), undo)
    assert codec.encode(detector.state_dict()) == before
    at_old_level = detector.score(shifted, frozen).scores[mine]
    assert np.median(at_new_level) + 1 < np.median(at_old_level)
