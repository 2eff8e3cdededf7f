"""Detection quality: run labelled events through the daemon's scoring pipeline and score it.

``evaluate`` feeds raw records through exactly what the daemon runs for every micro-batch
(``decode_batch`` then ``ScoringPipeline.process``, ``batch_size`` records at a time) and
compares the decisions with labels. The definitions (see also docs/evaluation.md):

* **Counted events.** Every input record has a position (0-based, invalid records included).
  Records before ``skip_warmup`` are scored (the models learn from them) but not counted.
  Records that fail decoding are counted as ``invalid`` and take no part in any metric.
* **Point labels** are matched to events by ``event_id``: an event is a positive of kind *k*
  when a label ``{"kind": k, "event_id": id}`` names its id, otherwise it is normal. Every
  event of a refund burst carries its own label and counts on its own (a burst of 10 refunds
  of which 7 are flagged gives 7 of 10); a ``duplicate`` label names the re-sent copy, not the
  original, which is a normal event. An event id that occurs more than once carries its label
  on every occurrence.
* **Overall metrics** are over point labels only: TP = flagged labelled events, FP = flagged
  normal events, FN = labelled events not flagged, TN = the rest. precision = TP/(TP+FP),
  recall = TP/(TP+FN), F1 their harmonic mean, false-positive rate = FP/(FP+TN).
* **Per kind** *k*: recall = flagged events of kind *k* / events of kind *k*; precision and
  F1 are "kind *k* against normal events": precision_k = TP_k / (TP_k + FP), with events of
  other kinds left out. AUC is the ROC AUC of the fused score, kind *k* against normal events.
* **Window (collective) labels** such as ``store_stopped`` have a key (the store), a start and
  an end, and no event. A window is detected when a *collective alert* with the same key has an
  event time in ``[start, end + window_grace_s]`` (15 min by default); its detection delay is
  the first such alert's time minus ``start``. Collective alerts come from
  ``collective_alerts_fn``, called after every micro-batch; a point alert (an anomalous sale)
  never detects a window. Collective alerts that match no counted window are collective false
  alarms. With ``skip_warmup`` > 0, windows that start before the first counted event are left
  out.

``evaluate_dataset`` runs public labelled data (River's Shuttle and WaterFlow) through our
detectors and reports ROC AUCs next to River's own HalfSpaceTrees recipe.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from stream_detector.errors import ConfigError, StreamDetectorError
from stream_detector.events.decode import DecodedBatch, EventSchema, decode_batch
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

POINT_KINDS: tuple[str, ...] = ("price_spike", "quantity_burst", "decimal_error", "refund_burst", "duplicate")
WINDOW_KINDS: tuple[str, ...] = ("store_stopped",)
DEFAULT_WINDOW_GRACE_S = 15 * 60.0
PROGRESS_INTERVAL_S = 2.0
NO_COLLECTIVE_NOTE = "no collective alerts were produced (is silence.enabled false?), so {kind} recall is 0"

# ---------------------------------------------------------------------------------------------
# Labels and collective alerts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowLabel:
    """A collective anomaly: nothing (or something) happened for ``key`` in [start, end]."""

    kind: str
    key: str
    start: float  # epoch seconds
    end: float


@dataclass
class Labels:
    """Point labels by event id and window labels. Read lazily by ``evaluate``: a point label
    is looked up when its event's batch is scored, windows once the last event is scored, so
    a generator may add labels while it yields the events."""

    points: dict[str, str] = field(default_factory=dict)
    windows: list[WindowLabel] = field(default_factory=list)

    def add(self, label: Any) -> None:
        """Add a ``generator.Label`` or a label dict (the JSON-lines format of --labels)."""
        record = label.to_dict() if hasattr(label, "to_dict") else dict(label)
        kind = record.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ValueError("a label needs a 'kind'")
        if record.get("event_id") is not None:
            self.points[str(record["event_id"])] = kind
            return
        key = record.get("store_id", record.get("key"))
        if key is None or record.get("start") is None or record.get("end") is None:
            raise ValueError("a label needs an 'event_id', or a 'store_id' (or 'key') with 'start' and 'end'")
        start, end = _epoch_seconds(record["start"]), _epoch_seconds(record["end"])
        if end < start:
            raise ValueError(f"window ends before it starts: {record}")
        self.windows.append(WindowLabel(kind, str(key), start, end))

    @classmethod
    def from_records(cls, records: Iterable[Any]) -> Labels:
        labels = cls()
        for record in records:
            labels.add(record)
        return labels

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        """Labels from a JSON-lines file as written by ``stream-detector generate --labels``."""
        labels = cls()
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise ConfigError(f"--labels {path}: {exc.strerror}") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    labels.add(orjson.loads(line))
                except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                    raise ConfigError(f"--labels {path}, line {number}: {exc}") from None
        return labels


@dataclass(frozen=True)
class CollectiveAlert:
    """An alert about a key rather than an event (e.g. "store s-004 went silent")."""

    key: str
    event_time: float  # epoch seconds, in event time
    kind: str | None = None  # the window kind it is about; None matches any window kind
    detector: str = ""


#: Called after each micro-batch with what the pipeline saw and decided; returns the collective
#: alerts raised while processing it (a CollectiveAlert or a (key, event_time) pair each).
CollectiveAlertsFn = Callable[[DecodedBatch, BatchResult], Iterable["CollectiveAlert | tuple[str, float]"]]


@dataclass(frozen=True)
class WindowMatch:
    window: WindowLabel
    detected: bool
    first_alert: float | None  # epoch seconds of the first matching alert
    delay_s: float | None  # first_alert - window.start


def match_windows(
    windows: Sequence[WindowLabel], alerts: Sequence[CollectiveAlert], grace_s: float = DEFAULT_WINDOW_GRACE_S
) -> tuple[list[WindowMatch], list[CollectiveAlert]]:
    """Match collective alerts to windows: same key (and kind, unless the alert has none), event
    time in [start, end + grace_s]. Returns one match per window, in order, and the alerts that
    matched no window."""
    by_key: dict[str, list[CollectiveAlert]] = {}
    for alert in sorted(alerts, key=lambda a: a.event_time):
        by_key.setdefault(alert.key, []).append(alert)
    used: set[int] = set()
    matches = []
    for window in windows:
        first = None
        for alert in by_key.get(window.key, ()):
            if alert.kind is not None and alert.kind != window.kind:
                continue
            if window.start <= alert.event_time <= window.end + grace_s:
                used.add(id(alert))
                if first is None:
                    first = alert.event_time
        matches.append(WindowMatch(window, first is not None, first, None if first is None else first - window.start))
    unmatched = [a for a in alerts if id(a) not in used]
    return matches, unmatched


def _as_alert(item: CollectiveAlert | tuple[str, float]) -> CollectiveAlert:
    if isinstance(item, CollectiveAlert):
        return item
    key, event_time = item
    return CollectiveAlert(str(key), float(event_time))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties counted half); None when a class is empty."""
    y = np.asarray(y_true, dtype=bool)
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average 1-based ranks over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass
class KindStats:
    kind: str
    labelled: int
    flagged: int  # true positives
    precision: float | None  # kind against normal events: TP_k / (TP_k + FP)
    recall: float | None
    f1: float | None
    auc: float | None


