"""Detection quality: run labelled events through the daemon's scoring pipeline and score it.

``evaluate`` feeds raw records through exactly what the daemon runs for every micro-batch
(``scoring.batch.score_batch``: ``decode_batch`` then ``ScoringPipeline.process``,
``batch_size`` records at a time) and compares the decisions with labels. The definitions (see also docs/evaluation.md):

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
* **Ranking**: the ROC AUC of the surprise (``-log10`` of the fused tail probability, not
  floored: scoring/fusion.py), point anomalies against every other counted event; the ROC AUCs
  of the fused score and of the surprise among the alerts (true against false alerts); and the
  most counted alerts that share one fused score, and one surprise value.
* **Window (collective) labels** such as ``store_stopped`` have a key (the store), a start and
  an end, and no event. A window is detected when a *collective alert* with the same key has an
  event time in ``[start, end + window_grace_s]`` (15 min by default); its detection delay is
  the first such alert's time minus ``start``. Collective alerts come from
  ``collective_alerts_fn``, called after every micro-batch; a point alert (an anomalous sale)
  never detects a window. Collective alerts that match no counted window are collective false
  alarms. With ``skip_warmup`` > 0, windows that start before the first counted event are left
  out.
* **Change labels** (kind ``level_shift``, from ``generate --drift``) are lasting changes, not
  anomalies: ``{"kind": "level_shift", "key_set": field, "key": value, "start": ISO, ...}``
  names the events whose ``field`` equals ``value`` at or after ``start`` (a new key starts
  there). Those counted events are left out of every point metric and the ranking, and
  reported per change: how many there are, how many were flagged (the alerts the change cost),
  and when the key is *normal again*: the number of its events since the change before the first
  ``NORMAL_RUN`` (50) of its events in a row that raise no alert (0 if the first 50 raise none;
  "never" if no such run ends before the stream does). An event that two changes name (a
  re-priced product sold in a re-formatted store) counts for both.

``evaluate_dataset`` runs public labelled data (River's Shuttle and WaterFlow) through our
detectors and reports ROC AUCs next to River's own HalfSpaceTrees recipe.

One module per concern: ``labels`` (labels, collective alerts, window matching), ``measures``
(the metric maths), ``report`` (report types), ``run`` (the ``evaluate`` loop), ``formatting``
(text tables), ``plot`` (the ``--plot`` figure), ``sources`` (generated or file events) and
``datasets`` (River data sets). The ``evaluate`` command itself (flag checks) is in ``cli.py``.
"""

from stream_detector.evaluation.datasets import DATASETS, LoadedDataset, dataset_pipeline, evaluate_dataset, load_dataset
from stream_detector.evaluation.formatting import format_dataset_report, format_report
from stream_detector.evaluation.labels import (
    CHANGE_KINDS,
    DEFAULT_WINDOW_GRACE_S,
    POINT_KINDS,
    WINDOW_KINDS,
    ChangeLabel,
    CollectiveAlert,
    CollectiveAlertsFn,
    Labels,
    WindowLabel,
    WindowMatch,
    match_windows,
)
from stream_detector.evaluation.measures import NORMAL_RUN, normal_after, roc_auc
from stream_detector.evaluation.plot import plot_report
from stream_detector.evaluation.report import (
    DOCSTRING_EVENTS,
    ChangeStats,
    ChangeSummary,
    DatasetReport,
    EvaluationReport,
    KindStats,
    ModelScores,
    Series,
    WindowStats,
)
from stream_detector.evaluation.run import evaluate
from stream_detector.evaluation.sources import file_events, generated_events

__all__ = [
    "CHANGE_KINDS",
    "DATASETS",
    "DEFAULT_WINDOW_GRACE_S",
    "DOCSTRING_EVENTS",
    "NORMAL_RUN",
    "POINT_KINDS",
    "WINDOW_KINDS",
    "ChangeLabel",
    "ChangeStats",
    "ChangeSummary",
    "CollectiveAlert",
    "CollectiveAlertsFn",
    "DatasetReport",
    "EvaluationReport",
    "KindStats",
    "Labels",
    "LoadedDataset",
    "ModelScores",
    "Series",
    "WindowLabel",
    "WindowMatch",
    "WindowStats",
    "dataset_pipeline",
    "evaluate",
    "evaluate_dataset",
    "file_events",
    "format_dataset_report",
    "format_report",
    "generated_events",
    "load_dataset",
    "match_windows",
    "normal_after",
    "plot_report",
    "roc_auc",
]
