"""The checkpoint: every output, then the partitions' state snapshots, then their input
offsets, in this order, written once (``Checkpoint.commit``), with one class per guarantee.

* at-least-once (``AtLeastOnceCheckpoint``): produce -> flush (raise on an undelivered record)
  -> produce the snapshots -> flush -> commit the offsets. Nothing is committed after a
  failure: the work since the previous checkpoint is redone. Periodic checkpoints are
  staggered and do not wait: ``capture`` takes the state, ``advance`` takes each next step once
  the deliveries it depends on are reported;
* exactly-once (``ExactlyOnceCheckpoint``): inside the open transaction, the outputs and the
  snapshots are produced -> ``send_offsets_to_transaction`` -> commit the transaction -> begin
  the next one. A failure aborts the transaction (``rollback``).

The clients are passed to each call (the producer may be replaced); they only need the small
``CheckpointProducer`` and ``CheckpointConsumer`` protocols, so the order is unit-tested against
fakes that record the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import KafkaException, TopicPartition

from stream_detector.runtime.delivery import FLUSH_LOG_EVERY_S, DeliveryTracker, Producing, flush, produce
from stream_detector.state.changelog import checkpoint_records

if TYPE_CHECKING:
    from stream_detector.runtime.partitions import PartitionWork

log = logging.getLogger("stream_detector.daemon")

# At-least-once checkpoints are staggered: every commit_interval_ms / slices, the partitions
# longest without one are captured, so the loop stalls for a few partitions' snapshots at a
# time instead of all of them at once (the stall adds to the latency of every record waiting
# behind it). At most this many slices, so many partitions do not mean many commit requests.
CHECKPOINT_SLICES = 4
# An abort is resumed while it times out retriably, for at most ABORT_TIMEOUT_S in all, before
# the transactional producer is replaced. Each attempt returns to the loop's checks (a stop
# request) and logs that the abort is still going on.
ABORT_ATTEMPT_S = 10.0
ABORT_TIMEOUT_S = 30.0

Partitions = Mapping[tuple[str, int], "PartitionWork"]


class CheckpointProducer(Producing, Protocol):
    """What a checkpoint needs of the producer (confluent_kafka's ``Producer`` has it)."""

    def purge(self, *args: Any, **kwargs: Any) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(self, *args: Any, **kwargs: Any) -> None: ...
    def commit_transaction(self, *args: Any, **kwargs: Any) -> None: ...
    def abort_transaction(self, *args: Any, **kwargs: Any) -> None: ...


class CheckpointConsumer(Protocol):
    """What a checkpoint needs of the consumer (confluent_kafka's ``Consumer`` has it)."""

    def commit(self, *args: Any, **kwargs: Any) -> Any: ...
    def consumer_group_metadata(self) -> Any: ...


@dataclass
class PendingCheckpoint:
    """An at-least-once checkpoint on its way: the state captured at one moment, then each step
    taken once the deliveries it depends on are reported."""

    started: float
    works: dict[tuple[str, int], PartitionWork]  # the partitions captured (still ours at commit?)
    offsets: list[TopicPartition]
    snapshots: list[tuple[int, bytes, bytes]]  # (changelog partition, key, value), encoded at capture
    outputs_epoch: int  # outputs produced before the capture
    snapshots_epoch: int | None = None  # set once the snapshots are produced
    last_log: float = 0.0


def state_records(topic: str, partition: int, work: PartitionWork) -> list[tuple[bytes, bytes]]:
    """The changelog records of one partition's checkpoint: the shards of keys changed since
    its previous one, then the snapshot of the rest (state/changelog.py)."""
    assert work.position is not None
    base, shards = work.pipeline.changelog_state(changed_only=True)
    return checkpoint_records(topic, partition, work.position, base, shards, work.versions)


def offsets(parts: Partitions) -> list[TopicPartition]:
    """The offsets to commit for checkpointed partitions (only those with a position are dirty)."""
    found = []
    for (topic, partition), work in parts.items():
        assert work.position is not None, "a checkpointed partition without a position"
        found.append(TopicPartition(topic, partition, work.position))
    return found


class Checkpoint:
    """The order, written once: outputs, snapshots, offsets (see the module docstring).

    ``stopped_at`` gives the monotonic time of the stop request (None while running), ``check``
    runs while waiting (the stall check) and ``stopping`` says whether a stop was asked for.
    """

    exactly_once = False

    def __init__(
        self,
        tracker: DeliveryTracker,
        changelog_topic: str,
        state_enabled: bool,
        stopped_at: Callable[[], float | None] = lambda: None,
        check: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
        on_state_written: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.tracker = tracker
        self.on_state_written = on_state_written  # told the bytes of each checkpoint's state records
        self.changelog_topic = changelog_topic
        self.state_enabled = state_enabled
        self.stopped_at = stopped_at
        self.check = check
        self.stopping = stopping

    def commit(self, producer: CheckpointProducer, consumer: CheckpointConsumer, parts: Partitions) -> None:
        """Commit the work so far before returning: outputs, state snapshots, offsets."""
        committed = offsets(parts)
        self._outputs_done(producer)
        self.produce_snapshots(producer, parts)
        self._commit_offsets(producer, consumer, committed)

    def produce_snapshots(self, producer: Producing, parts: Partitions) -> None:
        if not self.state_enabled:
            return
        for (topic, partition), work in parts.items():
            assert work.position is not None
            for key, value in self._state_records(topic, partition, work):
                produce(producer, self.changelog_topic, key, value, None, self.tracker.callback(0.0, False), partition=partition)

    def _state_records(self, topic: str, partition: int, work: PartitionWork) -> list[tuple[bytes, bytes]]:
        records = state_records(topic, partition, work)
        self.on_state_written(sum(len(key) + len(value) for key, value in records))
        return records

    def begin(self, producer: CheckpointProducer) -> None:
        """Open the checkpoint interval (exactly-once: the transaction)."""

    def rollback(self, producer: CheckpointProducer) -> bool:
        """Drop what the interval produced; False when the producer must be replaced."""
        raise NotImplementedError

    def slices(self, n_partitions: int) -> int:
        """How many staggered checkpoints make up one commit interval."""
        return 1

    def _outputs_done(self, producer: CheckpointProducer) -> None:
        raise NotImplementedError

    def _commit_offsets(self, producer: CheckpointProducer, consumer: CheckpointConsumer, committed: list[TopicPartition]) -> None:
        raise NotImplementedError


class AtLeastOnceCheckpoint(Checkpoint):
    def _outputs_done(self, producer: CheckpointProducer) -> None:
        flush(producer, self.tracker, self.stopped_at, self.check)

    def _commit_offsets(self, producer: CheckpointProducer, consumer: CheckpointConsumer, committed: list[TopicPartition]) -> None:
        flush(producer, self.tracker, self.stopped_at, self.check)  # the snapshots
        consumer.commit(offsets=committed, asynchronous=False)

    def rollback(self, producer: CheckpointProducer) -> bool:
        # Records not yet sent would only add duplicates of what is redone.
        producer.purge(in_queue=True, in_flight=False)
        producer.poll(0)
        return True

    def slices(self, n_partitions: int) -> int:
        return max(1, min(CHECKPOINT_SLICES, n_partitions))

    def capture(self, parts: dict[tuple[str, int], PartitionWork]) -> PendingCheckpoint:
        """Capture the partitions' state and positions now; the steps follow in ``advance``."""
        snapshots: list[tuple[int, bytes, bytes]] = []
        if self.state_enabled:
            for (topic, partition), work in parts.items():
                assert work.position is not None
                # Encoded now: the models keep learning while the records wait their turn.
                records = self._state_records(topic, partition, work)
                snapshots.extend((partition, key, value) for key, value in records)
        committed = offsets(parts)
        captured_at = time.monotonic()
        for work in parts.values():
            work.dirty = False
            work.checkpointed_at = captured_at
        return PendingCheckpoint(captured_at, parts, committed, snapshots, self.tracker.close_epoch())

    def advance(self, producer: CheckpointProducer, consumer: CheckpointConsumer, pending: PendingCheckpoint, owned: Partitions) -> bool:
        """Take the pending checkpoint's next step if the deliveries it waits for are in:
        outputs delivered -> produce the snapshots; snapshots delivered -> commit the offsets
        of the partitions still ``owned`` by the same work. True once committed."""
        producer.poll(0)
        self.tracker.raise_failures()
        if pending.snapshots_epoch is None:
            if not self._waited_for(producer, pending, pending.outputs_epoch):
                return False
            for partition, key, value in pending.snapshots:
                produce(producer, self.changelog_topic, key, value, None, self.tracker.callback(0.0, False), partition=partition)
            pending.snapshots_epoch = self.tracker.close_epoch()
            producer.poll(0)
        if not self._waited_for(producer, pending, pending.snapshots_epoch):
            return False
        # Only partitions still owned by the same work: a lost partition has another owner now.
        committed = [tp for tp in pending.offsets if owned.get((tp.topic, tp.partition)) is pending.works[(tp.topic, tp.partition)]]
        if committed:
            consumer.commit(offsets=committed, asynchronous=False)
        return True

    def _waited_for(self, producer: Producing, pending: PendingCheckpoint, epoch: int) -> bool:
        if self.tracker.delivered_through(epoch):
            return True
        now = time.monotonic()
        if now - pending.started >= FLUSH_LOG_EVERY_S and now - pending.last_log >= FLUSH_LOG_EVERY_S:
            pending.last_log = now
            log.warning("checkpoint waiting for the broker to acknowledge %d record(s) (%.0f s)", len(producer), now - pending.started)
        return False


class ExactlyOnceCheckpoint(Checkpoint):
    exactly_once = True

    def _outputs_done(self, producer: CheckpointProducer) -> None:
        pass  # the outputs are in the open transaction with the snapshots and offsets

    def _commit_offsets(self, producer: CheckpointProducer, consumer: CheckpointConsumer, committed: list[TopicPartition]) -> None:
        if committed:
            producer.send_offsets_to_transaction(committed, consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(60)
        producer.begin_transaction()

    def begin(self, producer: CheckpointProducer) -> None:
        producer.begin_transaction()

    def rollback(self, producer: CheckpointProducer) -> bool:
        """Abort the open transaction, resumed while it times out retriably (for at most
        ABORT_TIMEOUT_S); False when the producer cannot abort and must be replaced."""
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        while True:
            try:
                producer.abort_transaction(ABORT_ATTEMPT_S)
                return True
            except KafkaException as exc:
                error = exc.args[0]
                # A timed-out abort goes on in the background and may be called again
                # (librdkafka: "retry call to resume"), e.g. while the broker is still away or
                # the producer bumps its epoch after timed-out messages (KIP-360).
                if error.retriable() and not error.fatal() and time.monotonic() < deadline and not self.stopping():
                    log.warning("abort not finished yet (%s): resuming it", error.str())
                    continue
                # The producer cannot abort (fatal, or still stuck): a new producer with the
                # same transactional.id fences it, and the broker aborts the old transaction.
                log.warning("abort failed (%s): replacing the transactional producer", exc)
                return False
