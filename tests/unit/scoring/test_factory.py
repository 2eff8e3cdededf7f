"""The pipeline the configuration builds: which detectors, calibrators, timers and feedback
memory, with the configured settings (heavy models built only when enabled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stream_detector.alerting.feedback import FeedbackMemory
from stream_detector.config import Settings, load_settings
from stream_detector.detectors.hst import HalfSpaceTreesDetector
from stream_detector.detectors.river_model import RiverModelDetector
from stream_detector.detectors.silence import SilenceDetector
from stream_detector.errors import ConfigError
from stream_detector.scoring.calibration import Calibrator, PassThrough
from stream_detector.scoring.factory import build_pipeline, event_schema


def settings_from(tmp_path: Path, overrides: dict) -> Settings:
    path = tmp_path / "detector.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return load_settings(path, environ={})


def test_default_pipeline_builds():
    pipeline = build_pipeline(load_settings(None, environ={}))
    assert pipeline.detector_names == ["zscore", "duplicates", "hst", "autoencoder"]
    assert 0 < pipeline.threshold < 1


def test_calibrators_follow_the_scoring_settings_and_probabilities_pass_through(tmp_path):
    scoring = {"calibration_window": 3000, "calibration_min_events": 700, "calibration_refresh": 50, "tail_quantile": 0.97, "threshold": 0.999}
    pipeline = build_pipeline(settings_from(tmp_path, {"scoring": scoring, "autoencoder": {"enabled": False}}))
    assert pipeline.threshold == 0.999
    assert set(pipeline.calibrators) == set(pipeline.detector_names) == {"zscore", "duplicates", "hst"}
    assert isinstance(pipeline.calibrators["duplicates"], PassThrough)  # its score is 1 - p already
    for name in ("zscore", "hst"):
        calibrator = pipeline.calibrators[name]
        assert isinstance(calibrator, Calibrator)
        assert (calibrator.window, calibrator.min_events, calibrator.refresh, calibrator.tail_quantile) == (3000, 700, 50, 0.97)


def test_only_enabled_detectors_are_built(tmp_path):
    off = {name: {"enabled": False} for name in ("zscore", "duplicates", "river", "autoencoder", "silence")}
    pipeline = build_pipeline(settings_from(tmp_path, {**off, "duplicates": {"enabled": True}}))
    assert pipeline.detector_names == ["duplicates"] and pipeline.collective == []
    with pytest.raises(ValueError, match="at least one detector"):
        build_pipeline(settings_from(tmp_path, off))


def test_the_river_section_picks_the_model(tmp_path):
    river = {"params": {"n_trees": 3, "height": 4, "window_size": 20}, "seed": 5}
    hst = build_pipeline(settings_from(tmp_path, {"autoencoder": {"enabled": False}, "river": river}))
    detector = hst.detectors[hst.detector_names.index("hst")]
    assert isinstance(detector, HalfSpaceTreesDetector)
    assert (detector.n_trees, detector.height, detector.window_size, detector.seed) == (3, 4, 20, 5)
    river = {"model": "LODA", "params": {"n_bins": 7}, "features": ["log_amount"]}
    loda = build_pipeline(settings_from(tmp_path, {"autoencoder": {"enabled": False}, "river": river}))
    detector = loda.detectors[loda.detector_names.index("river")]
    assert isinstance(detector, RiverModelDetector)
    assert (detector.model, detector.params, detector.features) == ("LODA", {"n_bins": 7}, ("log_amount",))
    with pytest.raises(ConfigError, match=r"river\.params: LODA refuses \{'bins': 7\}"):
        build_pipeline(settings_from(tmp_path, {"river": {"model": "LODA", "params": {"bins": 7}}}))


def test_the_silence_timer_and_the_schema_key_sets(tmp_path):
    silence = {"fields": ["store_id", "channel"], "expected_events": 9.0, "min_events": 30, "min_hours": 2.0, "check_every_s": 30.0}
    settings = settings_from(tmp_path, {"autoencoder": {"enabled": False}, "silence": silence})
    (timer,) = build_pipeline(settings).collective
    assert isinstance(timer, SilenceDetector)
    assert (timer.key_set, timer.expected_events, timer.min_events, timer.min_hours, timer.check_every_s) == ("store_id+channel", 9.0, 30, 2.0, 30.0)
    # The decoder keeps a key column for every z-score key set and for the timer's, once each.
    assert event_schema(settings).key_sets == (("store_id",), ("product_id", "currency"), ("customer_id",), (), ("store_id", "channel"))
    same = settings_from(tmp_path, {"silence": {"fields": ["store_id"]}})
    assert event_schema(same).key_sets == (("store_id",), ("product_id", "currency"), ("customer_id",), ())
    no_zscore = settings_from(tmp_path, {"zscore": {"enabled": False}})
    assert event_schema(no_zscore).key_sets == (("store_id",),)


def test_a_feedback_memory_only_with_a_feedback_topic(tmp_path):
    assert build_pipeline(settings_from(tmp_path, {"autoencoder": {"enabled": False}})).feedback is None
    alerts = {"feedback_topic": "alerts-feedback", "feedback_ttl_seconds": 3600.0, "feedback_margin": 4.0, "feedback_max_recent": 10, "feedback_max_rules": 3}
    memory = build_pipeline(settings_from(tmp_path, {"autoencoder": {"enabled": False}, "alerts": alerts})).feedback
    assert isinstance(memory, FeedbackMemory)
    assert (memory.ttl_seconds, memory.margin, memory.max_recent, memory.max_rules) == (3600.0, 4.0, 10, 3)
