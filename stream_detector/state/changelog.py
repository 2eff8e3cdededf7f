"""The state changelog topic: one snapshot per input partition, stored next to the offsets.

Layout: changelog partition ``p`` holds the snapshots of input partition ``p`` (the topic has
as many partitions as the input topic). Record key ``<input topic>/<partition>/<chunk>``, so a
compacted topic keeps only the newest chunks. A snapshot records the input position it
reflects; restoring reads the partition to its end and keeps the last complete snapshot.

Exactly-once: snapshots are produced inside the transaction that also commits the offsets, and
the restore reader is ``read_committed``, so the snapshot found is the one that matches the
committed offsets. At-least-once: the snapshot is flushed before the offsets are committed; a
restore resumes from the snapshot's own position, which is never behind what was delivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from stream_detector.consumed import topic_partition
from stream_detector.errors import StateError
from stream_detector.state.snapshot import SnapshotHeader, decode_snapshot, encode_snapshot, split_chunk

log = logging.getLogger("stream_detector.state")

COMPACTED = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class Restored:
    header: SnapshotHeader
    state: dict[str, Any]


# Told about each changelog record or snapshot that cannot be restored: (input partition, error
# with its reason, the changelog offset or None for a whole snapshot). It may raise to stop.
OnUnreadable = Callable[[int, StateError, int | None], None]


def snapshot_records(topic: str, partition: int, position: int, state: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """(key, value) records of one snapshot, for changelog partition ``partition``."""
    chunks = encode_snapshot(state, topic, partition, position)
    return [(f"{topic}/{partition}/{i}".encode(), chunk) for i, chunk in enumerate(chunks)]


def read_latest_snapshots(
    consumer_config: dict[str, Any],
    changelog_topic: str,
    input_topic: str,
    positions: dict[int, int | None],
    idle_s: float = 0.3,
    timeout_s: float = 60.0,
    on_unreadable: OnUnreadable | None = None,
) -> dict[int, Restored | None]:
    """The newest complete snapshot of each ``input_topic`` partition in ``positions``, or None
    for a partition that has none; all read by one consumer, so an assignment of n partitions
    costs one client start and one end-of-partition wait instead of n (about 1 s each on a
    local broker).

    ``positions`` maps each partition to None or a required position: then only a snapshot of
    exactly that input position qualifies. Under exactly-once the committed offset and its
    snapshot were committed together, so this also skips snapshots of aborted transactions on
    brokers that show them to read_committed readers (tansu 0.6.0 does).

    Anyone who can write the changelog topic chooses its bytes. A record that is not a chunk of
    this format (no header, a bad header, a pickle format) is skipped, and a complete snapshot
    that does not decode leaves its partition without one (None); each is reported to
    ``on_unreadable``, or raised as ``StateError`` when there is none.
    """
    if not positions:
        return {}
    consumer = Consumer(
        {
            **consumer_config,
            "group.id": f"{changelog_topic}-restore",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # The end of a partition is only seen in a fetch response, and a broker holds a
            # fetch that has nothing to return for this long (librdkafka's default: 500 ms).
            "fetch.wait.max.ms": 50,
        }
    )
    started = time.monotonic()
    pending: dict[int, dict[str, list[bytes]]] = {p: {} for p in positions}
    latest: dict[int, list[bytes] | None] = dict.fromkeys(positions)
    at_eof = dict.fromkeys(positions, False)
    try:
        consumer.assign([TopicPartition(changelog_topic, p, OFFSET_BEGINNING) for p in positions])
        last_record = time.monotonic()
        while time.monotonic() - started < timeout_s:
            messages = consumer.consume(1000, timeout=0.1)
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof[topic_partition(msg)[1]] = True
                        continue
                    raise StateError(f"reading {changelog_topic}/{msg.partition()}: {err}")
                (_, partition), value = topic_partition(msg), msg.value()
                at_eof[partition] = False
                last_record = time.monotonic()
                try:
                    if value is None:
                        raise StateError("a record without a value is not a state chunk", reason="corrupt")
                    header, _ = split_chunk(value)
                except StateError as exc:
                    _unreadable(on_unreadable, partition, exc, msg.offset())
                    continue
                if header.topic != input_topic or header.partition != partition:
                    continue
                wanted = positions[partition]
                if wanted is not None and header.position != wanted:
                    continue
                chunks = pending[partition].setdefault(header.snapshot_id, [])
                chunks.append(value)
                if len(chunks) == header.count:
                    latest[partition] = pending[partition].pop(header.snapshot_id)
                    pending[partition].clear()  # older incomplete snapshots can never complete
            # EOF as reported by the broker, plus a short quiet period: some brokers report the
            # end of a partition before the last batch is readable.
            if all(at_eof.values()) and time.monotonic() - last_record >= idle_s:
                break
        else:
            behind = sorted(p for p, eof in at_eof.items() if not eof) or sorted(positions)
            raise StateError(f"restoring {input_topic} partitions {behind} from {changelog_topic} took over {timeout_s:.0f} s")
    finally:
        consumer.close()
    restored: dict[int, Restored | None] = {}
    for partition, complete in latest.items():
        if complete is None:
            restored[partition] = None
            continue
        try:
            header, state = decode_snapshot(complete)
        except StateError as exc:
            _unreadable(on_unreadable, partition, exc, None)
            restored[partition] = None
            continue
        log.info(
            "restored state of %s/%d at offset %d from %s (%d chunk(s), %.2f s)",
            input_topic,
            partition,
            header.position,
            changelog_topic,
            header.count,
            time.monotonic() - started,
        )
        restored[partition] = Restored(header, state)
    return restored


def _unreadable(on_unreadable: OnUnreadable | None, partition: int, error: StateError, offset: int | None) -> None:
    if on_unreadable is None:
        raise error
    on_unreadable(partition, error, offset)
