"""``evaluate``: labelled events through the daemon's scoring path, micro-batch by micro-batch,
then the decisions against the labels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import orjson

from stream_detector.evaluation.labels import (
    DEFAULT_WINDOW_GRACE_S,
    POINT_KINDS,
    WINDOW_KINDS,
    ChangeLabel,
    CollectiveAlert,
    CollectiveAlertsFn,
    Labels,
    as_alert,
    match_windows,
)
from stream_detector.evaluation.measures import NORMAL_RUN, change_stats, point_measures, ranking_stats, window_stats
from stream_detector.evaluation.report import ChangeSummary, EvaluationReport, Series
from stream_detector.evaluation.shape import DeploymentScorer
from stream_detector.events.decode import DecodedBatch, EventSchema
from stream_detector.scoring.batch import ScoredBatch, score_batch
from stream_detector.scoring.level_shift import LevelShift
from stream_detector.scoring.pipeline import ScoringPipeline


def evaluate(
    events: Iterable[bytes | str | dict],
    labels: Labels,
    pipeline: ScoringPipeline,
    schema: EventSchema,
    batch_size: int,
    collective_alerts_fn: CollectiveAlertsFn | None = None,
    *,
    skip_warmup: int = 0,
    window_grace_s: float = DEFAULT_WINDOW_GRACE_S,
    progress: Callable[[int], None] | None = None,
    keep_series: bool = True,
    deployment: DeploymentScorer | None = None,
) -> EvaluationReport:
    """Score ``events`` (raw JSON values, or dicts) with ``pipeline`` in micro-batches of
    ``batch_size``, exactly as the daemon does, and compare with ``labels`` (package docstring).
    With ``deployment``, the events are scored as that deployment's partitions and instances
    would score them (evaluation/shape.py) instead, and ``pipeline`` is not used."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    started = time.monotonic()
    names = pipeline.detector_names
    kind_codes: dict[str, int] = {kind: i + 1 for i, kind in enumerate(POINT_KINDS)}
    parts: dict[str, list[np.ndarray]] = {"position": [], "time": [], "fused": [], "surprise": [], "flagged": [], "kind": [], "fired": []}
    alerts: list[CollectiveAlert] = []
    seen_labelled: set[str] = set()
    records = invalid_counted = valid = 0
    # Per change label (by index in labels.changes): the valid events of its key from its start on.
    changed_parts: dict[int, list[np.ndarray]] = {}
    shifts: list[LevelShift] = []

    for positions, scored in _scored(events, pipeline, schema, batch_size, deployment):
        decoded, result = scored.decoded, scored.result
        if collective_alerts_fn is not None:
            alerts.extend(as_alert(a) for a in collective_alerts_fn(decoded, result))
        else:  # the pipeline's own timers (keys that went silent)
            alerts.extend(CollectiveAlert(a.key, a.event_time, detector="silence") for a in result.collective)
        shifts += result.level_shifts
        invalid_counted += sum(1 for bad in decoded.invalid if positions[bad.index] >= skip_warmup)
        codes = np.zeros(decoded.features.n, dtype=np.int16)
        for i, event_id in enumerate(decoded.features.event_ids.tolist()):
            label_kind = labels.points.get(event_id)
            if label_kind is not None:
                seen_labelled.add(event_id)
                codes[i] = kind_codes.setdefault(label_kind, len(kind_codes) + 1)
        for c, hits in _changed_events(labels, decoded).items():
            changed_parts.setdefault(c, []).append(valid + hits)
        valid += decoded.features.n
        parts["position"].append(positions[decoded.source_index])
        parts["time"].append(decoded.features.event_time)
        parts["fused"].append(result.fused)
        parts["surprise"].append(result.surprise)
        parts["flagged"].append(result.is_anomaly)
        parts["kind"].append(codes)
        fired = result.fired()
        parts["fired"].append(np.column_stack([fired[name] for name in names]) if names else np.zeros((decoded.features.n, 0), dtype=bool))
        records += len(positions)
        if progress is not None:
            progress(records)

    def cat(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.concatenate(parts[name]) if parts[name] else np.zeros((0, *shape), dtype=dtype)

    position = cat("position", np.int64)
    event_time = cat("time", np.float64)
    fused = cat("fused", np.float64)
    surprise = cat("surprise", np.float64)
    flagged = cat("flagged", bool)
    kind_code = cat("kind", np.int16)
    fired_all = cat("fired", bool, (len(names),))
    # In stream order (a deployment scores partition by partition); the changed events' indexes
    # follow their events.
    order = np.argsort(position, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    position, event_time, fused, surprise, flagged = position[order], event_time[order], fused[order], surprise[order], flagged[order]
    kind_code, fired_all = kind_code[order], fired_all[order]
    kinds = [name for name, _ in sorted(kind_codes.items(), key=lambda item: item[1])]
    counted = position >= skip_warmup
    changes = None
    if labels.changes:
        # Events of a changed key after its change are not point anomalies nor normal events:
        # they are measured per change, and left out of the point metrics.
        changed = np.zeros(position.size, dtype=bool)
        stats = []
        for c, change in enumerate(labels.changes):
            idx = np.sort(rank[np.concatenate(changed_parts.get(c, [np.zeros(0, dtype=np.int64)]))])
            idx = idx[counted[idx]]
            changed[idx] = True
            found = sum(1 for shift in shifts if _names(shift, change))
            stats.append(change_stats(change, flagged[idx], kind_code[idx] > 0, shifts=found))
        in_changes = counted & changed
        changes = ChangeSummary(stats, NORMAL_RUN, int(in_changes.sum()), int((in_changes & (kind_code > 0)).sum()))
        point_counted = counted & ~changed
    else:
        point_counted = counted
    measures = point_measures(point_counted, fused, flagged, kind_code, fired_all, kinds, names)

    first_time = float(event_time[counted][0]) if counted.any() else math.inf
    windows = [w for w in labels.windows if skip_warmup == 0 or w.start >= first_time]
    counted_alerts = [a for a in alerts if skip_warmup == 0 or a.event_time >= first_time]
    matches, unmatched = match_windows(windows, counted_alerts, window_grace_s)
    window_kinds = list(dict.fromkeys([*WINDOW_KINDS, *(w.kind for w in labels.windows)]))
    windows_by_kind = {wk: window_stats(wk, [m for m in matches if m.window.kind == wk], bool(alerts)) for wk in window_kinds}
    notes = [w.note for w in windows_by_kind.values() if w.note]
    labels_not_seen = sum(1 for event_id in labels.points if event_id not in seen_labelled)
    if labels_not_seen:
        notes.append(f"{labels_not_seen} point label(s) name an event id that never appeared among valid events")

    return EvaluationReport(
        records=records,
        invalid=invalid_counted,
        skip_warmup=skip_warmup,
        window_grace_s=window_grace_s,
        labels_not_seen=labels_not_seen,
        threshold=pipeline.threshold,
        batch_size=batch_size,
        seconds=time.monotonic() - started,
        windows=windows_by_kind,
        collective_alerts=len(counted_alerts),
        collective_false_alarms=len(unmatched),
        notes=notes,
        series=Series(position, event_time, fused, flagged, kind_code, kinds) if keep_series else None,
        ranking=ranking_stats(point_counted, fused, surprise, flagged, kind_code),
        changes=changes,
        level_shifts=len(shifts),
        level_shifts_unmatched=sum(1 for shift in shifts if not any(_names(shift, change) for change in labels.changes)),
        **measures,
    )


def _scored(
    events: Iterable[bytes | str | dict], pipeline: ScoringPipeline, schema: EventSchema, batch_size: int, deployment: DeploymentScorer | None
) -> Iterator[tuple[np.ndarray, ScoredBatch]]:
    """(stream positions of the records, their scored batch): micro-batches of one pipeline, or
    a deployment's partitions window by window."""
    position = 0
    size = batch_size if deployment is None else deployment.deployment.window
    for values in _batches(events, size):
        if deployment is None:
            yield np.arange(position, position + len(values)), score_batch(pipeline, schema, values)
        else:
            yield from deployment.score(values, position)
        position += len(values)


def _names(shift: LevelShift, change: ChangeLabel) -> bool:
    """Whether a level shift is of the change's key: its key set holds the change's field (a
    product's change shows in product_id+currency once per currency) with the same value."""
    fields = shift.key_set.split("+")
    if change.key_set not in fields:
        return False
    return shift.key.split("|")[fields.index(change.key_set)] == change.key


def _changed_events(labels: Labels, decoded: DecodedBatch) -> dict[int, np.ndarray]:
    """For each change label known now, the valid events of this batch (their index in it) whose
    key it names, at or after its start. A generator adds a change label before it yields the
    first changed event, so every changed event is matched."""
    if not labels.changes or not decoded.events:
        return {}
    event_time = decoded.features.event_time
    values: dict[str, np.ndarray] = {}
    hits = {}
    for c, change in enumerate(labels.changes):
        if change.key_set not in values:
            values[change.key_set] = np.array([None if (v := e.get(change.key_set)) is None else str(v) for e in decoded.events], dtype=object)
        mine = np.flatnonzero((values[change.key_set] == change.key) & (event_time >= change.start))
        if mine.size:
            hits[c] = mine
    return hits


def _batches(events: Iterable[bytes | str | dict], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for event in events:
        if isinstance(event, dict):
            batch.append(orjson.dumps(event))
        elif isinstance(event, str):
            batch.append(event.encode())
        else:
            batch.append(event)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
