"""Output records: what an anomaly, a silent key, a replay line and a dead letter look like.

The pipeline here is the real ``ScoringPipeline`` over two stand-in detectors whose scores
are read off the events, so every number in the records can be worked out by hand:
``amount_risk`` scores ``amount / 100`` (already ``1 - tail probability``), ``quiet`` scores 0.
With k = 2 detectors the fused score is ``1 - 2 * (1 - amount / 100)`` (README, "Fusion and
threshold"): amount 99 -> 0.98 and 96 -> 0.92 are above the threshold 0.9, 94 -> 0.88 is not.
The surprise is ``-log10(2 * (1 - amount / 100))``: amount 99 -> -log10(0.02) = 1.699.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pytest

from stream_detector.detectors.base import Detector, Explanation, Step
from stream_detector.detectors.silence import SilenceAlert
from stream_detector.events.decode import DecodedBatch, EventSchema, InvalidRecord, decode_batch
from stream_detector.features import FeatureBatch
from stream_detector.records import (
    MAX_ANOMALY_BYTES,
    anomaly_record,
    anomaly_records,
    dead_letter_headers,
    encode_anomalies,
    encode_record,
    iso_utc,
    replay_lines,
    silence_record,
)
from stream_detector.scoring.calibration import PassThrough
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

MONDAY = 1_767_571_200.0  # 2026-01-05T00:00:00Z
THRESHOLD = 0.9


class ReadOff(Detector):
    """A stand-in detector: raw score ``column / scale`` (NaN -> 0), already a probability score.
    Its explanation: ``warm`` when the event's quantity is above 1, and one reason."""

    outputs_probability = True

    def __init__(self, name: str, column: str | None, scale: float = 1.0) -> None:
        self.name = name
        self.column = column
        self.scale = scale

    def score(self, batch: FeatureBatch, learn: np.ndarray) -> Step:
        raw = np.zeros(batch.n) if self.column is None else np.nan_to_num(batch.column(self.column) / self.scale)
        return Step(scores=raw)

    def commit(self, step: Step) -> None:
        return None

    def explain(self, batch: FeatureBatch, step: Step, i: int) -> Explanation:
        return Explanation(details={"warm": bool(batch.column("quantity")[i] > 1)}, reasons=[f"{self.name} read {step.scores[i]:.2f}"])

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def make_pipeline() -> ScoringPipeline:
    detectors: list[Detector] = [ReadOff("amount_risk", "amount", 100.0), ReadOff("quiet", None)]
    return ScoringPipeline(detectors, {d.name: PassThrough() for d in detectors}, threshold=THRESHOLD)


def sale(i: int, amount: float, store: str | None, quantity: int = 1, **extra: Any) -> dict[str, Any]:
    event = {"event_id": f"e-{i}", "timestamp": f"2026-01-05T10:00:0{i}.250Z", "amount": amount, "quantity": quantity, "unit_price": amount / quantity}
    if store is not None:
        event["store_id"] = store
    return {**event, **extra}


# Raw batch: two invalid records among four valid events (valid index -> raw index 0, 2, 3, 4).
EVENTS = {0: sale(0, 50.0, "s-1"), 2: sale(2, 99.0, "s-2", quantity=3, promo="X1"), 3: sale(3, 94.0, "s-3"), 4: sale(4, 96.0, None)}
RAW = [orjson.dumps(EVENTS[0]), b"{not json", orjson.dumps(EVENTS[2]), orjson.dumps(EVENTS[3]), orjson.dumps(EVENTS[4]), b"[]"]
SOURCES = [{"topic": "sales", "partition": 1, "offset": 100 + j} for j in range(len(RAW))]


@pytest.fixture
def scored() -> tuple[ScoringPipeline, DecodedBatch, BatchResult]:
    pipeline = make_pipeline()
    decoded = decode_batch(RAW, EventSchema())
    assert decoded.source_index.tolist() == [0, 2, 3, 4]
    result = pipeline.process(decoded.features)
    assert result.is_anomaly.tolist() == [False, True, False, True]
    return pipeline, decoded, result


def parse_iso(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).timestamp()


def test_iso_utc_is_millisecond_utc_with_a_z():
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(MONDAY + 10 * 3600 + 2.25) == "2026-01-05T10:00:02.250Z"
    assert iso_utc(MONDAY - 0.001) == "2026-01-04T23:59:59.999Z"


