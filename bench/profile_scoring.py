"""cProfile of the scoring-only path (decode_batch + ScoringPipeline.process + encode_anomalies).

The same events and micro-batches as section 1 of ``bench/run.py``: generated events (seed 1),
default settings, ``--batch-size`` (default 2000, the default processing.batch_size). Prints the
top functions by own time and by cumulative time, so whoever optimises the engine sees where
the time goes. Profiling slows Python-heavy code more than numpy/torch code, so read it as
shares, and check a change with ``python -m bench.run --only scoring``.

    python -m bench.profile_scoring [--events 50000] [--batch-size 2000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", help="also write the raw profile here (for snakeviz, pstats)")
    args = parser.parse_args()

    import orjson

    from stream_detector.config import load_settings
    from stream_detector.events.decode import decode_batch
    from stream_detector.generator import GeneratorConfig, SalesGenerator
    from stream_detector.records import encode_anomalies
    from stream_detector.scoring.factory import build_pipeline, event_schema

    values = [orjson.dumps(e) for e, _ in SalesGenerator(GeneratorConfig(seed=1)).generate(args.events)]
    settings = load_settings(environ={})
    pipeline = build_pipeline(settings)
    schema = event_schema(settings)

    def run() -> int:
        anomalies = 0
        for start in range(0, len(values), args.batch_size):
            decoded = decode_batch(values[start : start + args.batch_size], schema)
            result = pipeline.process(decoded.features)
            anomalies += len(encode_anomalies(pipeline, decoded, result))
        return anomalies

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    anomalies = run()
    profiler.disable()
    seconds = time.perf_counter() - t0
    print(
        f"{len(values)} events in batches of {args.batch_size}: {seconds:.2f} s under the profiler "
        f"({len(values) / seconds:,.0f} events/s), {anomalies} anomalies"
    )
    if args.output:
        profiler.dump_stats(args.output)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key)
        stats.print_stats(args.top)
        text = out.getvalue()
        print(f"\n=== top {args.top} by {key} ===")
        print(text[text.find("   ncalls") :].rstrip())


if __name__ == "__main__":
    main()
