"""The state changelog topic: each input partition's state, stored next to the offsets.

Layout: changelog partition ``p`` holds the state of input partition ``p`` (the topic has as
many partitions as the input topic). A checkpoint writes the shards of keys that changed since
the previous one (record key ``<input topic>/<partition>/s/<part>/<shard>``), then a snapshot of
the rest (``<input topic>/<partition>/<chunk>``) that names the checkpoint holding the current
copy of every shard (``state/snapshot.py``), so a compacted topic keeps one copy of each shard
and the newest snapshot, and a checkpoint costs what changed, not the whole state. A snapshot
records the input position it reflects; restoring reads the partition to its end and keeps the
last complete snapshot with the shards it names.

Which copy of a shard a snapshot names: the newest one written before it. A partition's state
has one writer, and every restore (start, rebalance, rewind) starts a new line of checkpoints
whose first one writes every shard, so the copies a snapshot names are never older than an
abandoned checkpoint's. The reader keeps two copies per shard at most: as of the last complete
snapshot, and since.

Exactly-once: snapshots are produced inside the transaction that also commits the offsets, and
the restore reader is ``read_committed``, so the snapshot found is the one that matches the
committed offsets. At-least-once: the snapshot is flushed before the offsets are committed; a
restore resumes from the snapshot's own position, which is never behind what was delivered.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from stream_detector.consumed import offset as consumed_offset
from stream_detector.consumed import topic_partition
from stream_detector.errors import StateError
from stream_detector.state.snapshot import ShardHeader, SnapshotHeader, Versions, decode_shard, decode_snapshot, encode_shard, encode_snapshot, split_record

log = logging.getLogger("stream_detector.state")

COMPACTED = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class Restored:
    header: SnapshotHeader
    state: dict[str, Any]
    # part -> shard name -> shard state, for ``ScoringPipeline.load_state_dict``; None when
    # ``state`` is a whole state_dict.
    shards: dict[str, dict[str, Any]] | None = None


# Told about each changelog record or snapshot that cannot be restored: (input partition, error
# with its reason, the changelog offset or None for a whole snapshot). It may raise to stop.
OnUnreadable = Callable[[int, StateError, int | None], None]


def snapshot_records(topic: str, partition: int, position: int, state: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """(key, value) records of a snapshot of a whole ``state_dict``, for changelog partition
    ``partition``."""
    chunks = encode_snapshot(state, topic, partition, position)
    return [(f"{topic}/{partition}/{i}".encode(), chunk) for i, chunk in enumerate(chunks)]


def checkpoint_records(
    topic: str, partition: int, position: int, base: dict[str, Any], shards: dict[str, dict[str, Any]], versions: Versions
) -> list[tuple[bytes, bytes]]:
    """(key, value) records of one checkpoint of a sharded state (``changelog_state``): the
    changed ``shards``, then the snapshot of ``base``. ``versions`` is the partition's record
    of which checkpoint wrote each shard's current copy, updated here."""
    checkpoint = uuid.uuid4().hex
    records = []
    for part, named in shards.items():
        for name, shard in named.items():
            records.append((f"{topic}/{partition}/s/{part}/{name}".encode(), encode_shard(shard, checkpoint, topic, partition, part, name)))
            versions.setdefault(part, {})[name] = checkpoint
    chunks = encode_snapshot(base, topic, partition, position, versions, snapshot_id=checkpoint)
    return [*records, *((f"{topic}/{partition}/{i}".encode(), chunk) for i, chunk in enumerate(chunks))]


@dataclass
class _Copy:
    checkpoint: str
    offset: int
    payload: bytes


class _PartitionLog:
    """One partition's changelog as it is read: the newest complete snapshot that qualifies and
    the copies of the shards it can name (see the module docstring)."""

    def __init__(self, wanted: int | None) -> None:
        self.wanted = wanted
        self.pending_chunks: dict[str, list[bytes]] = {}
        self.latest: list[bytes] | None = None
        self.named: dict[tuple[str, str], _Copy] = {}  # as of the latest qualifying snapshot
        self.since: dict[tuple[str, str], _Copy] = {}  # written after it

    def add(self, header: SnapshotHeader | ShardHeader, value: bytes, payload: bytes, offset: int) -> None:
        if isinstance(header, ShardHeader):
            self.since[(header.part, header.name)] = _Copy(header.checkpoint, offset, payload)
            return
        if self.wanted is not None and header.position > self.wanted:
            return  # not the committed offset's (an aborted transaction shown to this reader)
        chunks = self.pending_chunks.setdefault(header.snapshot_id, [])
        chunks.append(value)
        if len(chunks) < header.count:
            return
        complete = self.pending_chunks.pop(header.snapshot_id)
        self.pending_chunks.clear()  # older incomplete snapshots can never complete
        self.named.update(self.since)
        self.since.clear()
        if self.wanted is None or header.position == self.wanted:
            self.latest = complete  # an earlier one's shards count, but only it is restored

    def shard(self, part: str, name: str, checkpoint: str) -> _Copy | None:
        """The copy of a shard a snapshot names; else a newer one (compaction may have removed
        the named copy when a checkpoint that did not finish wrote a newer one: at-least-once,
        the state is then a little ahead of the position); None when there is none."""
        named, newer = self.named.get((part, name)), self.since.get((part, name))
        if named is not None and named.checkpoint == checkpoint:
            return named
        found = newer or named
        if found is not None:
            log.warning("state shard %s %s of checkpoint %s not found: using the copy of checkpoint %s", part, name, checkpoint, found.checkpoint)
        return found


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
    logs = {p: _PartitionLog(wanted) for p, wanted in positions.items()}
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
                    header, payload = split_record(value)
                except StateError as exc:
                    _unreadable(on_unreadable, partition, exc, msg.offset())
                    continue
                if header.topic != input_topic or header.partition != partition:
                    continue
                logs[partition].add(header, value, payload, consumed_offset(msg))
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
    for partition, found in logs.items():
        restored[partition] = one = _restored(found, partition, on_unreadable)
        if one is not None:
            log.info(
                "restored state of %s/%d at offset %d from %s (%d chunk(s), %d shard(s), %.2f s)",
                input_topic,
                partition,
                one.header.position,
                changelog_topic,
                one.header.count,
                sum(len(named) for named in (one.shards or {}).values()),
                time.monotonic() - started,
            )
    return restored


def _restored(found: _PartitionLog, partition: int, on_unreadable: OnUnreadable | None) -> Restored | None:
    if found.latest is None:
        return None
    try:
        snapshot = decode_snapshot(found.latest)
    except StateError as exc:
        _unreadable(on_unreadable, partition, exc, None)
        return None
    if snapshot.versions is None:
        return Restored(snapshot.header, snapshot.state)
    shards: dict[str, dict[str, Any]] = {}
    for part, named in snapshot.versions.items():
        for name, checkpoint in named.items():
            copy = found.shard(part, name, checkpoint)
            if copy is None:
                continue  # its part does not restore (incomplete), unless the base no longer names it
            try:
                shards.setdefault(part, {})[name] = decode_shard(copy.payload)
            except StateError as exc:
                _unreadable(on_unreadable, partition, exc, copy.offset)
    return Restored(snapshot.header, snapshot.state, shards)


def _unreadable(on_unreadable: OnUnreadable | None, partition: int, error: StateError, offset: int | None) -> None:
    if on_unreadable is None:
        raise error
    on_unreadable(partition, error, offset)