@dataclass
class WindowStats:
    kind: str
    windows: int
    detected: int
    recall: float | None
    delay_median_s: float | None
    delay_mean_s: float | None
    delay_max_s: float | None
    note: str | None = None
    matches: list[WindowMatch] = field(default_factory=list)


@dataclass
class Series:
    """Per valid event, for plots: input position, event time, fused score, flag, kind code."""

    position: np.ndarray
    event_time: np.ndarray
    fused: np.ndarray
    flagged: np.ndarray
    kind_code: np.ndarray  # 0 normal, i: kinds[i - 1]
    kinds: list[str]


@dataclass
class EvaluationReport:
    records: int  # input records, valid or not
    invalid: int  # records that failed decoding (in the counted range)
    skip_warmup: int
    counted: int  # valid events counted
    normal: int
    labelled: int  # counted events with a point label
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float | None
    recall: float | None
    f1: float | None
    false_positive_rate: float | None
    auc: float | None
    kinds: dict[str, KindStats]
    windows: dict[str, WindowStats]
    collective_alerts: int
    collective_false_alarms: int
    detectors: dict[str, dict[str, Any]]  # name -> {"fired_normal", "fpr", "recall": {kind: r}}
    labels_not_seen: int  # point labels whose event id never appeared among valid events
    threshold: float
    batch_size: int
    window_grace_s: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    series: Series | None = None

    @property
    def events_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        def window(w: WindowStats) -> dict[str, Any]:
            return {
                "kind": w.kind,
                "windows": w.windows,
                "detected": w.detected,
                "recall": w.recall,
                "delay_median_s": w.delay_median_s,
                "delay_mean_s": w.delay_mean_s,
                "delay_max_s": w.delay_max_s,
                "note": w.note,
                "matches": [
                    {
                        "key": m.window.key,
                        "start": _iso(m.window.start),
                        "end": _iso(m.window.end),
                        "detected": m.detected,
                        "delay_s": m.delay_s,
                    }
                    for m in w.matches
                ],
            }

        return {
            "records": self.records,
            "invalid": self.invalid,
            "skip_warmup": self.skip_warmup,
            "counted": self.counted,
            "normal": self.normal,
            "labelled": self.labelled,
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "false_positive_rate": self.false_positive_rate,
            "auc": self.auc,
            "kinds": {k: vars(s).copy() for k, s in self.kinds.items()},
            "windows": {k: window(w) for k, w in self.windows.items()},
            "collective_alerts": self.collective_alerts,
            "collective_false_alarms": self.collective_false_alarms,
            "detectors": self.detectors,
            "labels_not_seen": self.labels_not_seen,
            "threshold": self.threshold,
            "batch_size": self.batch_size,
            "window_grace_s": self.window_grace_s,
            "seconds": self.seconds,
            "events_per_second": self.events_per_second,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """Progress lines on a stream (stderr), at most one every ``interval`` seconds."""

    def __init__(self, what: str, total: int | None = None, stream: IO[str] | None = None, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, done: int, unit: str = "events") -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        line = f"{self.what}: {done:,} {unit}"
        if self.total:
            pct = 100.0 * done / self.total
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            line = f"{self.what}: {done:,}/{self.total:,} {unit} ({pct:.1f} %), {rate:,.0f} {unit}/s, ~{eta:.0f} s left"
        else:
            line += f", {rate:,.0f} {unit}/s"
        print(line, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


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
) -> EvaluationReport:
    """Score ``events`` (raw JSON values, or dicts) with ``pipeline`` in micro-batches of
    ``batch_size``, exactly as the daemon does, and compare with ``labels`` (module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    started = time.monotonic()
    names = pipeline.detector_names
    k = len(names)
    kind_codes: dict[str, int] = {kind: i + 1 for i, kind in enumerate(POINT_KINDS)}
    parts: dict[str, list[np.ndarray]] = {"position": [], "time": [], "fused": [], "flagged": [], "kind": [], "fired": []}
    alerts: list[CollectiveAlert] = []
    seen_labelled: set[str] = set()
    records = invalid_counted = 0

    for values in _batches(events, batch_size):
        decoded = decode_batch(values, schema)
        result = pipeline.process(decoded.features)
        if collective_alerts_fn is not None:
            alerts.extend(_as_alert(a) for a in collective_alerts_fn(decoded, result))
        else:  # the pipeline's own timers (keys that went silent)
            alerts.extend(CollectiveAlert(a.key, a.event_time, detector="silence") for a in result.collective)
        invalid_counted += sum(1 for bad in decoded.invalid if records + bad.index >= skip_warmup)
        codes = np.zeros(decoded.features.n, dtype=np.int16)
        for i, event_id in enumerate(decoded.features.event_ids.tolist()):
            kind = labels.points.get(event_id)
            if kind is not None:
                seen_labelled.add(event_id)
                codes[i] = kind_codes.setdefault(kind, len(kind_codes) + 1)
        parts["position"].append(records + decoded.source_index)
        parts["time"].append(decoded.features.event_time)
        parts["fused"].append(result.fused)
        parts["flagged"].append(result.is_anomaly)
        parts["kind"].append(codes)
        probs = np.vstack([result.probability[name] for name in names]) if names else np.zeros((0, decoded.features.n))
        parts["fired"].append((1.0 - np.minimum(1.0, k * probs) > result.threshold).T)
        records += len(values)
        if progress is not None:
            progress(records)

    def cat(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.concatenate(parts[name]) if parts[name] else np.zeros((0, *shape), dtype=dtype)

    position = cat("position", np.int64)
    event_time = cat("time", np.float64)
    fused = cat("fused", np.float64)
    flagged = cat("flagged", bool)
    kind = cat("kind", np.int16)
    fired = cat("fired", bool, (k,))
    kinds = [name for name, _ in sorted(kind_codes.items(), key=lambda item: item[1])]
    counted = position >= skip_warmup
    report = _point_report(counted, fused, flagged, kind, fired, kinds, names)

    first_time = float(event_time[counted][0]) if counted.any() else math.inf
    windows = [w for w in labels.windows if skip_warmup == 0 or w.start >= first_time]
    counted_alerts = [a for a in alerts if skip_warmup == 0 or a.event_time >= first_time]
    matches, unmatched = match_windows(windows, counted_alerts, window_grace_s)
    window_kinds = list(dict.fromkeys([*WINDOW_KINDS, *(w.kind for w in labels.windows)]))
    window_stats = {wk: _window_stats(wk, [m for m in matches if m.window.kind == wk], bool(alerts)) for wk in window_kinds}
    notes = [w.note for w in window_stats.values() if w.note]
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
        windows=window_stats,
        collective_alerts=len(counted_alerts),
        collective_false_alarms=len(unmatched),
        notes=notes,
        series=Series(position, event_time, fused, flagged, kind, kinds) if keep_series else None,
        **report,
    )


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


def _point_report(
    counted: np.ndarray,
    fused: np.ndarray,
    flagged: np.ndarray,
    kind: np.ndarray,
    fired: np.ndarray,
    kinds: list[str],
    names: list[str],
) -> dict[str, Any]:
    fused, flagged, kind, fired = fused[counted], flagged[counted], kind[counted], fired[counted]
    positive = kind > 0
    normal = ~positive
    tp = int((flagged & positive).sum())
    fp = int((flagged & normal).sum())
    fn = int((~flagged & positive).sum())
    tn = int((~flagged & normal).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    per_kind: dict[str, KindStats] = {}
    for code, name in enumerate(kinds, start=1):
        mine = kind == code
        n_k, tp_k = int(mine.sum()), int((flagged & mine).sum())
        if n_k == 0 and name not in POINT_KINDS:
            continue
        p_k, r_k = _ratio(tp_k, tp_k + fp), _ratio(tp_k, n_k)
        subset = mine | normal
        per_kind[name] = KindStats(name, n_k, tp_k, p_k, r_k, _f1(p_k, r_k), roc_auc(mine[subset], fused[subset]))
    detectors = {}
    n_normal = int(normal.sum())
    for j, name in enumerate(names):
        fired_normal = int((fired[:, j] & normal).sum())
        detectors[name] = {
            "fired_normal": fired_normal,
            "false_positive_rate": _ratio(fired_normal, n_normal),
            "fired_anomalies": int((fired[:, j] & positive).sum()),
            "recall": {
                kname: _ratio(int((fired[:, j] & (kind == code)).sum()), int((kind == code).sum()))
                for code, kname in enumerate(kinds, start=1)
                if kname in per_kind
            },
        }
    return {
        "counted": int(counted.sum()),
        "normal": n_normal,
        "labelled": int(positive.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "false_positive_rate": _ratio(fp, fp + tn),
        "auc": roc_auc(positive, fused),
        "kinds": per_kind,
        "detectors": detectors,
    }


def _window_stats(kind: str, matches: list[WindowMatch], any_alerts: bool) -> WindowStats:
    delays = np.array([m.delay_s for m in matches if m.detected], dtype=np.float64)
    detected = int(delays.size)
    note = None
    if not any_alerts:
        note = (
            NO_COLLECTIVE_NOTE.format(kind=kind)
            if matches
            else (f"no collective alerts were produced (is silence.enabled false?), and the labels have no {kind} windows")
        )
    return WindowStats(
        kind=kind,
        windows=len(matches),
        detected=detected,
        recall=_ratio(detected, len(matches)) if matches else None,
        delay_median_s=float(np.median(delays)) if detected else None,
        delay_mean_s=float(delays.mean()) if detected else None,
        delay_max_s=float(delays.max()) if detected else None,
        note=note,
        matches=matches,
    )


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, plot
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_delay(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def format_report(report: EvaluationReport, source: str = "") -> str:
    r = report
    lines = [
        f"evaluated {r.records:,} records{f' ({source})' if source else ''} in {r.seconds:.1f} s "
        f"({r.events_per_second:,.0f} events/s); batch size {r.batch_size}, threshold {r.threshold}",
        f"counted {r.counted:,} events (first {r.skip_warmup:,} records skipped as warm-up, {r.invalid:,} invalid): "
        f"{r.normal:,} normal, {r.labelled:,} point anomalies",
        "",
        f"{'kind':<18}{'labelled':>9}{'flagged':>9}{'precision':>11}{'recall':>8}{'F1':>8}{'AUC':>8}",
    ]
    for s in r.kinds.values():
        lines.append(f"{s.kind:<18}{s.labelled:>9,}{s.flagged:>9,}{_fmt(s.precision):>11}{_fmt(s.recall):>8}{_fmt(s.f1):>8}{_fmt(s.auc):>8}")
    lines.append(f"{'all point kinds':<18}{r.labelled:>9,}{r.tp:>9,}{_fmt(r.precision):>11}{_fmt(r.recall):>8}{_fmt(r.f1):>8}{_fmt(r.auc):>8}")
    lines.append(
        f"{'normal':<18}{r.normal:>9,}{r.fp:>9,}   false-positive rate {_fmt(r.false_positive_rate, 5)} (TP {r.tp:,}, FP {r.fp:,}, FN {r.fn:,}, TN {r.tn:,})"
    )
    lines += ["", f"{'collective kind':<18}{'windows':>9}{'detected':>9}{'recall':>8}{'delay median':>14}{'delay max':>12}"]
    for w in r.windows.values():
        lines.append(f"{w.kind:<18}{w.windows:>9,}{w.detected:>9,}{_fmt(w.recall):>8}{_fmt_delay(w.delay_median_s):>14}{_fmt_delay(w.delay_max_s):>12}")
    lines.append(
        f"collective alerts: {r.collective_alerts:,}, matching no window: {r.collective_false_alarms:,} "
        f"(a window is detected by an alert for its key within [start, end + {r.window_grace_s / 60:.0f} min])"
    )
    if r.detectors:
        kinds = list(r.kinds)
        width = max(10, *(len(k) + 2 for k in kinds))
        lines += ["", "share of events on which each detector alone passes the threshold:"]
        lines.append(f"{'detector':<14}{'normal':>10}" + "".join(f"{k:>{width}}" for k in kinds))
        for name, d in r.detectors.items():
            lines.append(f"{name:<14}{_fmt(d['false_positive_rate'], 5):>10}" + "".join(f"{_fmt(d['recall'].get(k)):>{width}}" for k in kinds))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


_KIND_STYLE = {
    "price_spike": ("tab:red", "^"),
    "quantity_burst": ("tab:orange", "s"),
    "decimal_error": ("tab:purple", "D"),
    "refund_burst": ("tab:blue", "v"),
    "duplicate": ("tab:green", "o"),
}
_Y_CAP = 12.5


def plot_report(report: EvaluationReport, path: str | Path, title: str = "") -> Path:
    """Fused score over event time with labelled anomalies by kind and the threshold, and a
    panel of per-kind recall. Saved as PNG with the Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if report.series is None:
        raise ValueError("the report has no per-event series (evaluate(..., keep_series=False))")
    s = report.series
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(14, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1.3])

    # -log10(1 - fused): 1 - fused is the Bonferroni-adjusted tail probability, so the axis
    # reads "1 in 10^y"; the tick labels show the fused score itself.
    y = np.clip(-np.log10(np.clip(1.0 - s.fused, 1e-300, 1.0)), 0.0, _Y_CAP)
    x = s.event_time.astype("datetime64[s]") if s.event_time.size else s.event_time
    normal = s.kind_code == 0
    top.scatter(x[normal], y[normal], s=1, c="0.6", alpha=0.5, linewidths=0, rasterized=True, label="normal event")
    fp = normal & s.flagged
    if fp.any():
        top.scatter(x[fp], y[fp], s=14, c="black", marker="x", linewidths=0.8, label=f"flagged normal event ({int(fp.sum()):,})")
    for code, kind in enumerate(s.kinds, start=1):
        mine = s.kind_code == code
        if not mine.any():
            continue
        color, marker = _KIND_STYLE.get(kind, ("tab:brown", "P"))
        top.scatter(x[mine], y[mine], s=16, c=color, marker=marker, alpha=0.8, linewidths=0, label=f"{kind} ({int(mine.sum()):,})")
    for i, m in enumerate(m for w in report.windows.values() for m in w.matches):
        top.axvspan(
            np.datetime64(int(m.window.start), "s"),
            np.datetime64(int(m.window.end), "s"),
            color="tab:cyan",
            alpha=0.15,
            linewidth=0,
            label="store_stopped window" if i == 0 else None,
        )
    if report.skip_warmup and s.position.size:
        cut = s.position >= report.skip_warmup
        if cut.any():
            top.axvline(x[np.argmax(cut)], color="0.3", linestyle=":", label=f"end of warm-up ({report.skip_warmup:,} records)")
    threshold_y = -math.log10(1.0 - report.threshold)
    top.axhline(threshold_y, color="red", linestyle="--", linewidth=1, label=f"threshold {report.threshold}")
    ticks = list(range(0, 13, 2))
    top.set_yticks(ticks, ["0"] + [f"$1-10^{{-{t}}}$" for t in ticks[1:]])
    top.set_ylim(-0.2, _Y_CAP + 0.3)
    top.set_ylabel("fused score (log scale of 1 − score)")
    top.set_xlabel("event time (UTC)")
    top.set_title(title or f"fused score of {report.records:,} events")
    top.legend(loc="upper left", fontsize=8, markerscale=1.5, ncol=2, framealpha=0.9)
    top.grid(alpha=0.3)

    names = [k.kind for k in report.kinds.values()] + [w.kind for w in report.windows.values()]
    recalls = [k.recall for k in report.kinds.values()] + [w.recall for w in report.windows.values()]
    counts = [k.labelled for k in report.kinds.values()] + [w.windows for w in report.windows.values()]
    colors = [_KIND_STYLE.get(n, ("tab:cyan", ""))[0] for n in names]
    bars = bottom.bar(names, [r or 0.0 for r in recalls], color=colors)
    for bar, r, n, name in zip(bars, recalls, counts, names):
        text = f"{_fmt(r, 2)} (n={n:,})"
        if name in report.windows and report.windows[name].note:
            text += "\nno collective alerts"
        bottom.annotate(
            text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points"
        )
    bottom.set_ylim(0, 1.25)
    bottom.set_ylabel("recall")
    bottom.set_title(
        f"recall by kind; all point kinds: precision {_fmt(report.precision)}, recall {_fmt(report.recall)}, "
        f"F1 {_fmt(report.f1)}, false-positive rate {_fmt(report.false_positive_rate, 5)}",
        fontsize=10,
    )
    bottom.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Event sources for the CLI