def test_an_anomaly_record_has_the_documented_fields(scored):
    pipeline, decoded, result = scored
    before = time.time()
    record = anomaly_record(pipeline, decoded, result, 1, source=SOURCES[2])
    after = time.time()
    assert set(record) == {"event_id", "key", "warm", "timestamp", "score", "surprise", "threshold", "detectors", "reasons", "event", "detected_at", "source"}
    assert record["event_id"] == "e-2" and record["key"] == "s-2"
    assert record["timestamp"] == "2026-01-05T10:00:02.250Z"  # the event's time, not the clock's
    assert record["score"] == pytest.approx(0.98) and record["threshold"] == THRESHOLD
    assert record["surprise"] == pytest.approx(-math.log10(0.02)) and type(record["surprise"]) is float
    assert record["event"] == EVENTS[2]  # the event as it came, extra fields included
    assert record["source"] == {"topic": "sales", "partition": 1, "offset": 102}
    assert before - 0.001 <= parse_iso(record["detected_at"]) <= after + 0.001
    risk, quiet = record["detectors"]["amount_risk"], record["detectors"]["quiet"]
    assert risk["fired"] is True and risk["raw"] == pytest.approx(0.99) and risk["score"] == pytest.approx(0.99)
    assert risk["tail_probability"] == pytest.approx(0.01) and risk["warm"] is True
    assert quiet["fired"] is False and quiet["score"] == 0.0 and quiet["tail_probability"] == 1.0
    # Each detector's own adjusted surprise -log10(min(1, k p)); the record's is the largest.
    assert risk["surprise"] == pytest.approx(-math.log10(0.02)) and quiet["surprise"] == 0.0
    assert record["reasons"] == ["amount_risk read 0.99"]  # reasons of the detectors that fired only
    # Without a source, no "source" key.
    assert "source" not in anomaly_record(pipeline, decoded, result, 1)


def test_warm_comes_from_the_zscore_details_and_defaults_to_true(scored):
    pipeline, decoded, result = scored
    assert anomaly_record(pipeline, decoded, result, 1, explained=({"zscore": {"warm": False}}, []))["warm"] is False
    assert anomaly_record(pipeline, decoded, result, 1, explained=({"zscore": {"warm": True}}, []))["warm"] is True
    assert anomaly_record(pipeline, decoded, result, 1, explained=({"zscore": {}}, []))["warm"] is True
    assert anomaly_record(pipeline, decoded, result, 1, explained=({}, []))["warm"] is True


def test_an_explanation_given_by_the_caller_is_used_as_is(scored, monkeypatch):
    pipeline, decoded, result = scored

    def refuse(*args: Any) -> None:
        raise AssertionError("explained again")

    monkeypatch.setattr(pipeline, "explain", refuse)
    monkeypatch.setattr(pipeline, "explain_many", refuse)
    details = {"zscore": {"warm": False, "fired": True}}
    record = anomaly_record(pipeline, decoded, result, 3, explained=(details, ["given"]))
    assert record["detectors"] == details and record["reasons"] == ["given"] and record["warm"] is False
    assert record["event_id"] == "e-4" and record["key"] is None


def test_anomaly_records_are_the_flagged_events_in_input_order_with_their_sources(scored):
    pipeline, decoded, result = scored
    asked = []

    class LazySources:
        """Builds a source only when asked (the daemon's way), and notes which."""

        def __getitem__(self, j: int) -> dict[str, Any]:
            asked.append(j)
            return SOURCES[j]

    records = anomaly_records(pipeline, decoded, result, LazySources())
    assert [(i, r["event_id"], r["source"]["offset"]) for i, r in records] == [(1, "e-2", 102), (3, "e-4", 104)]
    assert asked == [2, 4]  # only the anomalies' raw positions
    assert [r["warm"] for _, r in records] == [True, True]  # no zscore detector: warm by default
    assert [r["score"] for _, r in records] == pytest.approx([0.98, 0.92])
    assert all("source" not in r for _, r in anomaly_records(pipeline, decoded, result))
    # Each equals the record of that event made on its own (but for the detection time).
    for i, r in records:
        alone = anomaly_record(pipeline, decoded, result, i, SOURCES[int(decoded.source_index[i])])
        assert {**r, "detected_at": None} == {**alone, "detected_at": None}


