"""The demo's one-line rendering of an anomaly record."""

from __future__ import annotations

from stream_detector.runtime.demo import format_anomaly

RECORD = {"timestamp": "2026-01-05T15:52:32.958Z", "key": "s-017", "score": 0.9999999999, "event_id": "e-1", "reasons": ["a", "b"]}


def test_anomaly_line_names_score_surprise_event_and_reasons() -> None:
    line = format_anomaly({**RECORD, "surprise": 14.62})
    assert line == "ANOMALY 2026-01-05T15:52:32.958Z key=s-017 score=1.00000 surprise=14.6 event=e-1: a; b"


def test_a_record_without_surprise_or_reasons_still_renders() -> None:
    line = format_anomaly({**RECORD, "reasons": []})
    assert line == "ANOMALY 2026-01-05T15:52:32.958Z key=s-017 score=1.00000 event=e-1: combined detector scores"
