"""Decode a whole batch of raw record values into columns, splitting off the invalid ones.

Strict validation without a per-event model: each record is parsed once with orjson, then
every field is checked column-wise. A record that fails any check is reported with a short,
bounded ``reason`` (it becomes a metric label and a dead-letter header) and a detail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

import numpy as np
import orjson

from stream_detector.events.event_time import FUTURE_TIMESTAMP, TimeLimit
from stream_detector.features import FeatureBatch, add_derived_features

# Bounded set of dead-letter reasons (metric label values).
REASONS = (
    "oversized",
    "not_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "not_finite",
    "out_of_range",
    "invalid_timestamp",
    "unsupported_version",
    FUTURE_TIMESTAMP,  # past max(watermark, clock) + processing.max_future_skew (events/event_time.py)
)

STRING_FIELDS = ("event_id", "store_id", "product_id", "currency", "channel", "customer_id")
# Epoch milliseconds outside [1990, 2200) are treated as a unit mistake, not a date.
_MIN_EPOCH_S = 631_152_000.0
_MAX_EPOCH_S = 7_258_118_400.0


@dataclass(frozen=True)
class InvalidRecord:
    index: int  # position in the raw batch
    reason: str  # one of REASONS
    detail: str


@dataclass(frozen=True)
class DecodedBatch:
    """Valid events as columns plus the invalid records, both indexed into the raw batch."""

    features: FeatureBatch
    events: list[dict[str, Any]]  # the original valid events (passed through in records)
    keys: np.ndarray  # object (n,): the record key, from schema.key_fields
    source_index: np.ndarray  # int64 (n,): position of each valid event in the raw batch
    invalid: list[InvalidRecord]
    # Valid events whose time was clamped (processing.future_timestamps: clamp): position in
    # the valid events -> the original event time (features.event_time holds the clamped one).
    clamped: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EventSchema:
    key_fields: tuple[str, ...] = ("store_id",)
    feature_fields: tuple[str, ...] = ("amount", "quantity", "unit_price")
    max_record_bytes: int = 1_048_576
    max_abs_value: float = 1e9
    max_event_version: int = 1
    # Key sets the detectors keep per-key state for (each a tuple of event fields).
    key_sets: tuple[tuple[str, ...], ...] = (("store_id",),)


def decode_batch(values: Sequence[bytes | None], schema: EventSchema, time_limit: TimeLimit | None = None) -> DecodedBatch:
    """Parse and validate ``values``; every input index ends up valid or in ``invalid``.

    ``time_limit``: the partition's event time guard for this batch (events/event_time.py); an
    otherwise valid event past it is invalid (``future_timestamp``) or clamped.
    """
    invalid: list[InvalidRecord] = []
    docs = _parse_all(values, schema)
    if docs is not None:  # the common case: every record is a JSON object
        doc_index = list(range(len(docs)))
    else:
        docs, doc_index = [], []
        for i, value in enumerate(values):
            doc = _parse_one(i, value, schema, invalid)
            if doc is not None:
                docs.append(doc)
                doc_index.append(i)

    ok = np.ones(len(docs), dtype=bool)
    problems: dict[int, tuple[str, str]] = {}
    event_ids = _string_column(docs, "event_id", required=True, problems=problems)
    event_time = _timestamps(docs, problems)
    numeric = {name: _numeric_column(docs, name, name == "amount", schema.max_abs_value, problems) for name in schema.feature_fields}
    string_fields = dict.fromkeys([*STRING_FIELDS[1:], *schema.key_fields, *(f for ks in schema.key_sets for f in ks)])
    strings = {name: _string_column(docs, name, required=False, problems=problems) for name in string_fields}
    _check_versions(docs, schema.max_event_version, problems)
    clamped = _check_future(event_time, time_limit, problems) if time_limit is not None else {}
    for j, (reason, detail) in problems.items():
        ok[j] = False
        invalid.append(InvalidRecord(doc_index[j], reason, detail))

    keep = np.flatnonzero(ok)
    doc_index_arr = np.asarray(doc_index, dtype=np.int64)[keep]
    columns = {name: col[keep] for name, col in numeric.items()}
    event_time = event_time[keep]
    key_columns = {name: col[keep] for name, col in strings.items()}
    features = FeatureBatch(
        event_time=event_time,
        columns=add_derived_features(columns, event_time),
        keys={_key_set_name(ks): _join_keys(key_columns, ks) for ks in schema.key_sets},
        event_ids=event_ids[keep],
        fingerprints=fingerprints([docs[j] for j in keep]),
    )
    invalid.sort(key=lambda r: r.index)
    return DecodedBatch(
        features=features,
        events=[docs[j] for j in keep],
        keys=_join_keys(key_columns, schema.key_fields),
        source_index=doc_index_arr,
        invalid=invalid,
        clamped={int(np.searchsorted(keep, j)): original for j, original in clamped.items()},
    )


def _check_future(event_time: np.ndarray, limit: TimeLimit, problems: dict[int, tuple[str, str]]) -> dict[int, float]:
    """Apply the event time guard to the otherwise valid events, in order: those past the limit
    become problems (dead_letter) or get the clamped time in ``event_time`` (clamp, in place).
    Returns {doc position: original time} of the clamped ones."""
    candidates = np.flatnonzero(~np.isin(np.arange(len(event_time)), list(problems))) if problems else np.arange(len(event_time))
    found = limit.check(event_time[candidates])
    clamped: dict[int, float] = {}
    for k, position in enumerate(found.index.tolist()):
        j = int(candidates[position])
        original = float(event_time[j])
        if limit.mode == "clamp":
            clamped[j] = original
            event_time[j] = found.clamped_to[k]
        else:
            problems[j] = (FUTURE_TIMESTAMP, found.detail(k, original, limit.max_future_skew))
    return clamped


def fingerprints(docs: list[dict[str, Any]]) -> np.ndarray:
    """Stable 64-bit hash of each event without its event_id: equal for re-sent copies.

    The blake2b digest of the key-sorted JSON of every other field, read as a little-endian
    uint64 (the values snapshots of the duplicates detector hold).
    """
    dumps, sort_keys, blake2b = orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.blake2b
    digests = []
    for doc in docs:
        body = doc.copy()  # a C-level copy; cheaper than a filtering comprehension
        body.pop("event_id", None)
        digests.append(blake2b(dumps(body, option=sort_keys), digest_size=8).digest())
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def _key_set_name(fields: tuple[str, ...]) -> str:
    return "+".join(fields) or "global"


def key_set_name(fields: Sequence[str]) -> str:
    """The name a key set's column has in ``FeatureBatch.keys`` (fields joined by '+')."""
    return _key_set_name(tuple(fields))


