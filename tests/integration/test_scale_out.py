"""Twelve partitions served by two instances, calibration shared through the population topic
(issue 20; runtime/population.py), against one pipeline over the same stream (``replay``)."""

from __future__ import annotations

import io
import time

import numpy as np
import orjson
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from stream_detector.config import load_settings
from stream_detector.runtime.backtest import backtest
from stream_detector.runtime.population import TOPIC_CONFIG
from stream_detector.runtime.replay import replay
from stream_detector.scoring.shared_calibration import encode_summaries, summarize
from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, sample, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

pytestmark = pytest.mark.integration

PARTITIONS = 12
N_EVENTS = 12_000
CHUNK = 400


def _measures(flagged: set[str], labels: dict[str, str]) -> tuple[float, float]:
    hits = sum(1 for event_id in flagged if event_id in labels)
    return hits / len(labels), hits / max(1, len(flagged))


def test_two_instances_over_twelve_partitions_calibrate_like_one_pipeline(kafka_bootstrap, make_topics, tmp_path):
    """Each partition gets about 1,000 of the 12,000 events, fewer than the 2,000 a calibrator
    needs: calibrated alone, no partition could raise an anomaly other than an exact duplicate.
    Shared, both instances calibrate with one fit over all twelve partitions' windows."""
    input_topic = make_topics(partitions=PARTITIONS, prefix="scale-in")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="scale-out")
    events, labels, _windows = generate_labelled(N_EVENTS, seed=5)
    population = unique_name("population")
    sections = {"scaling": {"share_calibration": True, "population_topic": population}, "autoencoder": {"enabled": False}}
    group = unique_name("g")
    configs = [write_config(tmp_path / f"d{i}.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, group, **sections) for i in range(2)]
    daemons = [DaemonProcess(c, tmp_path / f"d{i}.log") for i, c in enumerate(configs)]
    try:
        # One join at a time (tansu's coordinator wedges if a member comes or goes mid-rebalance).
        daemons[0].start().wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") == PARTITIONS, 60, "the first instance owns all")
        daemons[1].start().wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") > 0, 60, "the second instance takes its share")
        daemons[0].wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") < PARTITIONS, 60, "the first instance gives its share up")
        # As a stream arrives (about 4,000 events/s), not as one backlog: a partition's backlog is
        # scored in batches of up to processing.batch_size, and the shared fit warms up per batch.
        for start in range(0, N_EVENTS, CHUNK):
            produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events[start : start + CHUNK]))
            time.sleep(CHUNK / 4_000)
        deadline = time.monotonic() + 120
        while sum(metric(d.metrics(), 'stream_detector_events_total{outcome="scored"}') for d in daemons) < N_EVENTS:
            assert time.monotonic() < deadline, "every event scored"
            time.sleep(0.5)
        time.sleep(1.0)  # the last summaries reach the other instance
        samples = [d.samples() for d in daemons]
    finally:
        for d in daemons:
            assert d.stop() == 0, d.log_tail()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    described = admin.describe_configs([ConfigResource("topic", population)])
    topic_config = {name: entry.value for name, entry in next(iter(described.values())).result(timeout=10).items()}
    assert {k: topic_config.get(k) for k in TOPIC_CONFIG} == TOPIC_CONFIG  # compacted, small segments
    for s in samples:
        assert sample(s, "stream_detector_calibration_partitions") == PARTITIONS
        assert sample(s, "stream_detector_population_records_total", outcome="sent") > 0
        assert sample(s, "stream_detector_population_records_total", outcome="applied") > 0
        assert sample(s, "stream_detector_population_records_total", outcome="incompatible") == 0
    records = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=2.0)]
    raised = {r["event_id"] for r in records if r.get("event_id")}
    recall, precision = _measures(raised, labels)

    settings = load_settings(configs[0], environ={})
    out = io.BytesIO()
    replay(settings, io.BytesIO(b"\n".join(orjson.dumps(e) for e in events) + b"\n"), out)
    replayed = {line["event_id"] for line in map(orjson.loads, out.getvalue().splitlines()) if line["is_anomaly"]}
    one_recall, one_precision = _measures(replayed, labels)

    alone: set[str] = set()
    unshared = settings.model_copy(update={"scaling": settings.scaling.model_copy(update={"share_calibration": False})})
    backtest(unshared, from_offset=0, on_batch=lambda _r, decoded, result: alone.update(decoded.features.event_ids[result.is_anomaly].tolist()))
    alone_recall, _ = _measures(alone, labels)
    duplicates = sum(1 for kind in labels.values() if kind == "duplicate") / len(labels)

    print(
        f"recall/precision: 12 partitions x 2 instances {recall:.3f}/{precision:.3f}, one pipeline {one_recall:.3f}/{one_precision:.3f}, "
        f"calibrated alone {alone_recall:.3f} (duplicates are {duplicates:.3f} of the labels)"
    )
    assert alone_recall <= duplicates + 0.02  # alone, only exact duplicates (no calibration) are raised
    # Measured: recall 0.37 to 0.47 against 0.58 for one pipeline and 0.21 alone; precision 1.0.
    # The rest of the gap is per-partition state not shared yet (a product's z-score baseline
    # split 12 ways, HalfSpaceTrees per partition) and the exchange lag between the instances
    # (bench/quality_at_scale.py gives 0.46 at 250 events of lag, 0.38 at 2,000).
    assert recall >= alone_recall + 0.1
    assert recall >= one_recall - 0.25
    assert precision >= one_precision - 0.05


