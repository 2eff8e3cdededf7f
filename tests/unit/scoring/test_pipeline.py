"""The default scoring pipeline on a realistic stream: batching must not change the answer.

Every detector and calibrator is sequential in meaning (see ``detectors/base.py`` and
``scoring/pipeline.py``), so processing a stream in batches of 2000, of 257, or one event at a
time must give the same fused scores and the same decisions. Small calibration and warm-up
settings keep it fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pytest
import yaml

from stream_detector.config import load_settings
from stream_detector.events.decode import decode_batch
from stream_detector.features import FeatureBatch
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.scoring.calibration import MIN_PROBABILITY
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline
from stream_detector.state import codec

# Enough for the calibrators to become ready (500 events) and for several refreshes and HST
# windows and autoencoder trainings after that; 6000 would be closer to a production warm-up but
# the batch-of-2000 run needs up to max_rounds fixed-point rounds per batch and the file must
# stay under ~20 s.
N_EVENTS = 4000
N_ONE_BY_ONE = 1000
SNAPSHOT_AFTER_BATCHES = 8  # of 257 events
RTOL, ATOL = 1e-6, 1e-9

SMALL = {
    "scoring": {"calibration_window": 2000, "calibration_min_events": 500, "calibration_refresh": 100},
    "autoencoder": {"warmup_events": 256, "train_batch_size": 64, "device": "cpu"},
    "river": {"params": {"n_trees": 25, "height": 10, "window_size": 100}},
}


@dataclass
class Run:
    pipeline: ScoringPipeline
    results: list[BatchResult]
    starts: list[int]
    fused: np.ndarray
    is_anomaly: np.ndarray
    learned: np.ndarray  # not flagged and not rejected by any detector
    reasons: dict[int, list[str]]
    snapshot: bytes | None


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return load_settings(path, environ={})


@pytest.fixture(scope="module")
def stream(settings) -> FeatureBatch:
    events = [event for event, _ in SalesGenerator(GeneratorConfig(seed=3, anomaly_rate=0.02)).generate(N_EVENTS)]
    values = [orjson.dumps(e) for e in events]
    # Decode in batches, as the daemon does; concatenating must equal decoding all at once.
    schema = event_schema(settings)
    whole = decode_batch(values, schema)
    assert not whole.invalid and whole.features.n == N_EVENTS
    parts = [decode_batch(values[a : a + 999], schema).features for a in range(0, N_EVENTS, 999)]
    for name, col in whole.features.columns.items():
        np.testing.assert_array_equal(np.concatenate([p.columns[name] for p in parts]), col)
    np.testing.assert_array_equal(np.concatenate([p.fingerprints for p in parts]), whole.features.fingerprints)
    return whole.features


def process(settings, stream: FeatureBatch, size: int, n: int, snapshot_after: int | None = None, pipeline=None, start: int = 0) -> Run:
    pipeline = pipeline or build_pipeline(settings)
    results, starts, learned, reasons = [], [], [], {}
    snapshot = None
    for b, a in enumerate(range(start, n, size)):
        if snapshot_after is not None and b == snapshot_after:
            snapshot = codec.encode(pipeline.state_dict())
        result = pipeline.process(stream.slice(a, min(n, a + size)))
        results.append(result)
        starts.append(a)
        rejected = np.concatenate(
            [np.any([s.reject if s.reject is not None else np.zeros(seg.batch.n, bool) for s in seg.steps.values()], axis=0) for seg in result.segments]
        )
        learned.append(~result.is_anomaly & ~rejected)
        for i in np.flatnonzero(result.is_anomaly).tolist():
            reasons[a + i] = pipeline.explain(result, i)[1]
    return Run(
        pipeline,
        results,
        starts,
        np.concatenate([r.fused for r in results]),
        np.concatenate([r.is_anomaly for r in results]),
        np.concatenate(learned),
        reasons,
        snapshot,
    )


@pytest.fixture(scope="module")
def run_2000(settings, stream) -> Run:
    return process(settings, stream, 2000, N_EVENTS)


@pytest.fixture(scope="module")
def run_257(settings, stream) -> Run:
    return process(settings, stream, 257, N_EVENTS, snapshot_after=SNAPSHOT_AFTER_BATCHES)


@pytest.fixture(scope="module")
def run_ones(settings, stream) -> Run:
    return process(settings, stream, 1, N_ONE_BY_ONE)


def test_fused_in_unit_interval_and_flagged_iff_above_threshold(run_2000):
    fused = run_2000.fused
    assert fused.shape == (N_EVENTS,)
    assert np.all((fused >= 0) & (fused <= 1))
    np.testing.assert_array_equal(run_2000.is_anomaly, fused > run_2000.pipeline.threshold)
    # The stream has injected anomalies and the calibrators become ready: some flags, not many.
    assert 0 < run_2000.is_anomaly.sum() < 0.1 * N_EVENTS
    for result in run_2000.results:
        for p in result.probability.values():
            assert np.all((p > 0) & (p <= 1))


def test_batches_of_2000_and_257_same_decisions(run_2000, run_257):
    np.testing.assert_array_equal(run_257.is_anomaly, run_2000.is_anomaly)


def test_batches_of_2000_and_257_same_fused_scores(run_2000, run_257):
    np.testing.assert_allclose(run_257.fused, run_2000.fused, rtol=RTOL, atol=ATOL)


def test_one_by_one_equals_batches(run_ones, run_2000, run_257):
    n = N_ONE_BY_ONE
    assert run_ones.is_anomaly.sum() > 0, "the one-by-one prefix should already contain flags"
    for other in (run_2000, run_257):
        np.testing.assert_array_equal(run_ones.is_anomaly, other.is_anomaly[:n])
        np.testing.assert_allclose(run_ones.fused, other.fused[:n], rtol=RTOL, atol=ATOL)


def surprise_of(run: Run) -> np.ndarray:
    return np.concatenate([r.surprise for r in run.results])


def test_surprise_is_batch_invariant(run_ones, run_2000, run_257):
    np.testing.assert_allclose(surprise_of(run_257), surprise_of(run_2000), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(surprise_of(run_ones), surprise_of(run_2000)[:N_ONE_BY_ONE], rtol=RTOL, atol=ATOL)


def test_surprise_is_ordered_like_the_fused_score_and_breaks_its_ties(run_2000):
    fused, surprise = run_2000.fused, surprise_of(run_2000)
    assert surprise.shape == fused.shape and np.all(surprise >= 0) and np.all(np.isfinite(surprise))
    order = np.lexsort((surprise, fused))
    assert np.all(np.diff(surprise[order]) >= 0), "an event with a higher fused score has a lower surprise"
    # Where no detector's probability is floored it is -log10(1 - fused) computed without the
    # rounding of 1 - fused: -log10(min(1, k * min_d p_d)).
    # Exact duplicates (whose evidence multiplies the others', scoring/fusion.py) aside.
    k = len(run_2000.pipeline.detectors)
    p_min = np.concatenate([np.min(np.vstack(list(r.probability.values())), axis=0) for r in run_2000.results])
    duplicate = np.concatenate([r.fired()["duplicates"] for r in run_2000.results])
    exact = (p_min > MIN_PROBABILITY) & ~duplicate
    np.testing.assert_allclose(surprise[exact], -np.log10(np.minimum(1.0, k * p_min[exact])), rtol=1e-9, atol=1e-12)
    # The alerts that share the top fused score (a floored probability) are told apart, and so
    # are the duplicates, whose detector gives each the same probability.
    top = run_2000.is_anomaly & (fused == fused.max())
    assert top.sum() >= 5 and np.unique(surprise[top]).size > 0.8 * top.sum()
    assert duplicate.sum() >= 5 and np.unique(surprise[duplicate]).size == duplicate.sum()
    # Each event's surprise is its largest detector surprise (a duplicate's more), and
    # detectors that fired pass the surprise of the threshold.
    for result in run_2000.results:
        each = np.vstack(list(result.detector_surprise.values())).max(axis=0)
        dup = result.fired()["duplicates"]
        np.testing.assert_array_equal(result.surprise[~dup], each[~dup])
        assert np.all(result.surprise[dup] >= each[dup])
        for name, fired in result.fired().items():
            assert np.all(result.detector_surprise[name][fired] >= -np.log10(1.0 - result.threshold) - 1e-9)


def test_flagged_and_rejected_events_are_not_learned(run_2000, stream):
    zscore = run_2000.pipeline.detectors[run_2000.pipeline.detector_names.index("zscore")]
    state = zscore.state_dict()
    learned = run_2000.learned
    assert (~learned).sum() >= run_2000.is_anomaly.sum()
    assert not learned[run_2000.is_anomaly].any()
    for j, feature in enumerate(zscore.features):
        present = ~np.isnan(stream.column(feature))
        assert state["global"]["count"][0, j] == np.sum(present & learned), feature
    # The duplicates detector remembers only learned fingerprints.
    dup = run_2000.pipeline.detectors[run_2000.pipeline.detector_names.index("duplicates")]
    remembered = set(dup.state_dict()["fingerprints"].tolist())
    flagged_only = set(stream.fingerprints[~learned].tolist()) - set(stream.fingerprints[learned].tolist())
    assert not (remembered & flagged_only)


def test_state_round_trip_continues_identically(settings, stream, run_257):
    assert run_257.snapshot is not None
    restored = build_pipeline(settings)
    assert restored.load_state_dict(codec.decode(run_257.snapshot)) == []  # every part restored
    start = SNAPSHOT_AFTER_BATCHES * 257
    cont = process(settings, stream, 257, N_EVENTS, pipeline=restored, start=start)
    np.testing.assert_array_equal(cont.is_anomaly, run_257.is_anomaly[start:])
    np.testing.assert_allclose(cont.fused, run_257.fused[start:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(surprise_of(cont), surprise_of(run_257)[start:], rtol=1e-12, atol=1e-12)


def test_explain_gives_reasons_for_every_flagged_event(run_2000):
    flagged = np.flatnonzero(run_2000.is_anomaly).tolist()
    assert flagged
    assert set(run_2000.reasons) == set(flagged)
    for i in flagged:
        reasons = run_2000.reasons[i]
        assert reasons, f"event {i} flagged without a reason"
        assert all(isinstance(r, str) and r for r in reasons)
    # Details cover every detector, for a flagged and an unflagged event.
    result = run_2000.results[-1]
    i = int(np.flatnonzero(result.is_anomaly)[0])
    details, reasons = run_2000.pipeline.explain(result, i)
    assert set(details) == set(run_2000.pipeline.detector_names)
    assert any(d["fired"] for d in details.values())
    normal = int(np.flatnonzero(~result.is_anomaly)[0])
    details, reasons = run_2000.pipeline.explain(result, normal)
    assert reasons == [] and not any(d["fired"] for d in details.values())


def test_explaining_the_flagged_events_together_equals_one_by_one(run_2000):
    """Anomaly records are explained per batch (explain_many); each equals its own explain."""
    pipeline = run_2000.pipeline
    for result in run_2000.results[-3:]:
        flagged = np.flatnonzero(result.is_anomaly).tolist()
        assert flagged
        together = pipeline.explain_many(result, flagged)
        for i, (details, reasons) in zip(flagged, together, strict=True):
            one_details, one_reasons = pipeline.explain(result, i)
            assert reasons == one_reasons
            assert details.keys() == one_details.keys()
            for name in details:
                assert details[name]["fired"] == one_details[name]["fired"]
                assert details[name]["score"] == one_details[name]["score"]


def test_an_empty_batch_changes_nothing_and_scores_nothing():
    """A consumed batch whose records were all dead-lettered reaches the pipeline empty."""
    from stream_detector.config import load_settings
    from stream_detector.events.decode import decode_batch
    from stream_detector.scoring.factory import build_pipeline, event_schema

    settings = load_settings(None, environ={})
    pipeline = build_pipeline(settings)
    decoded = decode_batch([b"{not json", b"[]"], event_schema(settings))
    assert decoded.features.n == 0
    result = pipeline.process(decoded.features)
    assert result.n == 0 and not result.is_anomaly.any() and result.collective == []


@pytest.mark.parametrize("max_rounds", [2, 8])
def test_a_misleading_guess_and_few_rounds_change_nothing(settings, stream, run_2000, max_rounds):
    """The autoencoder's first-round guess only proposes masks: a guess that flags the wrong
    events costs rounds (and, with max_rounds=2, prefix splits) but never changes the answer."""
    pipeline = build_pipeline(settings)
    pipeline.max_rounds = max_rounds
    autoencoder = pipeline.detectors[pipeline.detector_names.index("autoencoder")]
    rng = np.random.default_rng(7)
    calls = []

    def misleading(batch, learn):
        calls.append(batch.n)
        return np.where(rng.random(batch.n) < 0.05, 1e6, 0.0)

    autoencoder.guess = misleading
    run = process(settings, stream, 2000, N_EVENTS, pipeline=pipeline)
    assert calls, "the guess was never asked for"
    if max_rounds == 2:
        assert any(len(r.segments) > 1 for r in run.results), "expected unsettled batches split into prefixes"
    np.testing.assert_array_equal(run.is_anomaly, run_2000.is_anomaly)
    np.testing.assert_allclose(run.fused, run_2000.fused, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(run.learned, run_2000.learned)


def test_rounds_reuse_exact_steps_and_guess_only_once(settings, stream):
    """A detector whose learn mask did not change between rounds is not scored again, and the
    guess is asked for in the first round only."""
    pipeline = build_pipeline(settings)
    counts: dict[str, int] = {}
    for detector in pipeline.detectors:
        score = detector.score

        def counted(batch, learn, _score=score, _name=detector.name):
            counts[_name] = counts.get(_name, 0) + 1
            return _score(batch, learn)

        detector.score = counted
    guesses = []
    autoencoder = pipeline.detectors[pipeline.detector_names.index("autoencoder")]
    guess = autoencoder.guess
    autoencoder.guess = lambda batch, learn: guesses.append(batch.n) or guess(batch, learn)

    # Calibrators not ready yet: nothing is flagged, so round 2 only confirms the guessed
    # detector with the same (all-learn) mask and every other detector's step is reused.
    first = pipeline.process(stream.slice(0, 100))
    assert not first.is_anomaly.any() and first.rounds == 2 and len(guesses) == 1
    assert counts == dict.fromkeys(pipeline.detector_names, 1)

    # Later batches flag events: one guess per batch, and the autoencoder is scored in
    # fewer rounds than the detectors that cannot guess.
    counts.clear()
    n_batches = 0
    for a in range(100, N_EVENTS, 2000):
        result = pipeline.process(stream.slice(a, a + 2000))
        assert len(result.segments) == 1
        n_batches += 1
    assert len(guesses) == 1 + n_batches
    assert counts["autoencoder"] < counts["zscore"]


def test_a_batch_without_training_point_or_flag_settles_in_one_round(settings, stream):
    """The autoencoder guesses only when the batch trains it (otherwise exact scores cost the
    same): a small batch with nothing to flag is then final after its first round."""
    pipeline = build_pipeline(settings)
    assert pipeline.process(stream.slice(0, 100)).rounds == 2  # trains at its 64th event: guessed
    small = pipeline.process(stream.slice(100, 110))  # 36 buffered + 10 < 64: no training
    assert not small.is_anomaly.any() and small.rounds == 1


def test_a_regime_change_settles_and_equals_smaller_batches():
    """Every store and product changes level at once (a stream of another seed follows the
    first): about 40 % of the new values are gross outliers of their keys, each rejected because
    the ones before it were. The z-score rejects such a chain in one call; a round used to add
    one link per key, and these batches never settled within max_rounds (30+ segments each,
    10x slower). The answer is still the sequential one: batches of 300 give the same. The batch
    is cut only where a key's new level lasts long enough to be declared a level shift."""
    settings = load_settings(environ={})  # defaults: the long, tight histories this needs
    first = [e for e, _ in SalesGenerator(GeneratorConfig(seed=1011)).generate(20_000)]
    then = [e for e, _ in SalesGenerator(GeneratorConfig(seed=11)).generate(1800)]
    features = decode_batch([orjson.dumps(e) for e in first + then], event_schema(settings)).features
    history = build_pipeline(settings)
    history.process(features.slice(0, 20_000))
    snapshot = codec.encode(history.state_dict())

    result = history.process(features.slice(20_000, 21_800))
    # One cut per declaring event (keys that pool their runs are declared at the same event).
    assert len(result.segments) == 1 + len({s.event_id for s in result.level_shifts}) and result.rounds <= history.max_rounds
    rejected = np.concatenate([s.steps["zscore"].reject for s in result.segments if s.steps["zscore"].reject is not None])
    assert rejected.sum() > 300

    smaller = build_pipeline(settings)
    assert smaller.load_state_dict(codec.decode(snapshot)) == []
    parts = [smaller.process(features.slice(a, a + 300)) for a in range(20_000, 21_800, 300)]
    np.testing.assert_array_equal(result.is_anomaly, np.concatenate([r.is_anomaly for r in parts]))
    np.testing.assert_allclose(result.fused, np.concatenate([r.fused for r in parts]), rtol=RTOL, atol=ATOL)