# ---------------------------------------------------------------------------------------------


def generated_events(count: int, seed: int, anomaly_rate: float, labels: Labels) -> Iterator[bytes]:
    """The synthetic stream of ``stream-detector generate`` as raw JSON values, labels added
    to ``labels`` as their events are yielded (store-stopped windows at the end)."""
    from stream_detector.generator import GeneratorConfig, SalesGenerator

    generator = SalesGenerator(GeneratorConfig(seed=seed, anomaly_rate=anomaly_rate))
    for event, label in generator.generate(count):
        if label is not None:
            labels.add(label)
        yield orjson.dumps(event)
    for window in generator.window_labels:
        labels.add(window)


def file_events(path: str | Path) -> tuple[Iterator[bytes], int]:
    """Lines of a JSON-lines file (line endings stripped) and how many there are."""
    try:
        with open(path, "rb") as handle:
            total = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
            handle.seek(0, 2)
            if handle.tell():
                handle.seek(-1, 2)
                total += handle.read(1) != b"\n"
    except OSError as exc:
        raise ConfigError(f"--events {path}: {exc.strerror}") from None

    def lines() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            for line in handle:
                yield line.rstrip(b"\r\n")

    return lines(), total


def _epoch_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value) / 1000.0  # epoch milliseconds, as in events
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _iso(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Public labelled data sets (River)
# ---------------------------------------------------------------------------------------------

DATASETS = ("shuttle", "waterflow")
DOCSTRING_EVENTS = 10_000  # River's Shuttle docstring: take(10_000), RollingROCAUC(10_000)


@dataclass
class LoadedDataset:
    name: str
    X: np.ndarray  # (n, d) float64
    features: tuple[str, ...]
    y: np.ndarray | None  # bool (n,), None when the data set has no anomaly labels
    event_time: np.ndarray  # epoch seconds
    rows: list[dict[str, Any]]  # the River x dicts, for River's own models
    note: str = ""


@dataclass
class ModelScores:
    name: str
    scores: np.ndarray
    flagged: np.ndarray | None = None
    note: str = ""


@dataclass
class DatasetReport:
    dataset: str
    n: int
    anomalies: int | None
    features: tuple[str, ...]
    models: list[ModelScores]
    auc_all: dict[str, float | None]
    auc_first: dict[str, float | None]  # first DOCSTRING_EVENTS events
    auc_after_warmup: dict[str, float | None]  # events after calibration_min_events
    warmup: int
    river_docstring_rolling_auc: float | None
    flagged: int
    precision: float | None
    recall: float | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    event_time: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "events": self.n,
            "anomalies": self.anomalies,
            "features": list(self.features),
            "auc_all": self.auc_all,
            f"auc_first_{DOCSTRING_EVENTS}": self.auc_first,
            f"auc_after_{self.warmup}": self.auc_after_warmup,
            "river_docstring_rolling_auc": self.river_docstring_rolling_auc,
            "pipeline_at_threshold": {"flagged": self.flagged, "precision": self.precision, "recall": self.recall},
            "seconds": self.seconds,
            "notes": self.notes,
        }


