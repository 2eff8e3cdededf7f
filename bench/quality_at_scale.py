"""Quality at scale: detection quality when the stream is split into P input partitions.

    python -m bench.quality_at_scale [--quick] [--count N] [--seed S] [--json PATH]

Offline (no broker). The labelled stream of ``stream-detector generate --count N --seed S`` is
split by its Kafka key (``store_id``, the key ``generator.produce_to_kafka`` gives every record)
into P partitions with the partitioner those records get: confluent-kafka's default
``consistent_random``, which for a non-empty key is ``crc32(key) % P`` (librdkafka's CRC-32 is
zlib's). What is measured:

* **Today's daemon** (``runtime/daemon.py``): every input partition owns a whole pipeline
  (``scoring.factory.build_pipeline``), scored in arrival order through
  ``scoring.batch.score_batch``, for P = 1, 4, 12: the stream is cut into windows of ``WINDOW``
  events, and each window's events are scored partition by partition, each partition's with
  its own pipeline (scores do not depend on batch boundaries, so without shared state the
  window changes nothing; it matters for the simulations below and for the warm-up
  positions). P = 1 is one pipeline over the whole stream: ``stream-detector replay`` /
  ``evaluate`` (checked against ``evaluation.evaluate`` on every run).
* **12 partitions served by 1, 2 or 3 instances**: each instance gets its partitions from a
  range assignment and scores what it consumed the way the daemon does (records grouped by
  partition, ``batch_size`` at a time, each partition with its own pipeline). The instance count
  cannot change the figures today, because no state is shared between partitions; the rows
  show it.
* **Built: calibration shared** (``scaling.share_calibration``, the default;
  scoring/shared_calibration.py, runtime/population.py): 12 partitions served by 1, 2 or 3
  instances, each partition with its own pipeline whose calibrators score with its instance's
  ``CalibrationPool``, fed after every batch by the instance's own partitions and by the other
  instances' summaries once they are ``lag`` events of the stream old (the population topic's
  delay: about a fetch under at-least-once, a checkpoint interval under exactly-once). The
  classes are the daemon's; only the topic is a list. "Today" rows above calibrate each
  partition alone (``share_calibration: false``, the engine before it).
* **Simulations of designs for issue 20** (not the daemon): the same 12 partitions, each with
  its own pipeline, but with some state shared by all of them, so a shared object sees every
  partition's events about as they arrive: an ideal owner with no replication lag. What can be
  shared:

  - ``keyed``: the z-score per-key tables of every key set (store, product+currency, customer,
    with their seasonal levels) = each key's state owned by its own key (a repartition topic).
  - ``population``: the z-score global statistics, HalfSpaceTrees and the autoencoder = models
    of the whole population, learned from every partition and replicated to all.
  - ``calibrators``: the score calibrators (one reference window per detector).

  - ``alone`` (with ``keyed``): the key sets a keyed task would own (all but the store's, the
    input key) learn without the pipeline's decision, which the keyed task would not have:
    each event unless its own key set's z-scores would flag it alone (the z-score's calibrated
    tail of their largest |z|, Bonferroni-adjusted like a detector's, past the threshold) or a
    table rejects it. Option (a) of docs/architecture.md, section 4.

  A: keyed; B: keyed and population; C: calibrators; D: keyed and calibrators; E: all three;
  E(a): E with ``alone``; F: population and calibrators (no repartition topic needed). These share live; G is E with
  the calibrators replicated with a lag: one merged set learns every partition's scores, and
  each partition gets a copy of it every N events of the stream (2,000 and 10,000; 2,000 with
  ``--quick``), learning its own scores in between; for 10,000 also with one extra copy as
  soon as the merged calibrators are ready (a replica published when it becomes useful).

  Never shared: the duplicate fingerprints, the silence timers and the feedback rules (keyed by
  store, the input key, so owned by their key already) and the event-time guard (it belongs to
  the input partition). "keyed+population+calibrators" should therefore come back to one
  pipeline, up to the order of events inside a window.

Labels and measures are the evaluation's own (``evaluation.labels``, ``evaluation.measures``):
point labels by event id, ``point_measures`` over all events, ``match_windows`` and
``window_stats`` for the store_stopped windows. Warm-up: for every partition, how many of its
own events it scored before its first alert, and the position in the whole stream by which
every partition had raised one; and the position after which every partition's calibrators
were ready (to the window).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson

from stream_detector.config import Settings, load_settings
from stream_detector.detectors.zscore import ZScoreDetector
from stream_detector.evaluation import POINT_KINDS, WINDOW_KINDS, CollectiveAlert, Labels, evaluate, generated_events, match_windows
from stream_detector.evaluation.measures import point_measures, window_stats
from stream_detector.events.decode import EventSchema
from stream_detector.scoring import fusion
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline
from stream_detector.scoring.shared_calibration import CalibrationPool


@dataclass(frozen=True)
class Plan:
    count: int
    partitions: tuple[int, ...]
    instances: tuple[int, ...]
    sync_every: tuple[int, ...]  # simulation F's replication intervals, in events


FULL = Plan(60_000, (1, 4, 12), (1, 2, 3), (2_000, 10_000))
QUICK = Plan(20_000, (1, 12), (1, 2), (2_000,))
# Built design: (instances, exchange lag in events of the stream).
BUILT_FULL = ((1, 0), (2, 250), (3, 250), (2, 2_000), (2, 10_000))
BUILT_QUICK = ((1, 0), (2, 250), (2, 2_000))
# What the simulations share: per-key z-score tables ("keyed"), population models
# ("population": z-score global statistics, HalfSpaceTrees, autoencoder), calibrators.
PARTS = ("keyed", "population", "calibrators", "alone")
SHARING = (
    "keyed",
    "keyed+population",
    "calibrators",
    "keyed+calibrators",
    "keyed+population+calibrators",
    "keyed+population+calibrators+alone",
    "population+calibrators",
)
# The key set of the input key: owned by the front task, which has the decision.
FRONT_KEY_SETS = frozenset({"store_id"})
# Simulation G: E with the calibrators replicated every N events instead of shared live.
LAGGED = "keyed+population, calibrators every "
WHEN_READY = " and when ready"
# Intervals up to this also get no "and when ready" variant (they replicate soon enough anyway).
WARM_SYNC = 2_000
SIM_PARTITIONS = 12
# Events of the whole stream per arrival window (module docstring): the partitions' pipelines
# are fed window by window, so shared state sees events about as they arrive and warm-up
# positions are known to within a window.
WINDOW = 250
POPULATION_DETECTORS = ("hst", "autoencoder")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def partition_of(key: bytes | None, partitions: int, position: int) -> int:
    """The partition confluent-kafka's default partitioner (``consistent_random``) picks: CRC-32
    of the key modulo the partition count; a record without a key goes to a random partition
    (here: by position, deterministic)."""
    if not key:
        return position % partitions
    return zlib.crc32(key) % partitions


@dataclass
class Stream:
    values: list[bytes]
    keys: list[bytes | None]
    labels: Labels


def make_stream(count: int, seed: int, anomaly_rate: float = 0.01) -> Stream:
    """``stream-detector generate --count count --seed seed``: raw values, their Kafka keys
    (``store_id``, as ``generator.produce_to_kafka`` keys them) and the labels."""
    labels = Labels()
    values = list(generated_events(count, seed, anomaly_rate, labels))
    keys: list[bytes | None] = []
    for value in values:
        store = orjson.loads(value).get("store_id")
        keys.append(store.encode() if isinstance(store, str) and store else None)
    return Stream(values, keys, labels)


# --------------------------------------------------------------------------------------------
# Scoring: per-partition pipelines, optionally sharing state (the simulations)
# --------------------------------------------------------------------------------------------


def share(pipelines: list[ScoringPipeline], what: str) -> None:
    """Make ``pipelines`` share the state ``what`` names ("+"-joined parts of ``PARTS``): the
    first pipeline's objects replace the others'. Sequential use only (one ``process`` at a time)."""
    parts = set(what.split("+"))
    if not parts <= set(PARTS):
        raise ValueError(f"unknown part(s) {sorted(parts - set(PARTS))}; known: {PARTS}")
    if "alone" in parts and not {"keyed", "population"} <= parts:
        raise ValueError("alone needs keyed+population (one shared z-score)")
    first = pipelines[0]
    if "alone" in parts:
        z = next(d for d in first.detectors if d.name == "zscore")
        z.__class__ = LearningAlone  # a simulation: the same state, another learning rule
        cast(LearningAlone, z).pipeline = first
    for pipe in pipelines[1:]:
        for i, detector in enumerate(pipe.detectors):
            shared: Any = first.detectors[i]
            mine: Any = detector
            if detector.name == "zscore":
                if {"keyed", "population"} <= parts:
                    pipe.detectors[i] = shared
                elif "keyed" in parts:  # the per-key tables only; the global statistics stay per partition
                    mine._state.key_sets = shared._state.key_sets  # noqa: SLF001 - a simulation
                elif "population" in parts:  # the global statistics only
                    mine._state.global_stats = shared._state.global_stats  # noqa: SLF001 - a simulation
            elif "population" in parts and detector.name in POPULATION_DETECTORS:
                pipe.detectors[i] = shared
        if "calibrators" in parts:
            pipe.calibrators = first.calibrators


class LearningAlone(ZScoreDetector):
    """The shared z-score of simulation ``alone``: the key sets outside ``FRONT_KEY_SETS`` learn
    each event unless their own z-scores would flag it alone (``alone_limit``) or a table
    rejects it; the rest follows the pipeline's decision."""

    pipeline: ScoringPipeline  # whose calibrator and threshold say what flags alone

    def score_adapting(self, batch: Any, learn: np.ndarray, adapting: dict[tuple[str, str], np.ndarray]) -> Any:
        first = super().score_adapting(batch, learn, adapting)
        limit = alone_limit(self.pipeline)
        own = {}
        for k, ks in enumerate(self.key_sets):
            if ks not in FRONT_KEY_SETS:
                with np.errstate(invalid="ignore"):
                    own[ks] = np.nan_to_num(np.abs(first.details["z"][:, k, :]), nan=0.0).max(axis=1) <= limit
        return self.score_by_key_set(batch, learn, adapting, own)