def test_encode_record_keys_by_the_record_key_and_writes_json(scored):
    pipeline, decoded, result = scored
    record = anomaly_record(pipeline, decoded, result, 1, source=SOURCES[2])
    key, value = encode_record(record)
    assert key == b"s-2"
    assert orjson.loads(value) == record
    key, value = encode_record(anomaly_record(pipeline, decoded, result, 3))
    assert key is None and orjson.loads(value)["key"] is None
    # numpy values in details are written as plain JSON numbers and arrays.
    key, value = encode_record({"key": "s-ü", "event_id": "e", "x": np.float32(1.5), "n": np.int64(3), "v": np.array([1, 2])})
    assert key == "s-ü".encode() and orjson.loads(value) == {"key": "s-ü", "event_id": "e", "x": 1.5, "n": 3, "v": [1, 2]}


def test_an_oversized_record_keeps_the_alert_and_cuts_the_event():
    blob = "x" * MAX_ANOMALY_BYTES
    record = {"event_id": "e-9", "key": "s-9", "score": 0.99, "reasons": ["big"], "event": {"event_id": "e-9", "blob": blob}}
    key, value = encode_record(record)
    assert key == b"s-9" and len(value) <= MAX_ANOMALY_BYTES
    written = orjson.loads(value)
    original_bytes = written["event"].pop("original_bytes")
    assert written == {"event_id": "e-9", "key": "s-9", "score": 0.99, "reasons": ["big"], "event": {"event_id": "e-9", "truncated": True}}
    assert len(blob) < original_bytes < len(blob) + 200
    assert record["event"]["blob"] is blob  # the caller's record is left alone


def test_a_record_of_exactly_the_limit_is_kept_whole():
    def record_of(padding: int) -> dict[str, Any]:
        return {"event_id": "e-1", "key": "s-1", "event": {"event_id": "e-1", "note": "y" * padding}}

    base = len(orjson.dumps(record_of(0)))
    at_limit = record_of(MAX_ANOMALY_BYTES - base)
    _, value = encode_record(at_limit)
    assert len(value) == MAX_ANOMALY_BYTES and orjson.loads(value) == at_limit
    _, value = encode_record(record_of(MAX_ANOMALY_BYTES - base + 1))
    assert orjson.loads(value)["event"]["truncated"] is True


def test_encode_anomalies_are_the_encoded_anomaly_records_in_input_order(scored):
    pipeline, decoded, result = scored
    encoded = encode_anomalies(pipeline, decoded, result, SOURCES)
    assert [(i, key) for i, key, _ in encoded] == [(1, b"s-2"), (3, None)]
    values = [orjson.loads(value) for _, _, value in encoded]
    assert [(v["event_id"], v["source"]["offset"], v["timestamp"]) for v in values] == [
        ("e-2", 102, "2026-01-05T10:00:02.250Z"),
        ("e-4", 104, "2026-01-05T10:00:04.250Z"),
    ]


def test_a_silent_store_gives_a_store_stopped_record_like_the_readme_says():
    p = math.exp(-12.0)
    alert = SilenceAlert("s-022", MONDAY + 12 * 3600 + 12 * 60, MONDAY + 12 * 3600, 12.0, p)
    before = time.time()
    record = silence_record(alert, "store_id", 0.9999)
    after = time.time()
    detected_at = record.pop("detected_at")
    assert before - 0.001 <= parse_iso(detected_at) <= after + 0.001
    assert record == {
        "event_id": None,
        "kind": "store_stopped",
        "key": "s-022",
        "key_set": "store_id",
        "timestamp": "2026-01-05T12:12:00.000Z",
        "score": 1.0 - p,
        "surprise": pytest.approx(-math.log10(p)),
        "threshold": 0.9999,
        "detectors": {
            "silence": {
                "score": 1.0 - p,
                "tail_probability": p,
                "surprise": pytest.approx(-math.log10(p)),
                "fired": True,
                "key_set": "store_id",
                "silent_since": "2026-01-05T12:00:00.000Z",
                "expected_events": 12.0,
            }
        },
        # The README's example reason, word for word.
        "reasons": ["store_id s-022 has sent nothing for 12 min; 12.0 events were expected by now (chance of such a silence 6.1e-06)"],
        "event": None,
    }
    key, value = encode_record({**record, "detected_at": detected_at})
    assert key == b"s-022" and orjson.loads(value)["event"] is None