def _parse_all(values: Sequence[bytes | None], schema: EventSchema) -> list[dict[str, Any]] | None:
    """All records parsed at once, or None if any is not a JSON object of a valid size (then
    ``_parse_one`` finds and reports the offenders record by record)."""
    if not values or not _none_missing(values) or max(map(len, values)) > schema.max_record_bytes:
        return None
    try:
        docs = list(map(orjson.loads, values))
    except orjson.JSONDecodeError:
        return None
    return docs if set(map(type, docs)) == {dict} else None


def _none_missing(values: Sequence[bytes | None]) -> TypeGuard[Sequence[bytes]]:
    """No null record values (one C-level scan)."""
    return None not in values


def _all_ints(values: list[Any]) -> TypeGuard[list[int]]:
    """Every value is an int (a bool is not)."""
    return set(map(type, values)) == {int}


def _parse_one(i: int, value: bytes | None, schema: EventSchema, invalid: list[InvalidRecord]) -> dict[str, Any] | None:
    if value is None:
        invalid.append(InvalidRecord(i, "invalid_json", "empty record (null value)"))
        return None
    if len(value) > schema.max_record_bytes:
        invalid.append(InvalidRecord(i, "oversized", f"{len(value)} bytes > max_record_bytes {schema.max_record_bytes}"))
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        reason = "not_utf8" if "utf-8" in message.lower() else "invalid_json"
        invalid.append(InvalidRecord(i, reason, message[:200]))
        return None
    if not isinstance(doc, dict):
        invalid.append(InvalidRecord(i, "not_an_object", f"top-level JSON {type(doc).__name__}, expected an object"))
        return None
    return doc


def _string_column(docs: list[dict[str, Any]], name: str, required: bool, problems: dict[int, tuple[str, str]]) -> np.ndarray:
    values = [doc.get(name) for doc in docs]
    column = np.empty(len(values), dtype=object)
    column[:] = values
    if required and "" in values:
        for j in [j for j, v in enumerate(values) if v == ""]:
            problems.setdefault(j, ("missing_field", f"{name} is empty"))
    # Fast path: all strings. Otherwise find the offenders (rare).
    if not set(map(type, values)) <= {str}:
        for j, v in enumerate(values):
            if v is None:
                if required:
                    problems.setdefault(j, ("missing_field", f"{name} is required"))
            elif type(v) is int and name != "event_id":
                column[j] = str(v)  # numeric ids are common (store 17): accept and keep as text
            elif type(v) is not str:
                problems.setdefault(j, ("wrong_type", f"{name} must be a string, got {_json_type(v)}"))
                column[j] = None
    return column


