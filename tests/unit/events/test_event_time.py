"""The event time guard: one event cannot move a partition's clocks by years (issue 19, point 3)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_detector.config import load_settings
from stream_detector.errors import ConfigError
from stream_detector.events.decode import REASONS, EventSchema, decode_batch
from stream_detector.events.event_time import DEFAULT_MAX_FUTURE_SKEW_S, FUTURE_TIMESTAMP, EventTimeGuard, TimeLimit
from stream_detector.metrics import Metrics
from stream_detector.records import anomaly_record, replay_lines
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema

SKEW = DEFAULT_MAX_FUTURE_SKEW_S  # one hour
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC).timestamp()
Y2100 = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
# Only the detectors with event-time clocks (z-score TTL, duplicates window, silence timers):
# fast, and what a far-future event used to wreck.
LIGHT = {"STREAM_DETECTOR_RIVER__ENABLED": "false", "STREAM_DETECTOR_AUTOENCODER__ENABLED": "false"}


def _event(i: int, t: float | str | int, store: str = "s-1") -> bytes:
    timestamp = t if not isinstance(t, float) else datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"event_id": f"e-{i}", "timestamp": timestamp, "store_id": store, "amount": 10.0 + i % 7, "quantity": 1, "unit_price": 10.0})


def _limit(watermark: float | None, mode: str = "dead_letter", now: float = NOW) -> TimeLimit:
    return TimeLimit(watermark, now, SKEW, mode)  # type: ignore[arg-type]


# -- the check --------------------------------------------------------------------------------


def test_times_within_the_skew_of_the_clock_pass_and_one_in_2100_does_not() -> None:
    times = np.array([NOW - 600, NOW, Y2100, NOW + SKEW - 1, NOW + 60])
    found = _limit(None).check(times)
    assert found.index.tolist() == [2]
    assert found.basis == ["clock"]
    assert found.limit.tolist() == [NOW + SKEW]
    assert _limit(None).check(np.array([NOW - 600, NOW + SKEW])).n == 0  # the limit itself is allowed


def test_the_reference_is_the_larger_of_the_watermark_and_the_clock() -> None:
    # A watermark ahead of the clock (a producer clock a little fast) moves the limit with it.
    ahead = NOW + 0.5 * SKEW
    found = _limit(ahead).check(np.array([NOW + 1.6 * SKEW, NOW + 1.4 * SKEW]))
    assert found.index.tolist() == [0]
    assert found.basis == ["watermark"] and found.limit.tolist() == [ahead + SKEW]
    # A replay of old data: the watermark far behind, the clock decides.
    old = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
    assert _limit(old).check(np.array([old + 2 * SKEW, NOW + 0.5 * SKEW])).n == 0
    assert _limit(old).check(np.array([NOW + 2 * SKEW])).basis == ["clock"]


def test_inside_a_batch_each_event_is_judged_by_the_events_accepted_before_it() -> None:
    # Accepted events raise the limit of the next one; a refused one does not.
    times = np.array([NOW + 0.9 * SKEW, Y2100, NOW + 1.8 * SKEW, NOW + 2.9 * SKEW, NOW + 2.7 * SKEW, NOW + 3.0 * SKEW])
    found = _limit(None).check(times)
    assert found.index.tolist() == [1, 3]
    assert found.limit.tolist() == [NOW + 1.9 * SKEW, NOW + 2.8 * SKEW]
    assert found.basis == ["watermark", "watermark"]


def test_clamped_events_take_the_watermark_so_that_no_clock_moves() -> None:
    old = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
    found = _limit(old, "clamp").check(np.array([old + 60, Y2100, old + 120, Y2100]))
    assert found.index.tolist() == [1, 3]
    assert found.clamped_to.tolist() == [old + 60, old + 120]
    # A partition with no watermark yet: the clock.
    assert _limit(None, "clamp").check(np.array([Y2100, NOW - 60])).clamped_to.tolist() == [NOW]


# -- decode: dead-letter or clamp -------------------------------------------------------------


def test_decode_dead_letters_a_future_event_naming_the_limit() -> None:
    values = [_event(0, NOW - 60), _event(1, "2100-01-01T00:00:00Z"), _event(2, 7_239_628_800_000), _event(3, NOW)]
    decoded = decode_batch(values, EventSchema(), _limit(None))
    assert decoded.source_index.tolist() == [0, 3]
    assert [(bad.index, bad.reason) for bad in decoded.invalid] == [(1, FUTURE_TIMESTAMP), (2, FUTURE_TIMESTAMP)]
    detail = decoded.invalid[0].detail
    assert "2100-01-01T00:00:00.000Z" in detail and "limit 2026-12-07T13:00:00.000Z" in detail
    assert "the clock 2026-12-07T12:00:00.000Z" in detail and "processing.max_future_skew 3600 s" in detail
    assert decoded.clamped == {}
    # Without a limit (the guard off) the same events are valid.
    assert decode_batch(values, EventSchema()).features.n == 4


def test_an_event_with_another_problem_keeps_its_first_reason() -> None:
    bad_amount = orjson.dumps({"event_id": "x", "timestamp": "2100-01-01T00:00:00Z", "amount": "12"})
    decoded = decode_batch([bad_amount, _event(1, NOW)], EventSchema(), _limit(None))
    assert [bad.reason for bad in decoded.invalid] == ["wrong_type"]


def test_decode_clamps_the_time_and_the_features_derived_from_it() -> None:
    old = datetime(2026, 1, 5, 10, 0, tzinfo=UTC).timestamp()
    values = [_event(0, old), _event(1, "2100-01-01T03:00:00Z"), _event(2, old + 60)]
    decoded = decode_batch(values, EventSchema(), _limit(old - 3600, "clamp"))
    assert decoded.invalid == []
    assert decoded.features.event_time.tolist() == [old, old, old + 60]
    assert decoded.clamped == {1: datetime(2100, 1, 1, 3, tzinfo=UTC).timestamp()}
    hour_sin = decoded.features.columns["hour_sin"]
    assert hour_sin[1] == hour_sin[0]  # 10:00, the watermark's hour, not 03:00


def test_future_timestamp_is_a_dead_letter_reason_with_its_metric_at_zero() -> None:
    assert FUTURE_TIMESTAMP in REASONS
    text = Metrics().exposition().decode()
    assert 'stream_detector_dlq_total{reason="future_timestamp"} 0.0' in text
    assert "stream_detector_event_time_clamped_total 0.0" in text


# -- the shared scoring path ------------------------------------------------------------------


def _stream(n: int, start: float, stores: int = 8, step: float = 30.0) -> list[bytes]:
    return [_event(i, start + i * step, f"s-{i % stores}") for i in range(n)]


def test_one_event_in_2100_leaves_the_keys_and_the_silence_timer_alone() -> None:
    settings = load_settings(environ={**LIGHT, "STREAM_DETECTOR_SILENCE__MIN_EVENTS": "10", "STREAM_DETECTOR_SILENCE__MIN_HOURS": "0"})
    start = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
    clean = _stream(1200, start)
    results = {}
    for name, values in {"clean": clean, "with 2100": [*clean[:600], _event(9999, Y2100, "s-0"), *clean[600:]]}.items():
        pipeline, schema = build_pipeline(settings), event_schema(settings)
        silences, invalid = 0, []
        for i in range(0, len(values), 250):
            scored = score_batch(pipeline, schema, values[i : i + 250], now=NOW)
            silences += len(scored.result.collective)
            invalid += [bad.reason for bad in scored.decoded.invalid]
        results[name] = (pipeline.detectors[0].n_keys(), silences, invalid, pipeline.event_time.watermark)
    keys, silences, invalid, watermark = results["with 2100"]
    assert invalid == [FUTURE_TIMESTAMP], invalid
    assert keys == results["clean"][0] and keys["store_id"] == 8
    assert silences == results["clean"][1] == 0
    assert watermark == results["clean"][3] == start + 1199 * 30.0


def test_the_watermark_advances_only_after_scoring_and_survives_a_snapshot() -> None:
    settings = load_settings(environ=LIGHT)
    pipeline, schema = build_pipeline(settings), event_schema(settings)
    assert pipeline.event_time.watermark is None
    score_batch(pipeline, schema, [_event(0, NOW + 0.8 * SKEW), _event(1, NOW - 60)], now=NOW)
    assert pipeline.event_time.watermark == NOW + 0.8 * SKEW

    restored = build_pipeline(settings)
    assert restored.load_state_dict(pipeline.state_dict()) == []
    assert restored.event_time.watermark == NOW + 0.8 * SKEW
    # After the restart the limit still follows the watermark, even with the clock behind it;
    # without the watermark the clock alone would decide.
    ahead = [_event(2, NOW + 1.7 * SKEW), _event(3, NOW + 2.9 * SKEW)]
    scored = score_batch(restored, schema, ahead, now=NOW)
    assert scored.decoded.features.n == 1 and scored.decoded.invalid[0].index == 1
    assert "the partition's watermark 2026-12-07T13:42:00.000Z" in scored.decoded.invalid[0].detail
    assert [bad.index for bad in score_batch(build_pipeline(settings), schema, ahead, now=NOW).decoded.invalid] == [0, 1]


def test_a_snapshot_without_a_watermark_or_with_a_damaged_one_starts_without() -> None:
    settings = load_settings(environ=LIGHT)
    pipeline = build_pipeline(settings)
    pipeline.event_time.watermark = NOW
    older = {k: v for k, v in pipeline.state_dict().items() if k != "event_time"}
    fresh = build_pipeline(settings)
    assert fresh.load_state_dict(older) == []
    assert fresh.event_time.watermark is None
    damaged = {**pipeline.state_dict(), "event_time": {"version": 1, "watermark": "soon"}}
    failures = fresh.load_state_dict(damaged)
    assert [(f.part, f.reason) for f in failures] == [("event_time", "corrupt")]
    assert fresh.event_time.watermark is None


def test_clamped_events_are_noted_in_replay_lines_and_anomaly_records() -> None:
    settings = load_settings(environ={**LIGHT, "STREAM_DETECTOR_PROCESSING__FUTURE_TIMESTAMPS": "clamp"})
    pipeline, schema = build_pipeline(settings), event_schema(settings)
    scored = score_batch(pipeline, schema, [_event(0, NOW - 60), _event(1, "2100-01-01T00:00:00Z")], now=NOW)
    assert scored.decoded.invalid == [] and scored.decoded.clamped == {1: Y2100}
    assert pipeline.event_time.watermark == NOW - 60
    lines = dict(replay_lines(scored.decoded, scored.result, [1, 2]))
    assert lines[1]["timestamp_clamped_from"] == "2100-01-01T00:00:00.000Z"
    assert "timestamp_clamped_from" not in lines[0]
    record = anomaly_record(pipeline, scored.decoded, scored.result, 1)
    assert record["timestamp"] == "2026-12-07T11:59:00.000Z"
    assert record["timestamp_clamped_from"] == "2100-01-01T00:00:00.000Z"


def test_no_guard_when_max_future_skew_is_null(tmp_path: Path) -> None:
    path = tmp_path / "detector.yaml"
    path.write_text("processing:\n  max_future_skew: null\n")
    settings = load_settings(path, environ=LIGHT)
    pipeline, schema = build_pipeline(settings), event_schema(settings)
    scored = score_batch(pipeline, schema, [_event(0, "2100-01-01T00:00:00Z")], now=NOW)
    assert scored.decoded.invalid == [] and pipeline.event_time.watermark == Y2100


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_FUTURE_SKEW", "0", "processing.max_future_skew: Input should be greater than 0"),
        ("MAX_FUTURE_SKEW", "-5", "processing.max_future_skew: Input should be greater than 0"),
        ("FUTURE_TIMESTAMPS", '"drop"', "processing.future_timestamps: Input should be 'dead_letter' or 'clamp'"),
    ],
)
def test_bad_guard_settings_are_refused_naming_the_key(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={f"STREAM_DETECTOR_PROCESSING__{name}": value})


def test_an_infinite_skew_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "detector.yaml"
    path.write_text("processing:\n  max_future_skew: .inf\n")
    with pytest.raises(ConfigError, match="processing.max_future_skew: Input should be a finite number"):
        load_settings(path, environ={})


def test_the_guard_refuses_a_bad_skew_when_built_directly() -> None:
    with pytest.raises(ValueError, match="max_future_skew"):
        EventTimeGuard(float("nan"))