def load_dataset(name: str) -> LoadedDataset:
    """A River data set as columns. Raises StreamDetectorError if it would need a download."""
    from river import datasets

    if name == "shuttle":
        ds = datasets.Shuttle()
    elif name == "waterflow":
        ds = datasets.WaterFlow()
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not getattr(ds, "is_downloaded", True) or not Path(ds.path).exists():
        raise StreamDetectorError(f"river dataset {type(ds).__name__} is not shipped with river and needs a download; skipped")
    rows, targets = [], []
    for x, target in ds:
        rows.append(x)
        targets.append(target)
    if name == "shuttle":
        features = tuple(f"f{i}" for i in range(1, 10))
        X = np.array([[float(x[f]) for f in features] for x in rows], dtype=np.float64)
        y = np.array(targets, dtype=np.int64) == 1
        # No timestamps in the data: one event per second from an arbitrary origin.
        t0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
        return LoadedDataset(name, X, features, y, t0 + np.arange(len(rows), dtype=np.float64), rows)
    # WaterFlow: the hourly flow is the target of a regression task; it is the one feature.
    features = ("flow",)
    X = np.array(targets, dtype=np.float64)[:, None]
    times = np.array([x["Time"].timestamp() for x in rows], dtype=np.float64)
    river_rows = [{"flow": float(v)} for v in targets]
    note = (
        "WaterFlow ships with river (no download) but has no anomaly labels: it is a regression "
        "data set whose four anomalous segments are described only in prose, so no ROC AUC can be computed"
    )
    return LoadedDataset(name, X, features, None, times, river_rows, note)


