"""What an evaluation reports: on labelled sale events (``EvaluationReport``) and on a public
data set (``DatasetReport``), each with the dict written by ``--json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_detector.evaluation.labels import ChangeLabel, WindowMatch
from stream_detector.events.event_time import iso_utc

DOCSTRING_EVENTS = 10_000  # River's Shuttle docstring: take(10_000), RollingROCAUC(10_000)


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
class RankingStats:
    """How well the scores rank: ties among alerts, and the surprise's ROC AUC."""

    surprise_auc: float | None  # point anomalies against every other counted event
    # Among the alerts only: how the fused score and the surprise put true before false alerts.
    alert_score_auc: float | None
    alert_surprise_auc: float | None
    alerts: int  # counted flagged events
    top_score_alerts: int  # the most alerts that share one fused score
    top_surprise_alerts: int  # the most alerts that share one surprise value

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()


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
class ChangeStats:
    """What one lasting change cost: its key's counted events from the change on, in order."""

    change: ChangeLabel
    events: int  # counted events of the key at or after the change
    alerts: int  # how many of them were flagged
    # Events of the key since the change before the first run of NORMAL_RUN events without an
    # alert begins (0: it never alerted); None: never normal again (no such run to the end).
    normal_after: int | None
    last_alert: int | None  # the key's own event index (0 = first after the change) of its last alert
    labelled: int  # of its events, how many carry a point label (left out of the point metrics)
    shifts: int = 0  # level_shift records for its key (one per key of a key set that holds it)
    labelled_alerts: int = 0  # of its alerts, those on point-labelled events (found anomalies)

    def to_dict(self) -> dict[str, Any]:
        c = self.change
        return {
            "kind": c.kind,
            "scenario": c.scenario,
            "key_set": c.key_set,
            "key": c.key,
            "feature": c.feature,
            "factor": c.factor,
            "start": iso_utc(c.start),
            "events": self.events,
            "alerts": self.alerts,
            "normal_after": self.normal_after,
            "last_alert": self.last_alert,
            "labelled": self.labelled,
            "shifts": self.shifts,
            "labelled_alerts": self.labelled_alerts,
        }


@dataclass
class ChangeSummary:
    """Over all change labels: the alerts each cost and how many became normal again."""

    changes: list[ChangeStats]
    normal_run: int  # events without an alert that make a key normal again
    changed_events: int  # counted events of changed keys after their change (left out of the point metrics)
    changed_labelled: int  # of them, events with a point label

    @property
    def alerts_median(self) -> float | None:
        return float(np.median([c.alerts for c in self.changes])) if self.changes else None

    @property
    def alerts_max(self) -> int | None:
        return max(c.alerts for c in self.changes) if self.changes else None

    @property
    def cost_median(self) -> float | None:
        """Median over the changes of their alerts on events that are not injected point
        anomalies: what the change itself cost (the others are anomalies found)."""
        return float(np.median([c.alerts - c.labelled_alerts for c in self.changes])) if self.changes else None

    @property
    def cost_max(self) -> int | None:
        return max(c.alerts - c.labelled_alerts for c in self.changes) if self.changes else None

    @property
    def never_normal(self) -> int:
        return sum(1 for c in self.changes if c.normal_after is None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal_run": self.normal_run,
            "changed_events": self.changed_events,
            "changed_labelled": self.changed_labelled,
            "alerts_median": self.alerts_median,
            "alerts_max": self.alerts_max,
            "cost_median": self.cost_median,
            "cost_max": self.cost_max,
            "never_normal": self.never_normal,
            "changes": [c.to_dict() for c in self.changes],
        }


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
    ranking: RankingStats | None = None
    changes: ChangeSummary | None = None  # only when the labels have change labels
    level_shifts: int = 0  # level_shift records (scoring/level_shift.py)
    level_shifts_unmatched: int = 0  # of them, records matching no change label

    @property
    def events_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        report = self._to_dict()
        if self.changes is not None:
            report["changes"] = self.changes.to_dict()
        return report

    def _to_dict(self) -> dict[str, Any]:
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
                        "start": iso_utc(m.window.start),
                        "end": iso_utc(m.window.end),
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
            "ranking": self.ranking.to_dict() if self.ranking is not None else None,
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
