"""``evaluate --partitions P --instances I``: the stream scored the way a deployment scores it.

One pipeline over the whole stream (``replay``, plain ``evaluate``) is the reference, but a
daemon scores a topic of P partitions with one pipeline per partition, spread over I
instances, and (with ``scaling.share_calibration``) the partitions calibrate with one fit per
instance over every partition's window, the other instances' summaries arriving over the
population topic. ``DeploymentScorer`` does the same offline, with the daemon's own classes:

* every record goes to the partition confluent-kafka's default partitioner gives its key: the
  ``schema.key_fields`` values joined with ``|`` (the generator's producer keys by
  ``store_id``), ``crc32(key) % P``; a record without them (or not JSON) goes to
  ``position % P``;
* the stream arrives in windows of ``window`` records (250: about 50 ms at 5,000 events/s), and
  each instance scores each of its partitions' records of the window with that partition's
  pipeline, in offset order (range assignment, as the daemon's consumer gets);
* after each window the instances' new summaries reach the others (the population topic's
  delay is taken as one window; under exactly-once it is up to a checkpoint interval);
* with ``restart_every``, every instance restarts after each such many records (at the end of
  a window): every partition's pipeline goes through its snapshot (``state_dict``, the state
  encoding, ``load_state_dict`` into a fresh copy, what the changelog carries), and the shared
  calibration is rebuilt from the latest summary of each partition (what a restarted instance
  reads from the compacted population topic). Parts that cannot be restored are counted in
  ``restore_failures``.

Scores do not depend on batch boundaries, so a partition's results depend on the window only
through what the shared calibration had seen.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson

from stream_detector.config import Settings, population_topic
from stream_detector.events.decode import EventSchema
from stream_detector.scoring.batch import ScoredBatch, score_batch
from stream_detector.scoring.pipeline import ScoringPipeline
from stream_detector.scoring.shared_calibration import CalibrationPool
from stream_detector.state import codec

# Records of the stream per arrival window (module docstring).
DEFAULT_WINDOW = 250


@dataclass(frozen=True)
class Deployment:
    partitions: int
    instances: int = 1
    window: int = DEFAULT_WINDOW
    restart_every: int | None = None  # records between restarts of every instance

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.instances < 1 or self.window < 1 or (self.restart_every is not None and self.restart_every < 1):
            raise ValueError(f"partitions, instances, window and restart_every must be >= 1, got {self}")
        if self.instances > self.partitions:
            raise ValueError(f"{self.instances} instances for {self.partitions} partitions: some would own none")

    def assignment(self) -> list[list[int]]:
        """Partitions per instance, as the range assignor gives them."""
        p, n = self.partitions, self.instances
        return [list(range(i * p // n, (i + 1) * p // n)) for i in range(n)]

    def describe(self) -> str:
        partitions = f"{self.partitions} partition{'s' if self.partitions > 1 else ''}"
        text = f"{partitions} over {self.instances} instance{'s' if self.instances > 1 else ''}, windows of {self.window} records"
        return text if self.restart_every is None else f"{text}, restarted every {self.restart_every:,} records"


class DeploymentScorer:
    """Scores arriving windows of records as ``deployment`` would (module docstring)."""

    def __init__(self, fresh: ScoringPipeline, settings: Settings, schema: EventSchema, deployment: Deployment) -> None:
        self.deployment = deployment
        self.schema = schema
        self.batch_size = settings.processing.batch_size
        self.key_fields = list(settings.schema.key_fields)
        self.settings = settings
        self.fresh = fresh
        shared = population_topic(settings) is not None
        self.pools = [CalibrationPool.from_settings(settings) for _ in range(deployment.instances)] if shared else []
        self.topic: dict[str, bytes] = {}  # the population topic, compacted: source -> latest summary
        self.restarts = 0
        self.restore_failures = 0
        self._since_restart = 0
        self.owner: dict[int, int] = {}
        self.pipelines: dict[int, ScoringPipeline] = {}
        budget = settings.state.max_bytes
        for instance, owned in enumerate(deployment.assignment()):
            for p in owned:
                pipeline = copy.deepcopy(fresh)
                pipeline.max_state_bytes = None if budget is None else budget // len(owned)
                if self.pools:
                    self.pools[instance].attach(pipeline)
                self.pipelines[p], self.owner[p] = pipeline, instance

    def partition_of(self, value: bytes, position: int) -> int:
        try:
            doc = orjson.loads(value)
            key = "|".join(str(doc[f]) for f in self.key_fields) if isinstance(doc, dict) else None
        except (orjson.JSONDecodeError, KeyError):
            key = None
        if key is None:
            return position % self.deployment.partitions
        return zlib.crc32(key.encode()) % self.deployment.partitions

    def score(self, values: list[bytes], first_position: int) -> Iterator[tuple[np.ndarray, ScoredBatch]]:
        """For one window: (stream positions of a batch's records, its scored batch), partition
        by partition; then the summaries are exchanged."""
        parts = np.array([self.partition_of(v, first_position + j) for j, v in enumerate(values)], dtype=np.int64)
        for owned in self.deployment.assignment():
            for p in owned:
                mine = np.flatnonzero(parts == p)
                for lo in range(0, mine.size, self.batch_size):
                    rows = mine[lo : lo + self.batch_size]
                    yield first_position + rows, score_batch(self.pipelines[p], self.schema, [values[j] for j in rows.tolist()])
                if self.pools and mine.size:
                    self.pools[self.owner[p]].contribute(str(p), self.pipelines[p])
        self._exchange()
        self._since_restart += len(values)
        every = self.deployment.restart_every
        if every is not None and self._since_restart >= every:
            self._restart()

    def _exchange(self) -> None:
        sent = [pool.take_outbox() for pool in self.pools]
        for sender, records in enumerate(sent):
            self.topic.update(records)
            for receiver, pool in enumerate(self.pools):
                if receiver != sender:
                    for source, record in records.items():
                        pool.receive(source, record)

    def _restart(self) -> None:
        """Every instance stops and starts again (module docstring)."""
        self._since_restart = 0
        self.restarts += 1
        for p, pipeline in self.pipelines.items():
            restored = copy.deepcopy(self.fresh)
            restored.max_state_bytes = pipeline.max_state_bytes
            self.restore_failures += len(restored.load_state_dict(codec.decode(codec.encode(pipeline.state_dict()))))
            self.pipelines[p] = restored
        if self.pools:
            self.pools = [CalibrationPool.from_settings(self.settings) for _ in self.pools]
            for pool in self.pools:
                for source, record in self.topic.items():
                    pool.receive(source, record)
            for p, pipeline in self.pipelines.items():
                self.pools[self.owner[p]].attach(pipeline)
