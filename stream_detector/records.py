"""Encode what the pipeline decided into output records (anomalies, replay lines, dead letters)."""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import orjson

from stream_detector.events.decode import DecodedBatch, InvalidRecord
from stream_detector.events.event_time import iso_utc
from stream_detector.features import original_value
from stream_detector.scoring.level_shift import LevelShift
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

# Below librdkafka's default message.max.bytes (1,000,000) with room for headers.
MAX_ANOMALY_BYTES = 900_000


class Sources(Protocol):
    """The input position (topic, partition, offset) of record ``j`` of a raw batch: a list, or
    something that builds them only for the records asked for."""

    def __getitem__(self, j: int, /) -> dict[str, Any]: ...


def anomaly_record(
    pipeline: ScoringPipeline,
    decoded: DecodedBatch,
    result: BatchResult,
    i: int,
    source: dict[str, Any] | None = None,
    explained: tuple[dict[str, Any], list[str]] | None = None,
) -> dict[str, Any]:
    """The output-topic record for anomalous event ``i`` of the batch.

    ``source`` (input topic, partition, offset) lets a reader trace the alert to its record.
    ``explained``: ``pipeline.explain(result, i)`` if the caller has it already.
    """
    details, reasons = explained if explained is not None else pipeline.explain(result, i)
    record = {
        "event_id": decoded.features.event_ids[i],
        "key": decoded.keys[i],
        # False while the event's key is still learning (scored by the global statistics).
        "warm": bool(details.get("zscore", {}).get("warm", True)),
        "timestamp": iso_utc(float(decoded.features.event_time[i])),
        "score": float(result.fused[i]),
        # -log10 of the fused tail probability, not floored: ranks alerts whose scores tie at 1 - k * 1e-12.
        "surprise": float(result.surprise[i]),
        "threshold": result.threshold,
        "detectors": details,
        "reasons": reasons,
        "event": decoded.events[i],
        "detected_at": iso_utc(time.time()),
    }
    if source is not None:
        record["source"] = source
    if i in decoded.clamped:  # processing.future_timestamps: clamp; "timestamp" is the clamped time
        record["timestamp_clamped_from"] = iso_utc(decoded.clamped[i])
    return record