def test_summaries_are_transactional_foreign_ones_ignored_and_read_back_on_restart(kafka_bootstrap, make_topics, tmp_path):
    """Exactly-once: summaries are committed with the outputs. Records the daemon cannot use
    are counted and skipped. A restarted instance holds every partition's summary again
    before it scores anything new."""
    partitions = 4
    input_topic = make_topics(partitions=partitions, prefix="pop-in")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="pop-out")
    population = make_topics(partitions=1, prefix="pop", config={"cleanup.policy": "compact"})[0]
    foreign = encode_summaries("another-configuration", {"zscore": summarize(np.linspace(0.0, 1.0, 500), 500)})
    produce_all(kafka_bootstrap, population, [(b"elsewhere/0", b"\x00not a summary"), (b"elsewhere/1", foreign)])
    events, _labels, _windows = generate_labelled(3_000, seed=21)
    produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events))
    sections = {
        "scaling": {"share_calibration": True, "population_topic": population},
        "scoring": {"calibration_window": 1_000, "calibration_min_events": 200, "calibration_refresh": 100},
        "processing": {"guarantee": "exactly-once", "instance_id": unique_name("pop")},
        "autoencoder": {"enabled": False},
    }
    config = write_config(tmp_path / "d.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, unique_name("g"), **sections)
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= len(events), 90, "every event scored")
        daemon.wait_for(lambda m: metric(m, "stream_detector_calibration_partitions") == partitions, 30, "every partition's summary held")
        s = daemon.samples()
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert sample(s, "stream_detector_population_records_total", outcome="corrupt") == 1
    assert sample(s, "stream_detector_population_records_total", outcome="incompatible") == 1
    assert sample(s, "stream_detector_population_records_total", outcome="sent") >= partitions
    committed = read_all(kafka_bootstrap, population, isolation_level="read_committed", idle=2.0)
    keys = {m.key().decode() for m in committed} - {"elsewhere/0", "elsewhere/1"}
    assert keys == {f"{input_topic}/{p}" for p in range(partitions)}

    restarted = DaemonProcess(config, tmp_path / "d2.log").start()
    try:
        # Nothing new to score: the summaries come from the topic (the partitions' own are
        # skipped once they are assigned; before that they count as another instance's).
        restarted.wait_for(lambda m: metric(m, "stream_detector_calibration_partitions") >= partitions, 60, "summaries read back")
        assert metric(restarted.metrics(), 'stream_detector_events_total{outcome="scored"}') == 0
    finally:
        assert restarted.stop() == 0, restarted.log_tail()