def dataset_pipeline(settings: Any, features: tuple[str, ...]) -> ScoringPipeline:
    """Our HalfSpaceTrees, z-score (one global key set) and autoencoder detectors on arbitrary
    numeric features, with the configured hyperparameters and calibration. Not tuned."""
    from stream_detector.scoring.calibration import Calibrator

    detectors: list[Any] = []
    if settings.river.enabled:
        r = settings.river
        if r.model == "HalfSpaceTrees":
            from stream_detector.detectors.hst import HalfSpaceTreesDetector

            detectors.append(HalfSpaceTreesDetector(features=features, scale=r.scale, seed=r.seed, **r.params))
        else:
            from stream_detector.detectors.river_model import RiverModelDetector

            detectors.append(RiverModelDetector(model=r.model, params=r.params, features=features, scale=r.scale, seed=r.seed))
    if settings.zscore.enabled:
        from stream_detector.detectors.zscore import ZScoreDetector

        z = settings.zscore
        detectors.append(
            ZScoreDetector(
                features=features,
                key_sets=("global",),
                key_set_features={"global": features},
                warmup=z.warmup,
                min_std=z.min_std,
                max_keys=z.max_keys,
            )
        )
    if settings.autoencoder.enabled:
        from stream_detector.scoring.factory import build_autoencoder

        detectors.append(build_autoencoder(settings, features))
    s = settings.scoring
    calibrators = {
        d.name: Calibrator(window=s.calibration_window, refresh=s.calibration_refresh, min_events=s.calibration_min_events, tail_quantile=s.tail_quantile)
        for d in detectors
    }
    return ScoringPipeline(detectors, calibrators, threshold=s.threshold)


