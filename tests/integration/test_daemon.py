"""The daemon end to end on a real broker: labelled sales in, anomalies and metrics out."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections import Counter

import orjson
from confluent_kafka import Consumer, TopicPartition

from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

N_EVENTS = 45_000
# Every input partition (3) has its own models, and a calibrator needs calibration_min_events
# scores before its detector can alert (the autoencoder also needs its warm-up): recall is
# measured on the events after about 5,000 per partition.
SETTLED_AFTER = 15_000


def _generate(count: int, seed: int) -> tuple[list[dict], dict[str, str], list]:
    return generate_labelled(count, seed)


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return [tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        consumer.close()


def test_labelled_stream_yields_anomalies_metrics_and_commits(kafka_bootstrap, make_topics, tmp_path):
    input_topic = make_topics(partitions=3, prefix="sales")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    group = unique_name("detector")
    events, labels, _windows = _generate(N_EVENTS, seed=7)
    produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events))

    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, group)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        # Latency is observed when the broker confirms an anomaly's delivery, which can trail
        # the scoring of the last event by a moment.
        final = daemon.wait_for(
            lambda m: (
                metric(m, 'stream_detector_events_total{outcome="scored"}') >= N_EVENTS
                and metric(m, "stream_detector_end_to_end_latency_seconds_count") == metric(m, "stream_detector_anomalies_total")
            ),
            timeout=120,
            what=f"{N_EVENTS} scored events and every anomaly delivered",
        )
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log_tail()

    records = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=3.0)]
    # Alerts about events, collective ones (a store that went silent) with no event, and
    # level_shift records (a key whose level changed for good), with no event either.
    anomalies = [r for r in records if r.get("kind") is None]
    silences = [r for r in records if r["event_id"] is None]
    assert all(r["kind"] == "level_shift" for r in records if r.get("kind") is not None and r["event_id"] is not None)
    for record in silences:
        assert record["kind"] == "store_stopped" and record["reasons"] and record["event"] is None
    by_id = {a["event_id"]: a for a in anomalies}
    # One record per anomaly, nothing duplicated (no restart happened).
    assert len(by_id) == len(anomalies)
    # Metrics agree with what was produced and consumed.
    assert metric(final, 'stream_detector_events_total{outcome="scored"}') == N_EVENTS
    assert metric(final, 'stream_detector_events_total{outcome="invalid"}') == 0
    assert metric(final, "stream_detector_anomalies_total") == len(records)
    assert metric(final, "stream_detector_batch_seconds_count") > 0
    assert metric(final, "stream_detector_end_to_end_latency_seconds_count") == len(records)

    # Every record is complete and explains itself.
    for record in anomalies:
        assert set(record) >= {"event_id", "key", "timestamp", "score", "threshold", "detectors", "reasons", "event", "detected_at"}
        assert record["score"] > record["threshold"]
        assert record["reasons"], record
        assert record["event"]["event_id"] == record["event_id"]
        assert record["key"] == record["event"]["store_id"]

    order = {e["event_id"]: i for i, e in enumerate(events)}
    settled = {eid: kind for eid, kind in labels.items() if order[eid] >= SETTLED_AFTER}
    found = Counter(kind for eid, kind in settled.items() if eid in by_id)
    total = Counter(settled.values())
    recall = {kind: found[kind] / total[kind] for kind in total}
    false_positives = [eid for eid in by_id if eid not in labels and order[eid] >= SETTLED_AFTER]
    normal_settled = (N_EVENTS - SETTLED_AFTER) - len(settled)
    fp_rate = len(false_positives) / normal_settled
    print(
        f"\nevents in {N_EVENTS}, anomalies out {len(anomalies)} (+{len(silences)} silent-store alerts), recall by kind {recall}, "
        f"false-positive rate {fp_rate:.4%} ({len(false_positives)} of {normal_settled})"
    )
    # The obvious kinds are found; false alarms stay rare.
    # Detection quality proper is measured by `stream-detector evaluate` on 200,000 events;
    # here each partition's models have seen only ~15,000 events.
    for kind in ("duplicate", "decimal_error"):
        assert recall[kind] >= 0.8, (kind, recall)
    assert recall["refund_burst"] >= 0.4, recall
    assert sum(found.values()) / sum(total.values()) >= 0.5, recall
    assert fp_rate <= 0.005

    # Every input offset was committed at shutdown.
    committed = _committed(kafka_bootstrap, group, input_topic, 3)
    assert sum(committed) == N_EVENTS, committed


BAD_RECORDS = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00garbage", "not_utf8"),
    (b"[1, 2, 3]", "not_an_object"),
    (orjson.dumps({"timestamp": "2026-01-05T10:00:00Z", "amount": 1.0}), "missing_field"),
    (orjson.dumps({"event_id": "x", "timestamp": "2026-01-05T10:00:00Z", "amount": "12.50"}), "wrong_type"),
    (orjson.dumps({"event_id": "x", "timestamp": "yesterday", "amount": 1.0}), "invalid_timestamp"),
    (orjson.dumps({"event_id": "x", "timestamp": "2026-01-05T10:00:00Z", "amount": 1e300}), "out_of_range"),
    (orjson.dumps({"event_id": "x", "timestamp": "2026-01-05T10:00:00Z", "amount": 1.0, "version": 9}), "unsupported_version"),
    (b'{"event_id": "x", "amount": NaN}', "invalid_json"),
    (b"x" * 2_000_000, "oversized"),
]


def test_malformed_records_go_to_the_dead_letter_topic(kafka_bootstrap, make_topics, tmp_path):
    input_topic = make_topics(partitions=2, prefix="mixed")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    events, _labels, _ = _generate(3_000, seed=11)
    records: list[tuple[bytes | None, bytes]] = []
    expected_reasons: Counter[str] = Counter()
    for i, event in enumerate(events):
        records.append((event["store_id"].encode(), orjson.dumps(event)))
        if i % 10 == 0:  # one bad record after every tenth good one
            value, reason = BAD_RECORDS[(i // 10) % len(BAD_RECORDS)]
            records.append((b"bad", value))
            expected_reasons[reason] += 1
    n_bad = sum(expected_reasons.values())
    produce_all(kafka_bootstrap, input_topic, records, config={"message.max.bytes": 4_000_000})

    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, unique_name("g"))
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        final = daemon.wait_for(
            lambda m: (
                metric(m, 'stream_detector_events_total{outcome="scored"}') + metric(m, 'stream_detector_events_total{outcome="invalid"}') >= len(records)
            ),
            timeout=120,
            what="every record handled",
        )
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    assert metric(final, 'stream_detector_events_total{outcome="scored"}') == len(events)
    assert metric(final, 'stream_detector_events_total{outcome="invalid"}') == n_bad
    for reason, count in expected_reasons.items():
        assert metric(final, f'stream_detector_dlq_total{{reason="{reason}"}}') == count, reason

    dead = read_all(kafka_bootstrap, dlq_topic, expected=n_bad, timeout=30)
    assert len(dead) == n_bad
    seen_reasons: Counter[str] = Counter()
    for message in dead:
        headers = dict(message.headers())
        seen_reasons[headers["dlq.reason"].decode()] += 1
        assert headers["dlq.source.topic"].decode() == input_topic
        assert int(headers["dlq.source.partition"]) in (0, 1)
        assert int(headers["dlq.source.offset"]) >= 0
        assert headers["dlq.detail"]
    assert seen_reasons == expected_reasons


def test_a_worked_off_backlog_is_committed_without_waiting_for_the_interval(kafka_bootstrap, make_topics, tmp_path):
    """A burst is checkpointed as soon as the input goes quiet, not a commit interval later
    (processing.checkpoint_when_caught_up). With a 20 s interval, the offsets of 6,000
    pre-produced events are committed about 5 s (a quarter of the interval) after the
    assignment, while the periodic checkpoint would come 20 s after it."""
    input_topic = make_topics(partitions=3, prefix="burst")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    group = unique_name("burst")
    n_events = 6_000
    events, _labels, _ = _generate(n_events, seed=5)
    produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events))
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        group,
        processing={"commit_interval_ms": 20_000},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(
            lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= n_events,
            timeout=60,
            what=f"{n_events} scored events",
        )
        scored_at = time.monotonic()
        committed: list[int] = []
        while time.monotonic() - scored_at < 10:  # the interval ends about 19 s after this
            committed = _committed(kafka_bootstrap, group, input_topic, 3)
            if sum(max(0, c) for c in committed) == n_events:
                break
            time.sleep(0.25)
        committed_after = time.monotonic() - scored_at
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log_tail()
    assert sum(max(0, c) for c in committed) == n_events, (committed, daemon.log_tail())
    print(f"\ncommitted {committed_after:.1f} s after the last event was scored (interval 20 s)")


def test_checkpoints_are_staggered_over_the_partitions(kafka_bootstrap, make_topics, tmp_path):
    """At-least-once checkpoints take one slice of the partitions at a time (CHECKPOINT_SLICES):
    with 3 partitions and a 3 s interval, a partition's offset is committed about every 3 s,
    one partition about every second, not all three together (which stalls the loop for
    three snapshots at once)."""
    input_topic = make_topics(partitions=3, prefix="stagger")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    group = unique_name("stagger")
    events, _labels, _ = _generate(6_000, seed=6)
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        group,
        processing={"commit_interval_ms": 3_000, "checkpoint_when_caught_up": False},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    done = threading.Event()

    def paced():  # 500 events/s for 12 s, spread over the three partitions by store_id
        for start in range(0, len(events), 50):
            for e in events[start : start + 50]:
                yield e["store_id"].encode(), orjson.dumps(e)
            time.sleep(0.1)
        done.set()

    producer = threading.Thread(target=produce_all, args=(kafka_bootstrap, input_topic, paced()), daemon=True)
    try:
        daemon.wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") == 3, timeout=60, what="3 partitions assigned")
        producer.start()
        # Each poll: which partitions' committed offsets moved since the previous one.
        previous: list[int] = [-1001] * 3
        moves: list[tuple[float, frozenset[int]]] = []
        started = time.monotonic()
        while not done.is_set() and time.monotonic() - started < 60:
            offsets = [tp.offset for tp in consumer.committed([TopicPartition(input_topic, p) for p in range(3)], timeout=10)]
            moved = frozenset(p for p in range(3) if offsets[p] != previous[p])
            if moved:
                moves.append((time.monotonic() - started, moved))
            previous = offsets
            time.sleep(0.05)
    finally:
        consumer.close()
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log_tail()
    assert done.is_set(), "the paced producer did not finish"
    print("\ncommitted offsets moved (s, partitions):", [(round(t, 1), sorted(ps)) for t, ps in moves])
    # All three at once is what one checkpoint for every partition looks like.
    single = [t for t, ps in moves if len(ps) == 1]
    assert len(single) >= 6, moves
    assert not [ps for _, ps in moves if len(ps) == 3], moves
    for p in range(3):  # and every partition keeps being committed about every interval
        times = [t for t, ps in moves if p in ps]
        assert len(times) >= 3 and max(b - a for a, b in itertools.pairwise(times)) < 3.0 + 2.0, (p, moves)
