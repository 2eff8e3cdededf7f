"""Resident memory of the default pipeline before and after scoring a JSON-lines file.

Run in a fresh process: it imports the project, builds the default pipeline and reads VmRSS
(the "construction" figure), then scores the file in micro-batches of processing.batch_size
through decode_batch + ScoringPipeline.process + encode_anomalies, and reads VmRSS and VmHWM
(the peak) again. The input is streamed from the file a batch at a time, so it costs almost
nothing itself. Prints one JSON object. ``python -m bench.run --only memory`` writes the files
(100,000 generated events whose store_id and product_id are made unique, and the same events
with the generator's own keys) and runs this once for each.

    python -m bench.bench_memory --input events.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from itertools import islice


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    args = parser.parse_args()

    from stream_detector.config import load_settings
    from stream_detector.events.decode import decode_batch
    from stream_detector.records import encode_anomalies
    from stream_detector.scoring.factory import build_pipeline, event_schema

    settings = load_settings(environ={})
    pipeline = build_pipeline(settings)
    schema = event_schema(settings)
    gc.collect()
    rss_constructed = proc_status_kib("VmRSS")

    events = anomalies = 0
    t0 = time.perf_counter()
    with open(args.input, "rb") as src:
        while chunk := list(islice(src, settings.processing.batch_size)):
            decoded = decode_batch([line.rstrip(b"\n") for line in chunk], schema)
            result = pipeline.process(decoded.features)
            anomalies += len(encode_anomalies(pipeline, decoded, result))
            events += len(chunk)
    seconds = time.perf_counter() - t0
    gc.collect()
    keys: dict[str, int] = {}
    for detector in pipeline.detectors:
        if hasattr(detector, "n_keys"):
            keys.update(detector.n_keys())
    print(
        json.dumps(
            {
                "events": events,
                "anomalies": anomalies,
                "seconds": seconds,
                "rss_constructed_kib": rss_constructed,
                "rss_after_kib": proc_status_kib("VmRSS"),
                "hwm_kib": proc_status_kib("VmHWM"),
                "keys": keys,
            }
        )
    )


if __name__ == "__main__":
    main()
