"""``stream-detector replay``: the daemon's scoring pipeline over JSON lines, no broker.

Reads ``processing.batch_size`` lines at a time and writes exactly one JSON line per input
line, in input order. Blank lines are input lines too (they get an error line), so line
numbers always match.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import IO

import orjson

from stream_detector.config import Settings
from stream_detector.records import replay_lines
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import ScoringPipeline


def replay(settings: Settings, src: IO[bytes], dst: IO[bytes], pipeline: ScoringPipeline | None = None) -> int:
    """Score every line of ``src`` into ``dst``; return the number of lines."""
    pipeline = pipeline or build_pipeline(settings)
    schema = event_schema(settings)
    lines_done = 0
    for chunk in _chunks(src, settings.processing.batch_size):
        values = [line.rstrip(b"\r\n") for line in chunk]
        scored = score_batch(pipeline, schema, values)
        numbers = list(range(lines_done + 1, lines_done + len(values) + 1))
        dst.write(b"".join(orjson.dumps(line) + b"\n" for _, line in replay_lines(scored.decoded, scored.result, numbers)))
        lines_done += len(values)
    dst.flush()
    return lines_done


def _chunks(src: IO[bytes], size: int) -> Iterator[list[bytes]]:
    lines = iter(src)
    while chunk := list(islice(lines, size)):
        yield chunk
