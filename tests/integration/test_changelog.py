"""The changelog reader against the session broker: several partitions read by one consumer.

Each changelog partition holds the snapshots of the input partition with the same number; the
reader keeps, per partition, the newest complete snapshot (or the one of a required position).
"""

from __future__ import annotations

from confluent_kafka import Producer

from stream_detector.state.changelog import read_latest_snapshots, snapshot_records
from stream_detector.state.snapshot import CHUNK_BYTES


def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    failures = []
    for partition, key, value in records:
        producer.produce(topic, key=key, value=value, partition=partition, on_delivery=lambda err, _m: err and failures.append(err))
    assert producer.flush(30) == 0 and not failures, failures


def _snapshot(input_topic: str, partition: int, position: int, state: dict) -> list[tuple[int, bytes, bytes]]:
    return [(partition, key, value) for key, value in snapshot_records(input_topic, partition, position, state)]


def test_each_partition_gets_its_newest_complete_snapshot_in_one_read(kafka_bootstrap, make_topics, unique_name):
    (changelog,) = make_topics(partitions=4)
    input_topic = unique_name("input")
    big = {"blob": b"x" * (2 * CHUNK_BYTES + 10)}  # three chunks
    records = [
        *_snapshot(input_topic, 0, 100, {"n": 0}),
        *_snapshot(input_topic, 0, 250, {"n": 1}),
        *_snapshot(input_topic, 2, 500, {"n": 1}),
        *_snapshot(input_topic, 2, 900, {"n": 2, **big}),
        # The first chunk of a newer snapshot whose other chunks never came: not complete.
        _snapshot(input_topic, 2, 950, {"n": 3, **big})[0],
        *_snapshot("another-input", 3, 7, {"n": 9}),  # another input topic's snapshot: ignored
    ]
    _produce(kafka_bootstrap, changelog, records)

    found = read_latest_snapshots({"bootstrap.servers": kafka_bootstrap}, changelog, input_topic, dict.fromkeys(range(4)))

    assert sorted(found) == [0, 1, 2, 3]
    assert found[1] is None and found[3] is None
    assert (found[0].header.position, found[0].state) == (250, {"n": 1})
    assert (found[2].header.position, found[2].header.count, found[2].state) == (900, 3, {"n": 2, **big})
    # Read alone, a partition reads the same.
    alone = read_latest_snapshots({"bootstrap.servers": kafka_bootstrap}, changelog, input_topic, {0: None})
    assert alone[0].header.position == 250


def test_a_required_position_picks_that_snapshot_per_partition(kafka_bootstrap, make_topics, unique_name):
    (changelog,) = make_topics(partitions=2)
    input_topic = unique_name("input")
    records = [
        *_snapshot(input_topic, 0, 100, {"n": 0}),
        *_snapshot(input_topic, 0, 250, {"n": 1}),
        *_snapshot(input_topic, 1, 40, {"n": 2}),
        *_snapshot(input_topic, 1, 60, {"n": 3}),
    ]
    _produce(kafka_bootstrap, changelog, records)

    found = read_latest_snapshots({"bootstrap.servers": kafka_bootstrap}, changelog, input_topic, {0: 100, 1: 61})

    assert found[0].state == {"n": 0}  # the older one: its position is the required one
    assert found[1] is None  # no snapshot of position 61


def test_no_partitions_reads_nothing(kafka_bootstrap):
    assert read_latest_snapshots({"bootstrap.servers": kafka_bootstrap}, "never-created", "input", {}) == {}
