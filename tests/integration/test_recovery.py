"""Restarts, crashes and rebalances lose nothing: state travels with the offsets.

Each test compares an interrupted run with an uninterrupted run of the same input (same
topic, another group and output topic). Detector state is restored per partition from the
changelog, so the interrupted run flags the same events with the same scores.

tansu (the embedded broker) limits, from the project's reliability issue: it never aborts the
open transaction of a killed producer, and its group coordinator wedges if a member leaves
while a rebalance is in progress. So every membership change below waits until the previous
join has finished (the instances hold all partitions between them), and the exactly-once
kill -9 test runs only against a real Kafka (KAFKA_BOOTSTRAP_SERVERS).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

N_EVENTS = 40_000
PARTITIONS = 3
FAST = {"batch_size": 500, "commit_interval_ms": 500}
ASSIGNED = "stream_detector_assigned_partitions"


def _events(count: int, seed: int) -> tuple[list[dict], dict[str, str]]:
    events, labels, _windows = generate_labelled(count, seed)
    return events, labels


def _records(events: list[dict]):
    return ((e["store_id"].encode(), orjson.dumps(e)) for e in events)


def _committed_total(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        consumer.close()


def _wait_committed(bootstrap: str, group: str, topic: str, n: int, timeout: float, daemons: list[DaemonProcess]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _committed_total(bootstrap, group, topic) >= n:
            return
        for d in daemons:
            assert d.process is not None and d.process.poll() is None, f"daemon died:\n{d.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"offsets of {group} did not reach {n}: {_committed_total(bootstrap, group, topic)}")


class Run:
    """One group + output topic over the shared input topic."""

    def __init__(self, bootstrap, make_topics, tmp_path, input_topic: str, name: str, guarantee: str) -> None:
        self.bootstrap = bootstrap
        self.input_topic = input_topic
        self.output, self.dlq = make_topics(partitions=1, n=2, prefix=f"out-{name}")
        self.group = unique_name(f"g-{name}")
        self.tmp_path = tmp_path
        self.name = name
        self.guarantee = guarantee
        self.starts = 0

    def daemon(self, instance: str = "a") -> DaemonProcess:
        self.starts += 1
        path = write_config(
            self.tmp_path / f"{self.name}-{instance}-{self.starts}.yaml",
            self.bootstrap,
            self.input_topic,
            self.output,
            self.dlq,
            self.group,
            processing={**FAST, "guarantee": self.guarantee, "instance_id": f"{self.name}-{instance}"},
        )
        return DaemonProcess(path, self.tmp_path / f"{self.name}-{instance}.log").start()

    def anomalies(self) -> list[dict]:
        return [orjson.loads(m.value()) for m in read_all(self.bootstrap, self.output, idle=3.0, isolation_level="read_committed")]

    def complete(self, daemons: list[DaemonProcess], timeout: float = 180) -> None:
        _wait_committed(self.bootstrap, self.group, self.input_topic, N_EVENTS, timeout, daemons)


def _uninterrupted(bootstrap, make_topics, tmp_path, input_topic: str, guarantee: str) -> list[dict]:
    run = Run(bootstrap, make_topics, tmp_path, input_topic, "baseline", guarantee)
    daemon = run.daemon()
    try:
        run.complete([daemon])
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    return run.anomalies()


def _committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        consumer.close()


def _interrupt(run: Run, sig: int, times: int, rng: random.Random) -> list[dict[int, int]]:
    """Start the daemon and stop it with ``sig`` at random moments while it processes.

    Returns the group's committed offsets seen just before each stop (a lower bound of the
    last checkpoint the next start resumes from).
    """
    checkpoints = []
    for _ in range(times):
        daemon = run.daemon()
        # Stop after a random amount of work, not a random time: a fast daemon could otherwise
        # finish the whole input before the last interruption, leaving nothing to recover.
        target = rng.randint(N_EVENTS // 20, N_EVENTS // 5)
        daemon.wait_for(
            lambda m, target=target: metric(m, ASSIGNED) > 0 and metric(m, 'stream_detector_events_total{outcome="scored"}') >= target,
            90,
            f"{target} events scored",
        )
        checkpoints.append(_committed_offsets(run.bootstrap, run.group, run.input_topic))
        code = daemon.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.log_tail()
    return checkpoints


def _labelled_found(anomalies: list[dict], labels: dict[str, str]) -> set[str]:
    return {a["event_id"] for a in anomalies if a["event_id"] in labels}


def _report(name: str, labels, base: list[dict], seen: list[dict]) -> tuple[set[str], set[str], int]:
    base_ids = {a["event_id"] for a in base}
    seen_ids = Counter(a["event_id"] for a in seen)
    duplicates = sum(c - 1 for c in seen_ids.values())
    expected = _labelled_found(base, labels)
    found = _labelled_found(seen, labels)
    print(
        f"\n[{name}] records in {N_EVENTS}; anomalies uninterrupted {len(base_ids)}, interrupted {len(seen_ids)} "
        f"(+{len(set(seen_ids) - base_ids)} / -{len(base_ids - set(seen_ids))}); labelled expected {len(expected)}, "
        f"seen {len(found & expected)}; duplicates {duplicates}"
    )
    return expected, found, duplicates


@pytest.fixture
def labelled_input(kafka_bootstrap, make_topics):
    topic = make_topics(partitions=PARTITIONS, prefix="sales")[0]
    events, labels = _events(N_EVENTS, seed=21)
    produce_all(kafka_bootstrap, topic, _records(events))
    return topic, events, labels


def test_sigterm_restarts_with_exactly_once_lose_and_repeat_nothing(kafka_bootstrap, make_topics, tmp_path, labelled_input):
    topic, _events_, labels = labelled_input
    base = _uninterrupted(kafka_bootstrap, make_topics, tmp_path, topic, "exactly-once")

    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "sigterm", "exactly-once")
    _interrupt(run, signal.SIGTERM, times=3, rng=random.Random(5))
    final = run.daemon()
    try:
        run.complete([final])
    finally:
        assert final.stop() == 0, final.log_tail()
    seen = run.anomalies()

    expected, found, duplicates = _report("exactly-once, 3 x SIGTERM", labels, base, seen)
    assert duplicates == 0
    assert expected <= found, f"lost labelled anomalies: {sorted(expected - found)[:10]}"
    # State came back with the offsets: the same events are flagged, with the same scores.
    base_scores = {a["event_id"]: a["score"] for a in base}
    seen_scores = {a["event_id"]: a["score"] for a in seen}
    assert set(seen_scores) == set(base_scores)
    assert max(abs(seen_scores[e] - base_scores[e]) for e in base_scores) < 1e-6


def test_kill_9_with_at_least_once_loses_nothing_and_repeats_at_most_a_commit_interval(kafka_bootstrap, make_topics, tmp_path, labelled_input):
    topic, _events_, labels = labelled_input
    base = _uninterrupted(kafka_bootstrap, make_topics, tmp_path, topic, "at-least-once")

    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "kill9", "at-least-once")
    checkpoints = _interrupt(run, signal.SIGKILL, times=3, rng=random.Random(9))
    final = run.daemon()
    try:
        run.complete([final])
    finally:
        assert final.stop() == 0, final.log_tail()
    seen = run.anomalies()

    expected, found, duplicates = _report("at-least-once, 3 x kill -9", labels, base, seen)
    assert expected <= found, f"lost labelled anomalies: {sorted(expected - found)[:10]}"
    assert {a["event_id"] for a in base} <= {a["event_id"] for a in seen}
    # A crash repeats only what was processed after the last checkpoint: every repeated alert
    # comes from an input offset at or after the offsets committed just before some kill.
    # (Silence and level_shift records are about a key, not an input record: no source offset.)
    counts = Counter(a["event_id"] for a in seen)
    repeated = {(a["source"]["partition"], a["source"]["offset"]) for a in seen if "source" in a and counts[a["event_id"]] > 1}
    for partition, offset in repeated:
        assert any(offset >= cp[partition] for cp in checkpoints), (partition, offset, checkpoints)
    print(f"  repeated alerts {duplicates}, all from offsets at or after a checkpoint committed before a kill")


def test_a_restored_snapshot_ahead_of_the_committed_offsets_is_committed_without_new_input(kafka_bootstrap, make_topics, tmp_path):
    """At-least-once: a snapshot delivered but not followed by its commit (a crash, or a commit
    refused after the group dropped the member) restores ahead of the group's offsets. The
    daemon resumes at the snapshot and must commit that position even if nothing new arrives;
    before, the offsets stayed behind until a record came, so the lag never reached zero."""
    n = 3_000
    topic = make_topics(partitions=PARTITIONS, prefix="sales")[0]
    events, _labels = _events(n, seed=41)
    produce_all(kafka_bootstrap, topic, _records(events))
    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "ahead", "at-least-once")
    first = run.daemon()
    try:
        _wait_committed(kafka_bootstrap, run.group, topic, n, 90, [first])
    finally:
        assert first.stop() == 0, first.log_tail()
    final = _committed_offsets(kafka_bootstrap, run.group, topic)

    # What the lost commit leaves behind: the group's offsets at half of each partition's.
    rewinder = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": run.group, "enable.auto.commit": False})
    try:
        rewinder.commit(offsets=[TopicPartition(topic, p, o // 2) for p, o in final.items()], asynchronous=False)
    finally:
        rewinder.close()
    assert _committed_total(kafka_bootstrap, run.group, topic) < n

    second = run.daemon()
    try:
        _wait_committed(kafka_bootstrap, run.group, topic, n, 30, [second])
        assert _committed_offsets(kafka_bootstrap, run.group, topic) == final
        # It resumed at the snapshots, not at the rewound offsets: nothing was scored again.
        assert metric(second.metrics(), 'stream_detector_events_total{outcome="scored"}') == 0
    finally:
        assert second.stop() == 0, second.log_tail()


def test_kill_9_with_exactly_once(kafka_broker, kafka_bootstrap, make_topics, tmp_path, labelled_input):
    if kafka_broker.is_tansu:
        pytest.skip(
            "tansu 0.6.0 never aborts a killed producer's open transaction: the restarted producer "
            "(same transactional.id) commits the dead one's records with its own. Set "
            "KAFKA_BOOTSTRAP_SERVERS to a real Kafka to run this test."
        )
    topic, _events_, labels = labelled_input
    base = _uninterrupted(kafka_bootstrap, make_topics, tmp_path, topic, "exactly-once")
    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "eos-kill9", "exactly-once")
    _interrupt(run, signal.SIGKILL, times=3, rng=random.Random(13))
    final = run.daemon()
    try:
        run.complete([final])
    finally:
        assert final.stop() == 0, final.log_tail()
    seen = run.anomalies()
    expected, found, duplicates = _report("exactly-once, 3 x kill -9", labels, base, seen)
    assert duplicates == 0
    assert expected <= found


def test_rebalance_moves_partitions_and_their_state(kafka_bootstrap, make_topics, tmp_path):
    """Two, then three instances in one group, then one stopped, while events keep arriving.

    Every membership change waits for the previous join to finish (tansu's coordinator wedges
    when a member leaves mid-rebalance).
    """
    topic = make_topics(partitions=PARTITIONS, prefix="sales")[0]
    events, labels = _events(N_EVENTS, seed=33)
    half = N_EVENTS // 2
    produce_all(kafka_bootstrap, topic, _records(events[:half]))

    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "rebalance", "exactly-once")
    a = run.daemon("a")
    a.wait_for(lambda m: metric(m, ASSIGNED) == PARTITIONS, 60, "a owns all partitions")
    b = run.daemon("b")
    _wait_split([a, b], [2, 1])
    producer = threading.Thread(target=produce_all, args=(kafka_bootstrap, topic, _records(events[half:])))
    producer.start()
    c = run.daemon("c")
    _wait_split([a, b, c], [1, 1, 1])
    assert b.stop() == 0, b.log_tail()
    _wait_split([a, c], [2, 1])
    producer.join()
    try:
        run.complete([a, c])
    finally:
        assert a.stop() == 0, a.log_tail()
        assert c.stop() == 0, c.log_tail()
    seen = run.anomalies()

    base_run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "rebalance-base", "exactly-once")
    solo = base_run.daemon()
    try:
        base_run.complete([solo])
    finally:
        assert solo.stop() == 0
    base = base_run.anomalies()

    expected, found, duplicates = _report("exactly-once, 1 -> 2 -> 3 -> 2 instances", labels, base, seen)
    assert duplicates == 0
    assert expected <= found
    base_scores = {r["event_id"]: r["score"] for r in base}
    seen_scores = {r["event_id"]: r["score"] for r in seen}
    assert set(seen_scores) == set(base_scores)
    assert max(abs(seen_scores[e] - base_scores[e]) for e in base_scores) < 1e-6


def _wait_split(daemons: list[DaemonProcess], counts: list[int], timeout: float = 90) -> None:
    """Wait until the instances own the given numbers of partitions (in any order)."""
    deadline = time.monotonic() + timeout
    owned: list[float] = []
    while time.monotonic() < deadline:
        owned = [metric(d.metrics(), ASSIGNED) for d in daemons]
        if sorted(owned) == sorted(counts):
            return
        time.sleep(0.3)
    raise AssertionError(f"partitions never split {counts}: {owned}\n" + "\n".join(d.log_tail(1500) for d in daemons))


def test_failure_inside_a_transaction_is_aborted_and_redone(kafka_broker, kafka_bootstrap, make_topics, tmp_path, labelled_input):
    """The broker stops answering mid-transaction: the commit fails, the daemon aborts, rewinds
    every partition to its last snapshot and offsets, and redoes the work once the broker is
    back. Nothing is lost.

    Duplicates: a real Kafka hides the aborted records from read_committed readers, so none may
    appear. tansu 0.6.0 shows aborted records to read_committed readers (checked in
    test_broker.py), so against it the aborted attempt's alerts are visible; they are counted
    and reported, and the state restore ignores aborted snapshots (it takes the snapshot that
    matches the committed offset).
    """
    broker = kafka_broker.embedded
    if broker is None:
        pytest.skip("needs the embedded broker, to stall it with SIGSTOP")
    topic, _events_, labels = labelled_input
    base = _uninterrupted(kafka_bootstrap, make_topics, tmp_path, topic, "exactly-once")

    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "abort", "exactly-once")
    path = write_config(
        tmp_path / "abort.yaml",
        kafka_bootstrap,
        topic,
        run.output,
        run.dlq,
        run.group,
        processing={**FAST, "guarantee": "exactly-once", "instance_id": "abort-a"},
        kafka={"producer_config": {"transaction.timeout.ms": 4000, "message.timeout.ms": 3000}},
    )
    daemon = DaemonProcess(path, tmp_path / "abort.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') > 2000, 90, "processing under way")
        broker.suspend()
        time.sleep(8)
        broker.resume()
        try:
            run.complete([daemon])
        except AssertionError:
            log_text = (tmp_path / "abort.log").read_text(errors="replace")
            if kafka_broker.is_tansu and "abort failed" in log_text:
                # Seen on tansu 0.6.0 in 3 of 6 runs (2026-12-03). Messages timed out in the
                # stall, so librdkafka's abort must bump the producer epoch (KIP-360: an
                # InitProducerId carrying the current id and epoch); tansu 0.6.0 answers that
                # with "Unknown broker error" every time (the log's GETPID lines), so the abort
                # never completes (resumed for ABORT_TIMEOUT_S, then given up). The daemon then
                # replaces its transactional producer, which relies on the broker aborting the
                # fenced producer's open transaction; tansu 0.6.0 never does
                # (test_kill_9_with_exactly_once is skipped on tansu for that reason), and
                # sometimes nothing is processed afterwards, with the input offsets not
                # committed. In the other runs the same abort failure is followed by a full
                # recovery. Against a real Kafka the test fails here.
                pytest.xfail("tansu 0.6.0: no progress after the timed-out abort and the producer's replacement (see the comment)")
            raise
        recoveries = metric(daemon.metrics(), "stream_detector_recoveries_total")
    finally:
        if broker.is_running:
            broker.resume()
        assert daemon.stop() == 0, daemon.log_tail()
    seen = run.anomalies()
    expected, found, duplicates = _report("exactly-once, broker stalled mid-transaction", labels, base, seen)
    print(f"  recoveries {recoveries:.0f}")
    assert recoveries >= 1, "the stall caused no failure: nothing was tested"
    assert expected <= found, f"lost labelled anomalies: {sorted(expected - found)[:10]}"
    assert {a["event_id"] for a in base} <= {a["event_id"] for a in seen}
    if not kafka_broker.is_tansu:
        assert duplicates == 0


def test_a_failure_before_the_first_checkpoint_redoes_the_partitions_from_their_start(kafka_broker, kafka_bootstrap, make_topics, tmp_path, labelled_input):
    """At-least-once, the outputs of the first minutes are not delivered (the broker stalls
    longer than message.timeout.ms) before any checkpoint exists. The rewind has no snapshot
    and no committed offset to go back to: it must go back to where processing began, not
    leave the consumer after the undone records (which lost them: their anomalies were never
    redone, and with nothing more to read the offsets were never committed)."""
    broker = kafka_broker.embedded
    if broker is None:
        pytest.skip("needs the embedded broker, to stall it with SIGSTOP")
    topic, _events_, labels = labelled_input
    base = _uninterrupted(kafka_bootstrap, make_topics, tmp_path, topic, "at-least-once")

    run = Run(kafka_bootstrap, make_topics, tmp_path, topic, "first-ckpt", "at-least-once")
    path = write_config(
        tmp_path / "first-ckpt.yaml",
        kafka_bootstrap,
        topic,
        run.output,
        run.dlq,
        run.group,
        # The first checkpoint comes long after the stall: the failure is found there, when
        # no partition has a checkpoint yet.
        processing={**FAST, "commit_interval_ms": 20_000, "guarantee": "at-least-once", "instance_id": "first-ckpt-a"},
        kafka={"producer_config": {"message.timeout.ms": 1500}},
    )
    daemon = DaemonProcess(path, tmp_path / "first-ckpt.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') > 1000, 90, "processing under way")
        assert _committed_total(kafka_bootstrap, run.group, topic) == 0
        broker.suspend()
        time.sleep(4)  # under the group's session timeout (6 s): the partitions stay assigned
        broker.resume()
        daemon.wait_for(lambda m: metric(m, "stream_detector_recoveries_total") >= 1, 60, "a recovery")
        run.complete([daemon], timeout=120)
        scored = metric(daemon.metrics(), 'stream_detector_events_total{outcome="scored"}')
    finally:
        if broker.is_running:
            broker.resume()
        assert daemon.stop() == 0, daemon.log_tail()
    seen = run.anomalies()
    expected, found, _duplicates = _report("at-least-once, failure before the first checkpoint", labels, base, seen)
    assert scored >= N_EVENTS + 1000, f"only {scored:.0f} events scored: the rewound records were not redone"
    assert expected <= found, f"lost labelled anomalies: {sorted(expected - found)[:10]}"
    assert {a["event_id"] for a in base} <= {a["event_id"] for a in seen}
