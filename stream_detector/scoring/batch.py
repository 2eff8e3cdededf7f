"""Decode then score one batch of raw record values: the one path the daemon, ``replay``,
``evaluate`` and ``backtest`` share. Only where the values come from and where the results
go differ between them.
"""

from __future__ import annotations

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


def score_batch(pipeline: ScoringPipeline, schema: EventSchema, values: Sequence[bytes | None]) -> ScoredBatch:
    """Decode ``values`` (invalid ones are split off, not scored) and score, decide and learn the valid events."""
    decoded = decode_batch(values, schema)
    return ScoredBatch(decoded, pipeline.process(decoded.features))