def evaluate_dataset(name: str, settings: Any, progress: Callable[[int], None] | None = None) -> DatasetReport:
    """ROC AUC of our fused score and of each detector's raw score on a River data set, and of
    River's ``MinMaxScaler() | HalfSpaceTrees(seed=42)`` (its docstring recipe), in one run."""
    from river import anomaly, compose, metrics, preprocessing

    from stream_detector.features import FeatureBatch

    started = time.monotonic()
    data = load_dataset(name)
    n = data.X.shape[0]
    pipeline = dataset_pipeline(settings, data.features)
    batch_size = settings.processing.batch_size
    columns = {f: data.X[:, j] for j, f in enumerate(data.features)}
    fused, flagged = np.empty(n), np.empty(n, dtype=bool)
    raw = {d: np.empty(n) for d in pipeline.detector_names}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = FeatureBatch(
            event_time=data.event_time[start:stop],
            columns={f: c[start:stop] for f, c in columns.items()},
            keys={"global": np.full(stop - start, "*", dtype=object)},
            event_ids=np.array([f"{name}-{i}" for i in range(start, stop)], dtype=object),
        )
        result = pipeline.process(batch)
        fused[start:stop], flagged[start:stop] = result.fused, result.is_anomaly
        for d in raw:
            raw[d][start:stop] = result.raw[d]
        if progress is not None:
            progress(stop)

    # River's recipe (HalfSpaceTrees docstring; the Shuttle docstring writes it as
    # MinMaxScaler() | HalfSpaceTrees(seed=42)), event by event: score, then learn.
    river_model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42))
    river_scores = np.empty(n)
    rolling = metrics.RollingROCAUC(window_size=DOCSTRING_EVENTS) if data.y is not None else None
    for i, x in enumerate(data.rows):
        river_scores[i] = river_model.score_one(x)
        river_model.learn_one(x)
        if rolling is not None and i < DOCSTRING_EVENTS:
            rolling.update(bool(data.y[i]), river_scores[i])

    models = [ModelScores("stream-detector fused", fused, flagged)]
    models += [ModelScores(f"  {d} (raw score)", raw[d]) for d in raw]
    models.append(ModelScores("River MinMaxScaler | HalfSpaceTrees(seed=42)", river_scores))
    warmup = settings.scoring.calibration_min_events
    auc_all: dict[str, float | None] = {}
    auc_first: dict[str, float | None] = {}
    auc_after: dict[str, float | None] = {}
    for m in models:
        key = m.name.strip()
        if data.y is None:
            auc_all[key] = auc_first[key] = auc_after[key] = None
            continue
        auc_all[key] = roc_auc(data.y, m.scores)
        auc_first[key] = roc_auc(data.y[:DOCSTRING_EVENTS], m.scores[:DOCSTRING_EVENTS])
        auc_after[key] = roc_auc(data.y[warmup:], m.scores[warmup:])
    n_flagged = int(flagged.sum())
    precision = recall = None
    notes = [data.note] if data.note else []
    if data.y is not None:
        tp = int((flagged & data.y).sum())
        precision, recall = _ratio(tp, n_flagged), _ratio(tp, int(data.y.sum()))
    if n <= warmup:
        notes.append(
            f"only {n:,} events, not more than scoring.calibration_min_events={warmup:,}: no calibrator is ready, "
            "so the fused score is 0 for every event and nothing is flagged"
        )
    return DatasetReport(
        dataset=name,
        n=n,
        anomalies=None if data.y is None else int(data.y.sum()),
        features=data.features,
        models=models,
        auc_all=auc_all,
        auc_first=auc_first,
        auc_after_warmup=auc_after,
        warmup=warmup,
        river_docstring_rolling_auc=None if rolling is None else float(rolling.get()),
        flagged=n_flagged,
        precision=precision,
        recall=recall,
        seconds=time.monotonic() - started,
        notes=notes,
        event_time=data.event_time,
    )


