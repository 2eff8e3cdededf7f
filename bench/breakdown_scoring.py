"""Wall-clock time per part of the scoring-only path, without a profiler's distortion.

The same events and micro-batches as section 1 of ``bench/run.py`` (generated events, seed 1,
default settings). Each detector's ``score``/``commit``, each calibrator's ``transform`` and
each collective timer's ``process`` is wrapped with a timer; decode and encode are timed
around their calls. Shares are of the whole loop. Complements ``profile_scoring.py``, which
slows Python-heavy code (the per-event loops) far more than numpy and torch code.

    python -m bench.breakdown_scoring [--events 100000] [--batch-size 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any


def _timed(totals: collections.Counter, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="generator seed (the latency phases use 10, 11, ...)")
    args = parser.parse_args()

    import orjson

    from stream_detector.config import load_settings
    from stream_detector.events.decode import decode_batch
    from stream_detector.generator import GeneratorConfig, SalesGenerator
    from stream_detector.records import encode_anomalies
    from stream_detector.scoring.factory import build_pipeline, event_schema

    values = [orjson.dumps(e) for e, _ in SalesGenerator(GeneratorConfig(seed=args.seed)).generate(args.events)]
    settings = load_settings(environ={})
    pipeline = build_pipeline(settings)
    schema = event_schema(settings)
    totals: collections.Counter = collections.Counter()
    for detector in pipeline.detectors:
        detector.score = _timed(totals, f"{detector.name}.score", detector.score)
        detector.commit = _timed(totals, f"{detector.name}.commit", detector.commit)
    for name, calibrator in pipeline.calibrators.items():
        calibrator.transform = _timed(totals, f"calibration ({name})", calibrator.transform)
    for timer in pipeline.collective:
        timer.process = _timed(totals, f"{timer.name}.process (collective)", timer.process)
    decode = _timed(totals, "decode_batch", decode_batch)
    encode = _timed(totals, "encode_anomalies", encode_anomalies)

    rounds: collections.Counter = collections.Counter()
    anomalies = 0
    started = time.perf_counter()
    for start in range(0, len(values), args.batch_size):
        decoded = decode(values[start : start + args.batch_size], schema)
        result = pipeline.process(decoded.features)
        rounds[result.rounds] += 1
        anomalies += len(encode(pipeline, decoded, result))
    total = time.perf_counter() - started
    print(
        f"{len(values):,} events in batches of {args.batch_size}: {total:.2f} s ({len(values) / total:,.0f} events/s), "
        f"{anomalies} anomalies; batches by rounds: {dict(sorted(rounds.items()))}"
    )
    print("| part | s | share |\n|---|---|---|")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.2f} | {100 * seconds / total:.0f} % |")


if __name__ == "__main__":
    main()
