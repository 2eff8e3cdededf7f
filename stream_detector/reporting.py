"""Output helpers shared by the offline commands (``evaluate``, ``backtest``): progress lines
on stderr while they run, and the ``--json`` report file they write at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson

PROGRESS_INTERVAL_S = 2.0


class Progress:
    """Progress lines on a stream (stderr), at most one every ``interval`` seconds."""

    def __init__(self, what: str, total: int | None = None, stream: IO[str] | None = None, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, done: int, unit: str = "events") -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        line = f"{self.what}: {done:,} {unit}"
        if self.total:
            pct = 100.0 * done / self.total
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            line = f"{self.what}: {done:,}/{self.total:,} {unit} ({pct:.1f} %), {rate:,.0f} {unit}/s, ~{eta:.0f} s left"
        else:
            line += f", {rate:,.0f} {unit}/s"
        print(line, file=self.stream, flush=True)


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as indented JSON (numpy values allowed), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