def format_dataset_report(report: DatasetReport) -> str:
    r = report
    head = f"{r.dataset}: {r.n:,} events, {len(r.features)} feature(s) ({', '.join(r.features)})"
    head += f", {r.anomalies:,} labelled anomalies" if r.anomalies is not None else ", no anomaly labels"
    lines = [head + f"; {r.seconds:.1f} s"]
    if r.anomalies is not None:
        first = f"first {min(DOCSTRING_EVENTS, r.n):,}"
        after = f"after {r.warmup:,}"
        lines += ["", f"{'ROC AUC':<48}{'all events':>12}{first:>14}{after:>13}"]
        for m in r.models:
            key = m.name.strip()
            lines.append(f"{m.name:<48}{_fmt(r.auc_all[key], 4):>12}{_fmt(r.auc_first[key], 4):>14}{_fmt(r.auc_after_warmup[key], 4):>13}")
        if r.river_docstring_rolling_auc is not None:
            lines.append(
                f"River's docstring protocol (RollingROCAUC(window_size={DOCSTRING_EVENTS:,}) over the first "
                f"{DOCSTRING_EVENTS:,} events): {100 * r.river_docstring_rolling_auc:.2f}%"
            )
        lines.append(f"stream-detector at its threshold: {r.flagged:,} flagged, precision {_fmt(r.precision)}, recall {_fmt(r.recall)}")
        lines.append(
            f"(the fused score is 0 until calibration_min_events={r.warmup:,} scores were seen; 'after {r.warmup:,}' leaves those events out for every model)"
        )
    else:
        lines += ["", "ROC AUC: n/a (no labels)", f"stream-detector at its threshold: {r.flagged:,} flagged"]
        if r.event_time is not None:
            lines.append("highest-scored hours per model (for inspection only):")
            for m in r.models:
                if not m.scores.size or np.ptp(m.scores) == 0:
                    lines.append(f"  {m.name.strip():<46}every event scored {m.scores[0] if m.scores.size else 0:g}")
                    continue
                top = np.argsort(-m.scores, kind="stable")[:5]
                lines.append(f"  {m.name.strip():<46}" + ", ".join(_iso(r.event_time[i])[:13] + "h" for i in top))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The CLI command