# The z-scores ``alone_limit`` tries.
Z_GRID = np.linspace(0.0, 60.0, 1201)


def alone_limit(pipeline: ScoringPipeline) -> float:
    """The smallest z-score (to 0.05) that the pipeline's z-score calibrator makes fire on its
    own; infinity while it is not ready (nothing fires)."""
    probability, _ = pipeline.calibrators["zscore"].transform(Z_GRID)
    fires = fusion.adjusted_score(probability, len(pipeline.detectors)) > pipeline.threshold
    return float(Z_GRID[np.argmax(fires)]) if fires.any() else float("inf")


@dataclass
class Scored:
    """Per valid event of the whole stream (in stream order): its position, fused score,
    decision, label code and partition; plus collective alerts and per-partition first alerts."""

    position: np.ndarray
    fused: np.ndarray
    flagged: np.ndarray
    kind: np.ndarray
    partition: np.ndarray
    alerts: list[CollectiveAlert]
    calibrated_at: dict[int, int]
    seconds: float


class Collector:
    """Gathers what ``score_batch`` returns for chunks of the stream, with global positions."""

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.kind_codes = {kind: i + 1 for i, kind in enumerate(POINT_KINDS)}
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("position", "fused", "flagged", "kind", "partition")}
        self.alerts: list[CollectiveAlert] = []
        # partition -> position in the whole stream of the last event of the batch after which
        # all its calibrators were ready (had ``calibration_min_events`` scores)
        self.calibrated_at: dict[int, int] = {}

    def score(self, pipeline: ScoringPipeline, schema: EventSchema, values: list[bytes], positions: np.ndarray, partition: int) -> BatchResult:
        scored = score_batch(pipeline, schema, values)
        decoded, result = scored.decoded, scored.result
        codes = np.zeros(decoded.features.n, dtype=np.int16)
        for i, event_id in enumerate(decoded.features.event_ids.tolist()):
            label_kind = self.labels.points.get(event_id)
            if label_kind is not None:
                codes[i] = self.kind_codes.setdefault(label_kind, len(self.kind_codes) + 1)
        self.parts["position"].append(positions[decoded.source_index])
        self.parts["fused"].append(result.fused)
        self.parts["flagged"].append(result.is_anomaly)
        self.parts["kind"].append(codes)
        self.parts["partition"].append(np.full(decoded.features.n, partition, dtype=np.int32))
        self.alerts.extend(CollectiveAlert(a.key, a.event_time, detector="silence") for a in result.collective)
        if partition not in self.calibrated_at and all(c.ready for c in pipeline.calibrators.values()):
            self.calibrated_at[partition] = int(positions[-1])
        return result

    def done(self, seconds: float) -> Scored:
        cat = {k: np.concatenate(v) for k, v in self.parts.items()}
        order = np.argsort(cat["position"], kind="stable")
        c = {k: v[order] for k, v in cat.items()}
        return Scored(c["position"], c["fused"], c["flagged"], c["kind"], c["partition"], self.alerts, self.calibrated_at, seconds)


