"""The input partitions this instance owns: each one's work (its own pipeline and position),
restored from the changelog on assignment, rewound to its last checkpoint after a failure and
forgotten on revocation."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import TopicPartition

from stream_detector.config import Settings, librdkafka_config
from stream_detector.errors import StateError, UnrestorableStateError
from stream_detector.metrics import Metrics
from stream_detector.scoring.pipeline import ScoringPipeline
from stream_detector.state.changelog import read_latest_snapshots
from stream_detector.state.snapshot import Versions

log = logging.getLogger("stream_detector.daemon")


@dataclass
class PartitionWork:
    """One input partition owned by this instance: its own pipeline (all per-key and global
    model state for the events of that partition) and the next offset to process."""

    pipeline: ScoringPipeline
    position: int | None  # None until the first record (or a restored snapshot) says
    dirty: bool = False  # processed since the last checkpoint
    # Offset of the first record processed while the partition has no checkpoint: where a
    # rewind goes back to when there is neither a snapshot nor a committed offset.
    origin: int | None = None
    last_event_time: float | None = None  # of the latest scored event (active windows gauge)
    # Monotonic time of its last checkpoint capture (or of its assignment): staggered
    # checkpoints take the partitions longest without one first.
    checkpointed_at: float = field(default_factory=time.monotonic)
    # Which checkpoint wrote each of its state shards (state/changelog.py). Empty for new work:
    # its pipeline is fresh or restored, so its first checkpoint writes every shard.
    versions: Versions = field(default_factory=dict)


class OffsetReader(Protocol):
    def committed(self, *args: Any, **kwargs: Any) -> list[TopicPartition]: ...
    def seek(self, partition: TopicPartition) -> None: ...


def dirty(partitions: Mapping[tuple[str, int], PartitionWork]) -> dict[tuple[str, int], PartitionWork]:
    """The partitions processed since their last checkpoint (with a position to commit)."""
    return {tp: w for tp, w in partitions.items() if w.dirty and w.position is not None}


def due(partitions: Mapping[tuple[str, int], PartitionWork], slices: int, everything: bool, interval_s: float) -> dict[tuple[str, int], PartitionWork]:
    """The dirty partitions a periodic checkpoint captures: this slice's share of the owned
    partitions, longest without a checkpoint first, plus any whose last one is an interval
    old (a slice skipped while the previous checkpoint waited for its deliveries)."""
    found = dirty(partitions)
    if everything or slices == 1 or not found:
        return found
    share = -(-len(partitions) // slices)
    overdue = time.monotonic() - interval_s
    ranked = sorted(found.items(), key=lambda item: item[1].checkpointed_at)
    return {tp: work for k, (tp, work) in enumerate(ranked) if k < share or work.checkpointed_at <= overdue}


def committed_many(consumer: OffsetReader, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
    found = consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=30)
    return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in found}


def rewind(consumer: OffsetReader, partitions: dict[tuple[str, int], PartitionWork], before: Mapping[tuple[str, int], PartitionWork]) -> None:
    """Seek every (restored) partition back to its last checkpoint: its snapshot's position,
    else its committed offset, else where its processing began (``before``'s origin)."""
    unrestored = [tp for tp, work in partitions.items() if work.position is None]
    committed = committed_many(consumer, unrestored) if unrestored else {}
    for (topic, partition), work in partitions.items():
        position = work.position if work.position is not None else committed[(topic, partition)]
        if position is None:
            # No checkpoint of this partition yet: redo it from where its processing began.
            # Left where it is, the consumer would go on after the undone records.
            position = work.origin = before[(topic, partition)].origin
        if position is not None:
            consumer.seek(TopicPartition(topic, partition, position))


def forget(partitions: dict[tuple[str, int], PartitionWork], revoked: list[TopicPartition], metrics: Metrics) -> None:
    for tp in revoked:
        partitions.pop((tp.topic, tp.partition), None)
        with contextlib.suppress(KeyError):  # no lag reported for it yet
            metrics.lag.remove(tp.topic, str(tp.partition))
    metrics.assigned.set(len(partitions))


class Restorer:
    """Each partition's pipeline from its newest snapshot in the changelog, or a fresh one."""

    def __init__(self, settings: Settings, pipeline: ScoringPipeline, metrics: Metrics, changelog_topic: str) -> None:
        self.settings = settings
        self.pipeline = pipeline  # fresh, copied for every partition that has no snapshot yet
        self.metrics = metrics
        self.changelog_topic = changelog_topic
        self.exactly_once = settings.processing.guarantee == "exactly-once"

    def restore(self, consumer: OffsetReader, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], PartitionWork]:
        """Each partition's pipeline from its newest snapshot, or a fresh one. The partitions
        are read together: one committed-offset lookup and one changelog reader in all."""
        if not self.settings.state.enabled:
            return {tp: PartitionWork(copy.deepcopy(self.pipeline), None) for tp in partitions}
        started = time.perf_counter()
        committed = committed_many(consumer, partitions)
        wanted: dict[str, dict[int, int | None]] = {}
        for (topic, partition), offset in committed.items():
            if self.exactly_once and offset is None:
                log.info("no committed offset for %s/%d: starting from fresh models", topic, partition)
                continue
            # Exactly-once: the snapshot that belongs to the committed offset (see read_latest_snapshots).
            wanted.setdefault(topic, {})[partition] = offset if self.exactly_once else None
        restored = {
            (topic, partition): found
            for topic, positions in wanted.items()
            for partition, found in read_latest_snapshots(
                librdkafka_config(self.settings, "consumer"),
                self.changelog_topic,
                topic,
                positions,
                # The setting bounds one partition's restore; these are read together.
                timeout_s=self.settings.state.restore_timeout_s * len(positions),
                on_unreadable=functools.partial(self.unreadable_state, topic),
            ).items()
        }
        if wanted:
            self.metrics.restore_seconds.observe(time.perf_counter() - started)
        works = {}
        for tp in partitions:
            pipeline = copy.deepcopy(self.pipeline)
            found = restored.get(tp)
            if found is None:
                if tp in restored:
                    log.info("no saved state for %s/%d: starting from fresh models", *tp)
                works[tp] = PartitionWork(pipeline, None)
                continue
            try:
                failures = pipeline.load_state_dict(found.state, found.shards)
            except StateError as exc:  # not a pipeline state at all: every part starts fresh
                self.state_failure(tp, "snapshot", exc.reason, str(exc))
                works[tp] = PartitionWork(copy.deepcopy(self.pipeline), None)
                continue
            for failure in failures:
                self.state_failure(tp, failure.part, failure.reason, failure.message)
            work = works[tp] = PartitionWork(pipeline, found.header.position)
            if committed[tp] != work.position:
                # At-least-once: the snapshot was delivered but the commit after it was not (a
                # crash, a lost group membership). Commit its position at the next checkpoint
                # even if no record arrives: otherwise the group's offset stays behind until one does.
                work.dirty = True
        return works

    def unreadable_state(self, topic: str, partition: int, error: StateError, offset: int | None) -> None:
        """A changelog record (``offset``) or a whole snapshot (None) of ``topic``/``partition``
        that cannot be read: skipped (a partition left without a snapshot starts fresh)."""
        if offset is None:
            self.state_failure((topic, partition), "snapshot", error.reason, str(error))
        else:
            part = f"changelog record {self.changelog_topic}/{partition}@{offset}"
            self.state_failure((topic, partition), part, error.reason, str(error), "skipped")

    def state_failure(self, tp: tuple[str, int], part: str, reason: str, message: str, outcome: str = "it starts fresh") -> None:
        """Count and log a part of a partition's state that is not restored; under
        ``state.on_unreadable: fail`` stop instead of starting it fresh."""
        self.metrics.restore_failures.labels(reason).inc()
        fields = {"topic": tp[0], "partition": tp[1], "part": part, "reason": reason}
        if self.settings.state.on_unreadable == "fail":
            log.error("state of %s/%d: %s cannot be restored (%s): %s; stopping (state.on_unreadable: fail)", *tp, part, reason, message, extra=fields)
            raise UnrestorableStateError(f"state of {tp[0]}/{tp[1]}: {part} cannot be restored ({reason}): {message} (state.on_unreadable: fail)")
        log.warning("state of %s/%d: %s not restored (%s): %s; %s (state.on_unreadable: reset)", *tp, part, reason, message, outcome, extra=fields)
