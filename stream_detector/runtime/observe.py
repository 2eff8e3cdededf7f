"""The daemon's metric updates: the series declared at start, each batch's figures, the
gauges over every partition's state, the alerting gauges and the consumer lag."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import orjson

from stream_detector.alerting.policy import AlertPolicy
from stream_detector.metrics import FUSED, Metrics
from stream_detector.runtime.partitions import PartitionWork
from stream_detector.scoring.batch import ScoredBatch
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline

# The gauges over every key of every pipeline (keys, learning keys, calibrated) are refreshed at
# most this often: walking 20,000 keys per partition after every consume took about 5 % of the
# loop at 20,000 events/s, for gauges scraped every few seconds.
STATE_GAUGES_EVERY_S = 1.0

Partitions = Mapping[tuple[str, int], PartitionWork]


def init_metrics(m: Metrics, pipeline: ScoringPipeline) -> None:
    m.threshold.set(pipeline.threshold)
    names = pipeline.detector_names
    for name in names:
        m.detector_enabled.labels(name).set(1)
        m.calibrated.labels(name).set(0)
    # The series of the enabled detectors exist from the start, at 0 (see Metrics): what
    # may fire (detectors and collective timers) and the score histograms.
    for name in [*names, *(timer.name for timer in pipeline.collective)]:
        m.fired.labels(name)
    for name in [*names, FUSED]:
        m.score.labels(name)
    for detector in pipeline.detectors:
        if detector.device is not None:
            m.device.info({"device": detector.device})


def observe_batch(m: Metrics, pipeline: ScoringPipeline, scored: ScoredBatch, seconds: float) -> None:
    m.batch_seconds.observe(seconds)
    m.batch_size.observe(scored.records)
    m.rounds.observe(scored.result.rounds)
    m.events.labels("scored").inc(scored.decoded.features.n)
    m.events.labels("invalid").inc(len(scored.decoded.invalid))
    m.clamped.inc(len(scored.decoded.clamped))
    m.keys_forgotten.inc(scored.result.forgotten_keys)
    observe_scores(m, scored.result)
    for detector in pipeline.detectors:
        loss = detector.last_train_loss
        if loss is not None:
            m.train_loss.set(loss)
            m.train_steps.set(detector.train_steps_total)


def observe_scores(metrics: Metrics, result: BatchResult) -> None:
    """Add a batch's calibrated scores to the score histograms, per detector and fused."""
    series = {name: 1.0 - p for name, p in result.probability.items()}
    series[FUSED] = result.fused
    for name, values in series.items():
        metrics.score.labels(name).observe_many(np.asarray(values, dtype=np.float64))


def observe_state(m: Metrics, detector_names: list[str], partitions: Partitions) -> None:
    """Gauges over every partition's pipeline (calibrated, keys): they walk every key of every
    pipeline, so the loop calls this at most every STATE_GAUGES_EVERY_S."""
    keys: dict[str, int] = {}
    learning: dict[str, int] = {}
    works = list(partitions.values())
    for name in detector_names:
        ready = all(w.pipeline.calibrators[name].ready for w in works)
        m.calibrated.labels(name).set(1 if ready else 0)
    m.state_bytes.set(sum(work.pipeline.state_bytes() for work in works))
    for work in works:
        for detector in work.pipeline.detectors:
            for ks, n in detector.n_keys().items():
                keys[ks] = keys.get(ks, 0) + n
            for ks, n in detector.learning_keys().items():
                learning[ks] = learning.get(ks, 0) + n
    for ks, n in keys.items():
        m.keys.labels(ks).set(n)
        m.learning_keys.labels(ks).set(learning.get(ks, 0))


def observe_alerting(m: Metrics, policy: AlertPolicy, partitions: Partitions) -> None:
    windows = policy.windows
    m.windows.labels("known").set(len(windows))
    # Partitions that have not scored an event yet have no event time to compare.
    latest = max((w.last_event_time for w in partitions.values() if w.last_event_time is not None), default=None)
    m.windows.labels("active").set(windows.active(latest) if latest is not None else 0)
    rules = 0
    for work in partitions.values():
        memory = work.pipeline.feedback
        if memory is not None:
            if work.last_event_time is not None:
                memory.expire(work.last_event_time)  # "in force": drop rules past their TTL
            rules += len(memory)
    m.feedback_rules.set(rules)


def observe_lag(m: Metrics, stats_json: str, partitions: Partitions) -> None:
    """The consumer lag of the owned partitions, from librdkafka's statistics."""
    stats = orjson.loads(stats_json)
    for topic, t in stats.get("topics", {}).items():
        for pid, p in t.get("partitions", {}).items():
            if pid == "-1" or (topic, int(pid)) not in partitions:
                continue
            lag = p.get("consumer_lag", -1)
            if lag >= 0:
                m.lag.labels(topic, pid).set(lag)