def score_interleaved(
    stream: Stream,
    settings: Settings,
    partitions: int,
    sharing: str | None = None,
    window_size: int | None = None,
    calibrator_sync: int | None = None,
    sync_when_ready: bool = False,
) -> Scored:
    """Each partition's own pipeline (sharing what ``sharing`` names), fed in arrival order:
    windows of ``window_size`` (default ``batch_size``) events of the whole stream, each window
    partition by partition. Without sharing the window does not matter (each pipeline sees its
    partition's events in order, and scores do not depend on batch boundaries).

    ``calibrator_sync``: calibrators replicated with a lag instead of shared live. One merged
    set of calibrators learns every partition's scores (the raw scores of its events, those not
    flagged entering the reference, as in the pipeline); every ``calibrator_sync`` events of the
    whole stream each partition's calibrators are replaced by a copy of it, and between copies a
    partition's calibrators also learn its own scores (a replica that applies local updates).
    ``sync_when_ready``: also copy once as soon as the merged calibrators are all ready."""
    schema = event_schema(settings)
    batch_size = window_size or settings.processing.batch_size
    pipelines = [build_pipeline(settings) for _ in range(partitions)]
    if sharing is not None:
        share(pipelines, sharing)
    merged = copy.deepcopy(pipelines[0].calibrators) if calibrator_sync else None
    part = np.array([partition_of(k, partitions, i) for i, k in enumerate(stream.keys)], dtype=np.int32)
    collector = Collector(stream.labels)
    started = time.perf_counter()
    synced, ready_copied = 0, False
    for lo in range(0, len(stream.values), batch_size):
        if merged is not None and calibrator_sync is not None:
            just_ready = sync_when_ready and not ready_copied and all(c.ready for c in merged.values())
            if lo - synced >= calibrator_sync or just_ready:
                for pipe in pipelines:
                    pipe.calibrators = copy.deepcopy(merged)
                synced, ready_copied = lo, ready_copied or just_ready
        window = np.arange(lo, min(lo + batch_size, len(stream.values)))
        for p in range(partitions):
            mine = window[part[window] == p]
            if mine.size:
                result = collector.score(pipelines[p], schema, [stream.values[i] for i in mine.tolist()], mine, p)
                if merged is not None:
                    for name, calibrator in merged.items():
                        calibrator.commit(calibrator.transform(result.raw[name], ~result.is_anomaly)[1])
    return collector.done(time.perf_counter() - started)