def anomaly_records(pipeline: ScoringPipeline, decoded: DecodedBatch, result: BatchResult, sources: Sources | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(index in the valid batch, record) for every anomaly, in input order.

    ``sources``, if given, holds the input position of every record of the raw batch.
    """
    flagged = result.is_anomaly.nonzero()[0].tolist()
    explained = pipeline.explain_many(result, flagged)
    return [
        (i, anomaly_record(pipeline, decoded, result, i, sources[int(decoded.source_index[i])] if sources is not None else None, why))
        for i, why in zip(flagged, explained, strict=True)
    ]


def encode_record(record: dict[str, Any]) -> tuple[bytes | None, bytes]:
    """(key, value) of an output record."""
    key = record.get("key")
    value = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    if len(value) > MAX_ANOMALY_BYTES:
        # A huge pass-through event must not make the alert unproducible (and the batch
        # retried forever): keep the alert, cut the copy of the event.
        record = {**record, "event": {"event_id": record["event_id"], "truncated": True, "original_bytes": len(value)}}
        value = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    return (key.encode() if key is not None else None), value


def encode_anomalies(
    pipeline: ScoringPipeline, decoded: DecodedBatch, result: BatchResult, sources: Sources | None = None
) -> list[tuple[int, bytes | None, bytes]]:
    """(index in the valid batch, key, value) for every anomaly, in input order."""
    return [(i, *encode_record(record)) for i, record in anomaly_records(pipeline, decoded, result, sources)]


def silence_record(alert: Any, key_set: str, threshold: float) -> dict[str, Any]:
    """The output-topic record for a key that went silent (no event to attach it to)."""
    return {
        "event_id": None,
        "kind": "store_stopped" if key_set == "store_id" else "key_stopped",
        "key": alert.key,
        "key_set": key_set,
        "timestamp": iso_utc(alert.event_time),
        "score": 1.0 - alert.probability,
        "surprise": _silence_surprise(alert),
        "threshold": threshold,
        "detectors": {
            "silence": {
                "score": 1.0 - alert.probability,
                "tail_probability": alert.probability,
                "surprise": _silence_surprise(alert),
                "fired": True,
                "key_set": key_set,
                "silent_since": iso_utc(alert.since),
                "expected_events": alert.expected_events,
            }
        },
        "reasons": [alert.reason(key_set)],
        "event": None,
        "detected_at": iso_utc(time.time()),
    }


def level_shift_record(shift: LevelShift, threshold: float) -> dict[str, Any]:
    """The output-topic record for a declared level shift (scoring/level_shift.py): one per
    lasting change. Its ``event_id`` is the shift's own id, the one feedback names (``accept``
    keeps the new level, ``reject`` restores the old baseline)."""
    old, new = original_value(shift.feature, shift.old_level), original_value(shift.feature, shift.new_level)
    field = shift.feature.removeprefix("log_")
    reason = (
        f"{field} of {shift.key_set} {shift.key} moved from about {old:,.4g} to about {new:,.4g} "
        f"for {shift.events} events in a row since {iso_utc(shift.began)}: learned as its new level"
    )
    return {
        "event_id": shift.shift_id,
        "kind": "level_shift",
        "key": shift.key,
        "key_set": shift.key_set,
        "feature": shift.feature,
        "old_level": old,
        "new_level": new,
        "began": iso_utc(shift.began),
        "events_since": shift.events,
        "timestamp": iso_utc(shift.event_time),
        "declared_at_event": shift.event_id,
        # 1 - the chance of such a run without a change (floored like the other records' scores).
        "score": 1.0 - max(10.0**-shift.surprise, 1e-12),
        "surprise": shift.surprise,
        "threshold": threshold,
        "detectors": {"level_shift": {"fired": True, "feature": shift.feature, "z": 1.0 if new >= old else -1.0, "surprise": shift.surprise}},
        "reasons": [reason],
        "event": None,
        "detected_at": iso_utc(time.time()),
    }


def _silence_surprise(alert: Any) -> float:
    """``-log10`` of a silence's probability ``exp(-expected_events)`` (detectors/silence.py),
    from its exponent: it does not underflow to 0 for a long silence."""
    return float(alert.expected_events) / math.log(10.0)


def replay_lines(decoded: DecodedBatch, result: BatchResult, line_numbers: list[int]) -> list[tuple[int, dict[str, Any]]]:
    """(raw index, replay line) for each event, valid and invalid, of one batch."""
    lines: list[tuple[int, dict[str, Any]]] = []
    names = list(result.probability)
    surprise = result.surprise
    for i, raw_index in enumerate(decoded.source_index.tolist()):
        lines.append(
            (
                raw_index,
                {
                    "event_id": decoded.features.event_ids[i],
                    "key": decoded.keys[i],
                    "score": float(result.fused[i]),
                    "surprise": float(surprise[i]),
                    "is_anomaly": bool(result.is_anomaly[i]),
                    "detectors": {name: float(1.0 - result.probability[name][i]) for name in names},
                },
            )
        )
        if i in decoded.clamped:
            lines[-1][1]["timestamp_clamped_from"] = iso_utc(decoded.clamped[i])
    for bad in decoded.invalid:
        lines.append((bad.index, {"line": line_numbers[bad.index], "error": f"{bad.reason}: {bad.detail}"}))
    lines.sort(key=lambda item: item[0])
    return lines


def dead_letter_headers(bad: InvalidRecord, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("dlq.reason", bad.reason.encode()),
        ("dlq.detail", bad.detail.encode("utf-8", "replace")),
        ("dlq.source.topic", topic.encode()),
        ("dlq.source.partition", str(partition).encode()),
        ("dlq.source.offset", str(offset).encode()),
    ]
