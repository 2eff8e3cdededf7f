"""Public labelled data (River's Shuttle and WaterFlow) through our detectors: ROC AUCs next
to River's own HalfSpaceTrees recipe, for ``stream-detector evaluate --dataset``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.errors import ConfigError, StreamDetectorError
from stream_detector.evaluation.measures import ratio, roc_auc
from stream_detector.evaluation.report import DOCSTRING_EVENTS, DatasetReport, ModelScores
from stream_detector.scoring.pipeline import ScoringPipeline

DATASETS = ("shuttle", "waterflow")


@dataclass
class LoadedDataset:
    name: str
    X: np.ndarray  # (n, d) float64
    features: tuple[str, ...]
    y: np.ndarray | None  # bool (n,), None when the data set has no anomaly labels
    event_time: np.ndarray  # epoch seconds
    rows: list[dict[str, Any]]  # the River x dicts, for River's own models
    note: str = ""


def load_dataset(name: str) -> LoadedDataset:
    """A River data set as columns. Raises StreamDetectorError if it would need a download."""
    from river import datasets

    ds: datasets.base.FileDataset
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
    from stream_detector.scoring.calibration import Calibrator, ScoreCalibrator

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
    calibrators: dict[str, ScoreCalibrator] = {
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
    for i, x in enumerate(data.rows):
        river_scores[i] = river_model.score_one(x)
        river_model.learn_one(x)
    # ... and River's own measure of it: a rolling ROC AUC over the first events.
    rolling = None
    if data.y is not None:
        rolling = metrics.RollingROCAUC(window_size=DOCSTRING_EVENTS)
        for i in range(min(n, DOCSTRING_EVENTS)):
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
        precision, recall = ratio(tp, n_flagged), ratio(tp, int(data.y.sum()))
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