def score_shared(stream: Stream, settings: Settings, partitions: int, instances: int, lag: int) -> Scored:
    """The built design (module docstring): every instance's partitions calibrate with the
    instance's ``CalibrationPool``; a summary one instance sends reaches the others once the
    stream has moved ``lag`` events past the window it was sent in."""
    schema = event_schema(settings)
    part = np.array([partition_of(k, partitions, i) for i, k in enumerate(stream.keys)], dtype=np.int32)
    assignment = [list(range(partitions))[i * partitions // instances : (i + 1) * partitions // instances] for i in range(instances)]
    pools = [CalibrationPool.from_settings(settings) for _ in range(instances)]
    pipelines: dict[int, ScoringPipeline] = {}
    for i, owned in enumerate(assignment):
        for p in owned:
            pipelines[p] = build_pipeline(settings)
            pools[i].attach(pipelines[p])
    topic: list[tuple[int, int, str, bytes]] = []  # (window start, sender, source, record)
    read = [0] * instances
    collector = Collector(stream.labels)
    started = time.perf_counter()
    for lo in range(0, len(stream.values), WINDOW):
        for i in range(instances):
            while read[i] < len(topic) and topic[read[i]][0] <= lo - lag:
                _, sender, source, record = topic[read[i]]
                read[i] += 1
                if sender != i:
                    pools[i].receive(source, record)
        window = np.arange(lo, min(lo + WINDOW, len(stream.values)))
        for i, owned in enumerate(assignment):
            for p in owned:
                mine = window[part[window] == p]
                if mine.size:
                    collector.score(pipelines[p], schema, [stream.values[k] for k in mine.tolist()], mine, p)
                    pools[i].contribute(str(p), pipelines[p])
            topic.extend((lo, i, source, record) for source, record in pools[i].take_outbox().items())
    return collector.done(time.perf_counter() - started)


def score_by_instance(stream: Stream, settings: Settings, partitions: int, instances: int) -> tuple[Scored, list[list[int]]]:
    """``instances`` daemons sharing ``partitions`` partitions (range assignment): each consumes
    its partitions' records in arrival order, up to ``batch_size`` per owned partition per poll,
    groups them by partition and scores each partition's records ``batch_size`` at a time with
    that partition's pipeline (``runtime/daemon.py`` ``_process``)."""
    schema, batch_size = event_schema(settings), settings.processing.batch_size
    part = np.array([partition_of(k, partitions, i) for i, k in enumerate(stream.keys)], dtype=np.int32)
    assignment = [list(range(partitions))[i * partitions // instances : (i + 1) * partitions // instances] for i in range(instances)]
    collector = Collector(stream.labels)
    started = time.perf_counter()
    for owned in assignment:
        pipelines = {p: build_pipeline(settings) for p in owned}
        mine = np.flatnonzero(np.isin(part, owned))
        poll = batch_size * len(owned)
        for lo in range(0, mine.size, poll):
            consumed = mine[lo : lo + poll]
            for p in owned:
                records = consumed[part[consumed] == p]
                for start in range(0, records.size, batch_size):
                    chunk = records[start : start + batch_size]
                    collector.score(pipelines[p], schema, [stream.values[i] for i in chunk.tolist()], chunk, p)
    return collector.done(time.perf_counter() - started), assignment


# --------------------------------------------------------------------------------------------
# Measures (the evaluation's own)
# --------------------------------------------------------------------------------------------


def measure(scored: Scored, stream: Stream, partitions: int, kinds: list[str]) -> dict[str, Any]:
    counted = np.ones(scored.position.size, dtype=bool)
    fired = np.zeros((scored.position.size, 0), dtype=bool)
    m = point_measures(counted, scored.fused, scored.flagged, scored.kind, fired, kinds, [])
    matches, unmatched = match_windows(stream.labels.windows, scored.alerts, 15 * 60.0)
    windows = {wk: window_stats(wk, [x for x in matches if x.window.kind == wk], bool(scored.alerts)) for wk in WINDOW_KINDS}
    first_local, first_global = [], []
    for p in range(partitions):
        mine = scored.partition == p
        hits = np.flatnonzero(scored.flagged[mine])
        first_local.append(int(hits[0]) if hits.size else None)  # the partition's own events before it
        first_global.append(int(scored.position[mine][hits[0]]) if hits.size else None)
    silent = [p for p, v in enumerate(first_local) if v is None]
    uncalibrated = [p for p in range(partitions) if p not in scored.calibrated_at]
    return {
        "partitions": partitions,
        "events": int(scored.position.size),
        "tp": m["tp"],
        "fp": m["fp"],
        "fn": m["fn"],
        "recall": m["recall"],
        "precision": m["precision"],
        "f1": m["f1"],
        "false_positive_rate": m["false_positive_rate"],
        "auc": m["auc"],
        "kinds": {k: {"labelled": s.labelled, "flagged": s.flagged, "recall": s.recall} for k, s in m["kinds"].items()},
        "windows": {k: {"windows": w.windows, "detected": w.detected} for k, w in windows.items()},
        "collective_false_alarms": len(unmatched),
        "first_alert_events_per_partition": first_local,
        "first_alert_position_per_partition": first_global,
        "partitions_without_alert": silent,
        "all_partitions_alerting_at": None if silent else max(v for v in first_global if v is not None),
        "calibrated_at_per_partition": [scored.calibrated_at.get(p) for p in range(partitions)],
        "partitions_never_calibrated": uncalibrated,
        "all_partitions_calibrated_at": None if uncalibrated else max(scored.calibrated_at.values()),
        "seconds": scored.seconds,
    }


def run(
    count: int,
    seed: int,
    partitions: Sequence[int],
    instances: Sequence[int],
    sharing: Sequence[str],
    sync_every: Sequence[int] = (),
    log: Callable[[str], None] = say,
    built: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    settings = load_settings(environ={})
    log(f"quality: generating {count:,} events, seed {seed}")
    stream = make_stream(count, seed)
    kinds = list(POINT_KINDS)
    out: dict[str, Any] = {"count": count, "seed": seed, "batch_size": settings.processing.batch_size}
    out |= {"today": {}, "instances": {}, "built": {}, "simulated": {}}

    log("quality: reference, evaluation.evaluate (what `stream-detector evaluate` runs)")
    reference = evaluate(stream.values, stream.labels, build_pipeline(settings), event_schema(settings), settings.processing.batch_size, keep_series=False)
    out["evaluate"] = {
        "recall": reference.recall,
        "precision": reference.precision,
        "f1": reference.f1,
        "false_positive_rate": reference.false_positive_rate,
        "tp": reference.tp,
        "fp": reference.fp,
        "kinds": {k: {"labelled": s.labelled, "flagged": s.flagged, "recall": s.recall} for k, s in reference.kinds.items()},
        "windows": {k: {"windows": w.windows, "detected": w.detected} for k, w in reference.windows.items()},
    }
    for p in partitions:
        log(f"quality: today's daemon, {p} partition(s), a pipeline each")
        out["today"][p] = measure(score_interleaved(stream, settings, p, window_size=WINDOW), stream, p, kinds)
    one = out["today"].get(1)
    if one is not None:
        ref = out["evaluate"]
        same = all(one[k] == ref[k] for k in ("recall", "precision", "false_positive_rate", "tp", "fp")) and all(
            one["kinds"][k]["flagged"] == ref["kinds"][k]["flagged"] for k in ref["kinds"]
        )
        out["p1_equals_evaluate"] = same
        if not same:
            raise AssertionError(f"1 partition differs from evaluate: {one} vs {ref}")
    for n in instances:
        log(f"quality: today's daemon, {SIM_PARTITIONS} partitions served by {n} instance(s)")
        scored, assignment = score_by_instance(stream, settings, SIM_PARTITIONS, n)
        out["instances"][n] = {**measure(scored, stream, SIM_PARTITIONS, kinds), "assignment": assignment}
    for n, lag in built:
        log(f"quality: built, {SIM_PARTITIONS} partitions over {n} instance(s), calibration shared, exchange lag {lag} events")
        out["built"][f"{n}/{lag}"] = measure(score_shared(stream, settings, SIM_PARTITIONS, n, lag), stream, SIM_PARTITIONS, kinds)
    for what in sharing:
        log(f"quality: simulated design, {SIM_PARTITIONS} partitions sharing {what}")
        out["simulated"][what] = measure(score_interleaved(stream, settings, SIM_PARTITIONS, what, WINDOW), stream, SIM_PARTITIONS, kinds)
    for every, when_ready in [(n, False) for n in sync_every] + [(n, True) for n in sync_every if n > WARM_SYNC]:
        what = f"{LAGGED}{every}{WHEN_READY if when_ready else ''}"
        log(f"quality: simulated design, {SIM_PARTITIONS} partitions sharing {what}")
        scored = score_interleaved(stream, settings, SIM_PARTITIONS, "keyed+population", WINDOW, calibrator_sync=every, sync_when_ready=when_ready)
        out["simulated"][what] = measure(scored, stream, SIM_PARTITIONS, kinds)
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

SIMULATION_TITLES = {
    "keyed": "sim A: per-key state owned by its key",
    "keyed+population": "sim B: A + population models shared",
    "calibrators": "sim C: only calibrators shared",
    "keyed+calibrators": "sim D: A + calibrators shared",
    "keyed+population+calibrators": "sim E: A + population models + calibrators shared",
    "keyed+population+calibrators+alone": "sim E(a): E, keyed key sets learning without the decision",
    "population+calibrators": "sim F: population models + calibrators shared, per-key state as today",
}


def rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, measures) for every configuration, in table order."""
    out = []
    for p, m in result["today"].items():
        out.append(("1 partition (= replay / evaluate)" if int(p) == 1 else f"{p} partitions (today)", m))
    for n, m in result["instances"].items():
        out.append((f"{SIM_PARTITIONS} partitions, {n} instance{'s' if int(n) > 1 else ''} (today)", m))
    for key, m in result.get("built", {}).items():
        n, lag = (int(x) for x in key.split("/"))
        out.append((f"{SIM_PARTITIONS} partitions, {n} instance{'s' if n > 1 else ''}, calibration shared (built), exchange lag {lag:,} events", m))
    for what, m in result["simulated"].items():
        title = SIMULATION_TITLES.get(what) or lagged_title(what)
        out.append((f"{SIM_PARTITIONS} partitions, {title}", m))
    return out


def lagged_title(what: str) -> str:
    every = what.removeprefix(LAGGED).removesuffix(WHEN_READY)
    extra = ", and once as soon as the merged ones are ready" if what.endswith(WHEN_READY) else ""
    return f"sim G: E, calibrators replicated every {int(every):,} events{extra}"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def warmup_text(m: dict[str, Any]) -> str:
    local = [v for v in m["first_alert_events_per_partition"] if v is not None]
    if m["partitions"] == 1:
        return f"{local[0]:,}" if local else "never"
    med = f"median {int(np.median(local)):,}" if local else "none"
    every = "never" if m["all_partitions_alerting_at"] is None else f"{m['all_partitions_alerting_at']:,}"
    silent = f", {len(m['partitions_without_alert'])} never" if m["partitions_without_alert"] else ""
    return f"{med}{silent}; all by {every}"


def calibrated_text(m: dict[str, Any]) -> str:
    if m["partitions_never_calibrated"]:
        return f"never ({len(m['partitions_never_calibrated'])} of {m['partitions']} partitions never)"
    return f"after {m['all_partitions_calibrated_at'] + 1:,} events"


def markdown(result: dict[str, Any]) -> str:
    kinds = list(POINT_KINDS)
    warmup = ["first alert: events per partition; all partitions by position", "all calibrators ready"]
    head = ["configuration", "recall", "precision", "F1", "FP rate", *kinds, "store_stopped", *warmup]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows(result):
        cells = [label, _f(m["recall"]), _f(m["precision"]), _f(m["f1"]), f"{100 * (m['false_positive_rate'] or 0):.3f} %"]
        cells += [f"{m['kinds'][k]['flagged']} / {m['kinds'][k]['labelled']}" for k in kinds]
        w = m["windows"]["store_stopped"]
        cells += [f"{w['detected']} / {w['windows']}", warmup_text(m), calibrated_text(m)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.count:,} events, 1 and 12 partitions, 1 and 2 instances")
    parser.add_argument("--count", type=int, help="events to generate (default 60,000; quick 20,000)")
    parser.add_argument("--seed", type=int, default=5, help="generator seed (default 5)")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    count = args.count or plan.count
    result = run(count, args.seed, plan.partitions, plan.instances, SHARING, plan.sync_every, built=BUILT_QUICK if args.quick else BUILT_FULL)
    same = result["p1_equals_evaluate"]
    print(f"quality at scale: {count:,} generated events, seed {args.seed}, arrival windows of {WINDOW}; 1 partition equals evaluate: {same}\n")
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