def _numeric_column(docs: list[dict[str, Any]], name: str, required: bool, limit: float, problems: dict[int, tuple[str, str]]) -> np.ndarray:
    values = [doc.get(name) for doc in docs]
    try:
        if not set(map(type, values)) <= {float, int}:  # bool is neither: the slow path says why
            raise TypeError
        column = np.asarray(values, dtype=np.float64)
    except (TypeError, OverflowError):
        column = np.full(len(values), np.nan)
        for j, v in enumerate(values):
            if v is None:
                if required:
                    problems.setdefault(j, ("missing_field", f"{name} is required"))
            elif type(v) not in (int, float):
                problems.setdefault(j, ("wrong_type", f"{name} must be a number, got {_json_type(v)}"))
            else:
                try:
                    column[j] = float(v)
                except OverflowError:
                    problems.setdefault(j, ("out_of_range", f"{name}={v} does not fit a float"))
    for j in np.flatnonzero(np.isinf(column)).tolist():
        problems.setdefault(j, ("not_finite", f"{name} is not finite"))
    for j in np.flatnonzero(np.abs(column) > limit).tolist():
        problems.setdefault(j, ("out_of_range", f"|{name}| = {column[j]:.6g} > {limit:.6g}"))
    if name == "quantity":
        for j in np.flatnonzero(column < 0).tolist():
            problems.setdefault(j, ("out_of_range", f"quantity {column[j]:.6g} is negative"))
    return column


def _timestamps(docs: list[dict[str, Any]], problems: dict[int, tuple[str, str]]) -> np.ndarray:
    """Epoch seconds from ISO-8601 strings or epoch milliseconds."""
    values = [doc.get("timestamp") for doc in docs]
    fast = _parse_utc_strings(values)
    if fast is not None:
        return _check_time_range(fast, problems)
    out = np.full(len(values), np.nan)
    for j, v in enumerate(values):
        if v is None:
            problems.setdefault(j, ("missing_field", "timestamp is required"))
        elif type(v) is str:
            try:
                parsed = datetime.fromisoformat(v)
            except ValueError:
                problems.setdefault(j, ("invalid_timestamp", f"timestamp {v[:40]!r} is not ISO-8601"))
                continue
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)  # naive times are taken as UTC
            out[j] = parsed.timestamp()
        elif type(v) is int or type(v) is float:
            out[j] = float(v) / 1000.0
        else:
            problems.setdefault(j, ("wrong_type", f"timestamp must be an ISO-8601 string or epoch milliseconds, got {_json_type(v)}"))
    return _check_time_range(out, problems)


def _parse_utc_strings(values: list[Any]) -> np.ndarray | None:
    """Vectorised parse when every value is a UTC ('Z') ISO string; None to take the slow path."""
    if not values or not set(map(type, values)) <= {str} or not all(v.endswith("Z") and len(v) >= 20 for v in values):
        return None
    try:
        parsed = np.array([v[:-1] for v in values], dtype="datetime64[ms]")
    except ValueError:
        return None
    return parsed.astype(np.int64) / 1000.0


def _check_time_range(out: np.ndarray, problems: dict[int, tuple[str, str]]) -> np.ndarray:
    bad = np.flatnonzero(~((out >= _MIN_EPOCH_S) & (out < _MAX_EPOCH_S)) & ~np.isnan(out))
    for j in bad:
        problems.setdefault(int(j), ("invalid_timestamp", f"timestamp {out[j] * 1000:.0f} ms is outside 1990..2200"))
    return out


def _check_versions(docs: list[dict[str, Any]], max_version: int, problems: dict[int, tuple[str, str]]) -> None:
    versions = [doc.get("version") for doc in docs]
    if set(map(type, versions)) <= {type(None)} or (_all_ints(versions) and min(versions) >= 1 and max(versions) <= max_version):
        return  # all absent or all supported: nothing to report
    for j, doc in enumerate(docs):
        version = doc.get("version")
        if version is None:
            continue
        if type(version) is not int or version < 1:
            problems.setdefault(j, ("wrong_type", f"version must be a positive integer, got {version!r}"[:120]))
        elif version > max_version:
            problems.setdefault(j, ("unsupported_version", f"event version {version} > supported {max_version}"))


def _join_keys(columns: dict[str, np.ndarray], fields: Sequence[str]) -> np.ndarray:
    """Key strings for a set of fields ('s-1|p-9'); None where any field is missing.

    No fields means one key for every event: the global key set.
    """
    if not fields:
        n = len(next(iter(columns.values()))) if columns else 0
        return np.full(n, "*", dtype=object)
    parts = [columns[f] for f in fields]
    if len(parts) == 1:
        return parts[0]
    out = np.empty(len(parts[0]), dtype=object)
    if any(None in p.tolist() for p in parts):
        out[:] = ["|".join(vs) if None not in vs else None for vs in zip(*parts, strict=True)]
    else:
        out[:] = list(map("|".join, zip(*parts, strict=True)))
    return out


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
