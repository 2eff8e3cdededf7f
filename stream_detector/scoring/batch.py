"""Decode then score one batch of raw record values: the one path the daemon, ``replay``,
``evaluate`` and ``backtest`` share. Only where the values come from and where the results
go differ between them.

The pipeline's event time guard (events/event_time.py) is applied here, so all four treat an
event dated years ahead the same way: dead-lettered (``future_timestamp``) or clamped, checked
against the partition's watermark and the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from stream_detector.events.decode import DecodedBatch, EventSchema, decode_batch
from stream_detector.scoring.pipeline import BatchResult, ScoringPipeline


@dataclass(frozen=True)
class ScoredBatch:
    """A raw batch after decoding and scoring: ``result`` is aligned with ``decoded.features``."""

    decoded: DecodedBatch
    result: BatchResult

    @property
    def records(self) -> int:
        """Raw records in the batch, valid or not."""
        return self.decoded.features.n + len(self.decoded.invalid)


def score_batch(pipeline: ScoringPipeline, schema: EventSchema, values: Sequence[bytes | None], now: float | None = None) -> ScoredBatch:
    """Decode ``values`` (invalid ones are split off, not scored) and score, decide and learn the valid events.

    ``now``: the wall clock for the event time guard (default: ``time.time()``).
    """
    guard = pipeline.event_time
    decoded = decode_batch(values, schema, guard.limit(time.time() if now is None else now))
    result = pipeline.process(decoded.features)
    guard.advance(decoded.features.event_time)  # only once the batch is learned
    return ScoredBatch(decoded, result)