# ---------------------------------------------------------------------------------------------


def run_evaluate_command(settings: Any, args: Any, out: IO[str] | None = None) -> int:
    """``stream-detector evaluate``; usage errors raise ConfigError (exit 2)."""
    from stream_detector.scoring.factory import build_pipeline, event_schema

    out = out if out is not None else sys.stdout
    if args.skip_warmup < 0:
        raise ConfigError(f"--skip-warmup must be >= 0, got {args.skip_warmup}")
    if args.dataset:
        if args.plot:
            raise ConfigError("--plot applies to sales-event evaluations, not to --dataset")
        progress = Progress(f"evaluate {args.dataset}")
        report = evaluate_dataset(args.dataset, settings, progress=progress)
        print(format_dataset_report(report), file=out)
        if args.json:
            write_json(report.to_dict(), args.json)
        return 0
    labels = Labels()
    if args.events:
        if not args.labels:
            raise ConfigError("--events needs --labels")
        labels = Labels.load(args.labels)
        events, total = file_events(args.events)
        source = args.events
    else:
        if args.labels:
            raise ConfigError("--labels goes with --events; --generate makes its own labels")
        events = generated_events(args.generate, args.seed, args.anomaly_rate, labels)
        total = args.generate
        source = f"generated: {args.generate:,} events, seed {args.seed}, anomaly rate {args.anomaly_rate}"
    report = evaluate(
        events,
        labels,
        build_pipeline(settings),
        event_schema(settings),
        settings.processing.batch_size,
        skip_warmup=args.skip_warmup,
        progress=Progress("evaluate", total=total),
    )
    print(format_report(report, source), file=out)
    if args.json:
        write_json({"source": source, **report.to_dict()}, args.json)
    if args.plot:
        path = plot_report(report, args.plot, title=f"stream-detector evaluate ({source})")
        print(f"plot written to {path}", file=out)
    return 0
