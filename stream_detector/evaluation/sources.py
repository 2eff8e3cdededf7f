"""Where ``stream-detector evaluate`` gets its events: the synthetic stream or a JSON-lines file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from stream_detector.errors import ConfigError
from stream_detector.evaluation.labels import Labels


def generated_events(count: int, seed: int, anomaly_rate: float, labels: Labels, drift_at: int | None = None) -> Iterator[bytes]:
    """The synthetic stream of ``stream-detector generate`` as raw JSON values, labels added
    to ``labels`` as their events are yielded (store-stopped windows at the end). With
    ``drift_at``, the drift scenarios start at that position; their change labels are added
    before the first changed event is yielded."""
    from stream_detector.generator import GeneratorConfig, SalesGenerator

    generator = SalesGenerator(GeneratorConfig(seed=seed, anomaly_rate=anomaly_rate, drift_at=drift_at))
    changes_added = False
    for event, label in generator.generate(count):
        if not changes_added and generator.change_labels:
            for change in generator.change_labels:
                labels.add(change)
            changes_added = True
        if label is not None:
            labels.add(label)
        yield orjson.dumps(event)
    for window in generator.window_labels:
        labels.add(window)


def file_events(path: str | Path) -> tuple[Iterator[bytes], int]:
    """Lines of a JSON-lines file (line endings stripped) and how many there are."""
    try:
        with open(path, "rb") as handle:
            total = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
            handle.seek(0, 2)
            if handle.tell():
                handle.seek(-1, 2)
                total += handle.read(1) != b"\n"
    except OSError as exc:
        raise ConfigError(f"--events {path}: {exc.strerror}") from None

    def lines() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            for line in handle:
                yield line.rstrip(b"\r\n")

    return lines(), total
