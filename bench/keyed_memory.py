"""Keyed memory at scale: per-key state held by each instance, 12 partitions over 1, 2, 3 instances.

    python -m bench.keyed_memory [--quick] [--events N] [--products N]

Offline (no broker). Issue 20 asks that memory per instance for many products and customers
fall as instances are added. A stream with many products and customers (``generate`` with
``n_products`` products and about ``events_per_day / 2`` customers, capped at 200,000 by the
generator) is split by its Kafka key (``store_id``) into 12 partitions as the default
partitioner does (``bench.quality_at_scale.partition_of``), and each partition is scored by its
own pipeline, as the daemon does. Then, for 1, 2 and 3 instances (range assignment), each
instance's per-key state is the sum over its partitions of ``ScoringPipeline.state_bytes`` (the
estimate ``state.max_bytes`` bounds) and of the keys each key set holds.

The reference is one pipeline over the whole stream: every key once. State owned by its key
(the design of docs/architecture.md) would hold that, divided among the instances; the ratio
"partitioned / one pipeline" is how many times over the partitions hold the same keys.
The autoencoder is disabled (it holds no per-key state); ``state.max_bytes`` is off and
``zscore.max_keys`` raised to 10,000,000, so nothing is forgotten.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from bench.quality_at_scale import partition_of
from stream_detector.config import load_settings
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.scoring.batch import score_batch
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import ScoringPipeline

PARTITIONS = 12
INSTANCES = (1, 2, 3)


def keys_held(pipeline: ScoringPipeline) -> dict[str, int]:
    out: dict[str, int] = {}
    for detector in pipeline.detectors:
        for key_set, n in detector.n_keys().items():
            out[f"{detector.name}:{key_set}"] = out.get(f"{detector.name}:{key_set}", 0) + n
    return out


def run(events: int, products: int, seed: int = 7) -> dict[str, Any]:
    settings = load_settings(environ={"STREAM_DETECTOR_AUTOENCODER__ENABLED": "false", "STREAM_DETECTOR_ZSCORE__MAX_KEYS": "10000000"})
    schema, batch = event_schema(settings), settings.processing.batch_size
    generator = SalesGenerator(GeneratorConfig(seed=seed, anomaly_rate=0.0, n_products=products, events_per_day=2 * events))
    stream = [(event["store_id"].encode(), orjson.dumps(event)) for event, _ in generator.generate(events)]
    part = np.array([partition_of(key, PARTITIONS, i) for i, (key, _) in enumerate(stream)])
    started = time.perf_counter()
    one = build_pipeline(settings)
    one.max_state_bytes = None
    for lo in range(0, len(stream), batch):
        score_batch(one, schema, [v for _, v in stream[lo : lo + batch]])
    pipelines = []
    for p in range(PARTITIONS):
        pipeline = build_pipeline(settings)
        pipeline.max_state_bytes = None
        mine = [stream[i][1] for i in np.flatnonzero(part == p).tolist()]
        for lo in range(0, len(mine), batch):
            score_batch(pipeline, schema, mine[lo : lo + batch])
        pipelines.append(pipeline)
    per_partition = [(p.state_bytes(), keys_held(p)) for p in pipelines]
    result: dict[str, Any] = {
        "events": events,
        "products": products,
        "seconds": time.perf_counter() - started,
        "one": {"bytes": one.state_bytes(), "keys": keys_held(one)},
        "instances": {},
    }
    for n in INSTANCES:
        owned = [list(range(PARTITIONS))[i * PARTITIONS // n : (i + 1) * PARTITIONS // n] for i in range(n)]
        largest = max(owned, key=lambda ps: sum(per_partition[p][0] for p in ps))
        keys: dict[str, int] = {}
        for p in largest:
            for k, v in per_partition[p][1].items():
                keys[k] = keys.get(k, 0) + v
        result["instances"][n] = {"bytes": sum(per_partition[p][0] for p in largest), "keys": keys, "partitions": largest}
    return result


def markdown(r: dict[str, Any]) -> str:
    one = r["one"]
    names = sorted(k for k in one["keys"] if one["keys"][k])
    head = ["deployment", "per-key state (MB, largest instance)", "x one pipeline", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| " + " | ".join(["one pipeline (every key once)", f"{one['bytes'] / 1e6:.1f}", "1.00", *(f"{one['keys'][k]:,}" for k in names)]) + " |")
    for n, m in r["instances"].items():
        cells = [f"{PARTITIONS} partitions, {n} instance{'s' if int(n) > 1 else ''}", f"{m['bytes'] / 1e6:.1f}", f"{m['bytes'] / one['bytes']:.2f}"]
        lines.append("| " + " | ".join(cells + [f"{m['keys'].get(k, 0):,}" for k in names]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 events, 20,000 products")
    parser.add_argument("--events", type=int, help="events to generate (default 200,000)")
    parser.add_argument("--products", type=int, help="products (default 100,000)")
    args = parser.parse_args(argv)
    events = args.events or (50_000 if args.quick else 200_000)
    products = args.products or (20_000 if args.quick else 100_000)
    r = run(events, products)
    print(f"keyed memory: {events:,} generated events, {products:,} products, {PARTITIONS} partitions; {r['seconds']:.0f} s\n")
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
