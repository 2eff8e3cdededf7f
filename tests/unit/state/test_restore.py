"""Restoring a pipeline part by part: what does not load starts fresh, the rest keeps its state.

The daemon counts and logs what ``ScoringPipeline.load_state_dict`` returns; here the pipeline
and the River model's signature are checked on their own.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import orjson
import pytest
import yaml

from stream_detector.alerting.feedback import FeedbackMemory, Pattern
from stream_detector.config import load_settings
from stream_detector.detectors.river_model import RiverModelDetector
from stream_detector.errors import StateError
from stream_detector.events.decode import decode_batch
from stream_detector.features import FeatureBatch
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import PartFailure, ScoringPipeline
from stream_detector.state import codec
from tests.unit.alerting.helpers import T0, record

SMALL = {
    "scoring": {"calibration_window": 500, "calibration_min_events": 200, "calibration_refresh": 100},
    "autoencoder": {"warmup_events": 128, "train_batch_size": 64, "device": "cpu"},
    "river": {"params": {"n_trees": 10, "height": 6, "window_size": 100}},
    "alerts": {"feedback_topic": "feedback"},
}
FEATURES = ("log_amount", "log_quantity", "log_unit_price")
KEY = b"unit-test-signing-key"


def _settings(tmp_path, **changes) -> object:
    config = {section: dict(values) for section, values in SMALL.items()}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path, environ={})


@pytest.fixture(scope="module")
def stream() -> FeatureBatch:
    events = [e for e, _ in SalesGenerator(GeneratorConfig(seed=5)).generate(1200)]
    return decode_batch([orjson.dumps(e) for e in events], event_schema(load_settings(None, environ={}))).features


def _trained(settings, stream: FeatureBatch) -> ScoringPipeline:
    pipeline = build_pipeline(settings)
    for a in range(0, 1000, 250):
        pipeline.process(stream.slice(a, a + 250))
    pipeline.feedback.remember("e-1", Pattern.of(record("e-1", "s-001"), T0))
    assert pipeline.feedback.apply("e-1", "false_positive", "known") == "applied"
    return pipeline


def _same(a: dict, b: dict) -> bool:
    return codec.encode(a) == codec.encode(b)


def test_every_part_restores_through_the_encoding_and_scores_continue(tmp_path, stream):
    settings = _settings(tmp_path)
    original = _trained(settings, stream)
    restored = build_pipeline(settings)
    assert restored.load_state_dict(codec.decode(codec.encode(original.state_dict()))) == []
    assert _same(restored.state_dict(), original.state_dict())
    rest = stream.slice(1000, 1200)
    np.testing.assert_allclose(restored.process(rest).fused, original.process(rest).fused, rtol=1e-9, atol=1e-12)
    assert len(restored.feedback) == 1 and restored.feedback.knows("e-1")


def test_a_part_of_the_wrong_shape_starts_fresh_and_the_others_keep_their_state(tmp_path, stream):
    settings = _settings(tmp_path)
    original = _trained(settings, stream)
    state = codec.decode(codec.encode(original.state_dict()))
    zscore = state["detectors"]["zscore"]["key_sets"]["store_id"]
    zscore["mean"] = zscore["mean"][:, :1]  # one column short: the kernels would read past it
    state["collective"]["silence"]["last"] = np.zeros(3)  # three keys' worth, for many keys
    state["calibrators"]["hst"] = "not a dict"
    restored = build_pipeline(settings)
    failures = restored.load_state_dict(state)
    assert [(f.part, f.reason) for f in failures] == [("detector:zscore", "incompatible"), ("calibrator:hst", "corrupt"), ("timer:silence", "incompatible")]
    assert "shape" in failures[0].message
    fresh, after = build_pipeline(settings).state_dict(), restored.state_dict()
    assert _same(after["detectors"]["zscore"], fresh["detectors"]["zscore"])
    assert _same(after["calibrators"]["zscore"], fresh["calibrators"]["zscore"])  # with its detector
    assert _same(after["calibrators"]["hst"], fresh["calibrators"]["hst"])
    assert _same(after["collective"]["silence"], fresh["collective"]["silence"])
    for name in ("duplicates", "hst", "autoencoder"):
        assert _same(after["detectors"][name], original.state_dict()["detectors"][name])
    assert _same(after["calibrators"]["autoencoder"], original.state_dict()["calibrators"]["autoencoder"])
    assert len(restored.feedback) == 1
    restored.process(stream.slice(1000, 1200))  # and it scores


def test_a_changed_setting_resets_only_the_detector_it_belongs_to(tmp_path, stream):
    before = _trained(_settings(tmp_path), stream)
    snapshot = codec.decode(codec.encode(before.state_dict()))
    changed = _settings(tmp_path, river={"params": {"n_trees": 5, "height": 6, "window_size": 100}})
    restored = build_pipeline(changed)
    failures = restored.load_state_dict(snapshot)
    assert [(f.part, f.reason) for f in failures] == [("detector:hst", "incompatible")]
    assert "n_trees" in failures[0].message
    fresh = build_pipeline(changed).state_dict()
    after = restored.state_dict()
    assert _same(after["detectors"]["hst"], fresh["detectors"]["hst"])
    assert _same(after["calibrators"]["hst"], fresh["calibrators"]["hst"])
    for name in ("zscore", "duplicates", "autoencoder"):
        assert _same(after["detectors"][name], before.state_dict()["detectors"][name])
        assert _same(after["calibrators"][name], before.state_dict()["calibrators"][name])
    restored.process(stream.slice(1000, 1200))


def test_a_snapshot_that_is_not_a_pipeline_state_is_a_state_error(tmp_path):
    pipeline = build_pipeline(_settings(tmp_path))
    for bad in ({"version": 7}, {"detectors": {}}):
        with pytest.raises(StateError, match="pipeline state version"):
            pipeline.load_state_dict(bad)
    # Sections of the wrong type hold no parts: everything stays fresh.
    assert pipeline.load_state_dict({"version": 1, "detectors": [], "calibrators": 3, "collective": None}) == []


def test_a_detector_that_raises_anything_is_reset_not_crashed(tmp_path):
    pipeline = build_pipeline(_settings(tmp_path))
    state = pipeline.state_dict()
    state["detectors"]["duplicates"] = {"version": 1, "fingerprints": np.zeros(2, dtype=np.uint64), "times": np.zeros(3), "newest": 0.0}
    state["detectors"]["autoencoder"] = {**state["detectors"]["autoencoder"], "buffer": "x"}
    failures = pipeline.load_state_dict(state)
    assert [f.part for f in failures] == ["detector:duplicates", "detector:autoencoder"]
    assert all(isinstance(f, PartFailure) and f.reason == "incompatible" for f in failures)


# -- the River model: a pickle, so signed --------------------------------------------------


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _river(key: bytes | None = KEY) -> RiverModelDetector:
    return RiverModelDetector(model="LODA", features=FEATURES, seed=3, signing_key=key)


def _learned(stream: FeatureBatch, key: bytes | None = KEY) -> RiverModelDetector:
    detector = _river(key)
    detector.learn_one_batch(stream.slice(0, 100))
    return detector


def test_a_signed_river_model_round_trips(stream):
    state = codec.decode(codec.encode(_learned(stream).state_dict()))
    restored = _river()
    restored.load_state_dict(state)
    rest = stream.slice(100, 200)
    np.testing.assert_array_equal(restored.learn_one_batch(rest), _learned(stream).learn_one_batch(rest))


def test_a_river_model_without_a_key_is_not_saved_and_restarts_fresh(stream):
    detector = _learned(stream, key=None)
    assert not detector.saves_state and _river().saves_state
    state = codec.decode(codec.encode(detector.state_dict()))
    assert state["pickle"] is None
    restored = _river(key=None)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.learn_one_batch(stream.slice(0, 50)), _river(key=None).learn_one_batch(stream.slice(0, 50)))


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"hmac": None}, KEY, "unsigned"),
        ({"hmac": "00" * 32}, KEY, "bad_signature"),
        ({"hmac": "\u00e9" * 64}, KEY, "bad_signature"),
        ({}, b"another-key-of-16+", "bad_signature"),
        ({}, None, "unsigned"),
        ({"version": 1, "hmac": None}, KEY, "unsigned"),
        ({"pickle": "text"}, KEY, "corrupt"),
    ],
)
def test_a_river_pickle_without_a_valid_signature_is_refused_unread(stream, tmp_path, change, key, reason):
    marker = tmp_path / "ran"
    state = {**_learned(stream).state_dict(), "pickle": pickle.dumps(_Marker(str(marker))), **change}
    with pytest.raises(StateError) as raised:
        _river(key).load_state_dict(state)
    assert raised.value.reason == reason
    assert not marker.exists()


def test_a_river_pickle_signed_for_another_model_is_refused(stream):
    state = _learned(stream).state_dict()
    other = RiverModelDetector(model="OneClassSVM", features=FEATURES, signing_key=KEY)
    with pytest.raises(StateError, match="bad signature") as raised:
        other.load_state_dict({**state, "model": "OneClassSVM"})  # the name is inside the signature
    assert raised.value.reason == "bad_signature"


def test_feedback_state_is_plain_data_and_checked():
    memory = FeedbackMemory()
    memory.remember("e-1", Pattern.of(record("e-1", "s-001"), T0))
    memory.apply("e-1", "false_positive", "note")
    clone = FeedbackMemory()
    clone.load_state_dict(codec.decode(codec.encode(memory.state_dict())))
    assert clone.matching_rule(Pattern.of(record("e-3", "s-001"), T0 + 1)) is not None
    for bad in ({"version": 1, "recent": [], "rules": []}, {"version": 2, "recent": [[1, 2]], "rules": []}, {"version": 2, "recent": []}):
        with pytest.raises(StateError):
            FeedbackMemory().load_state_dict(bad)