def test_a_silent_key_of_another_key_set_is_key_stopped():
    alert = SilenceAlert("p-0092|EUR", MONDAY + 600.0, MONDAY, 8.0, math.exp(-8.0))
    record = silence_record(alert, "product_id+currency", 0.9999)
    assert record["kind"] == "key_stopped" and record["key"] == "p-0092|EUR" and record["key_set"] == "product_id+currency"
    assert record["detectors"]["silence"]["key_set"] == "product_id+currency"
    assert record["reasons"][0].startswith("product_id+currency p-0092|EUR has sent nothing for 10 min")


def test_a_long_silence_keeps_a_finite_surprise_where_its_probability_underflows():
    alert = SilenceAlert("s-1", MONDAY + 86_400.0, MONDAY, 800.0, math.exp(-800.0))
    record = silence_record(alert, "store_id", 0.9999)
    assert alert.probability == 0.0 and record["score"] == 1.0
    assert record["surprise"] == pytest.approx(800.0 / math.log(10.0))  # -log10(exp(-800)) = 347.4


def test_replay_lines_give_one_line_per_raw_record_in_input_order(scored):
    pipeline, decoded, result = scored
    lines = replay_lines(decoded, result, line_numbers=[11, 12, 13, 14, 15, 16])
    assert [raw for raw, _ in lines] == [0, 1, 2, 3, 4, 5]
    by_raw = dict(lines)
    assert set(by_raw[1]) == {"line", "error"} and by_raw[1]["line"] == 12 and by_raw[1]["error"].startswith("invalid_json: ")
    assert by_raw[5]["line"] == 16 and by_raw[5]["error"].startswith("not_an_object: ")
    expected = {
        0: ("e-0", "s-1", 0.0, False, 0.5),
        2: ("e-2", "s-2", 0.98, True, 0.99),
        3: ("e-3", "s-3", 0.88, False, 0.94),
        4: ("e-4", None, 0.92, True, 0.96),
    }
    for raw, (event_id, key, score, is_anomaly, risk) in expected.items():
        line = by_raw[raw]
        assert set(line) == {"event_id", "key", "score", "surprise", "is_anomaly", "detectors"}
        assert (line["event_id"], line["key"], line["is_anomaly"]) == (event_id, key, is_anomaly)
        assert line["score"] == pytest.approx(score, abs=1e-12)
        assert line["surprise"] == pytest.approx(-math.log10(min(1.0, 2 * (1 - risk))), abs=1e-12) and type(line["surprise"]) is float
        assert line["detectors"] == {"amount_risk": pytest.approx(risk, abs=1e-12), "quiet": 0.0}
        assert type(line["is_anomaly"]) is bool and type(line["score"]) is float
    orjson.dumps([line for _, line in lines])  # every line is JSON as it is


def test_replay_lines_of_a_batch_with_no_valid_event():
    pipeline = make_pipeline()
    decoded = decode_batch([b"", b"{}"], EventSchema())
    result = pipeline.process(decoded.features)
    lines = replay_lines(decoded, result, [1, 2])
    assert [(raw, line["line"], line["error"].split(":")[0]) for raw, line in lines] == [(0, 1, "invalid_json"), (1, 2, "missing_field")]


def test_dead_letter_headers_name_the_reason_and_the_source():
    bad = InvalidRecord(3, "wrong_type", "amount must be a number, got string")
    assert dead_letter_headers(bad, "sales", 2, 6712) == [
        ("dlq.reason", b"wrong_type"),
        ("dlq.detail", b"amount must be a number, got string"),
        ("dlq.source.topic", b"sales"),
        ("dlq.source.partition", b"2"),
        ("dlq.source.offset", b"6712"),
    ]
    # A detail that is not valid text (a lone surrogate from the record) is still a header.
    odd = dict(dead_letter_headers(InvalidRecord(0, "invalid_json", "bad \ud800 é"), "t", 0, 0))
    assert odd["dlq.detail"] == "bad ? é".encode()
