"""Anomaly latency at one rate with detectors switched off: what a cheaper pipeline would give.

Phases alternate on one embedded broker: the default pipeline, then the same daemon with the
named config sections disabled (``--without river,autoencoder``: z-score, duplicates and
silence left), repeated ``--repeat`` times. Each phase is section 4's daemon phase of
``bench/run.py`` (warm-up, paced producer, Kafka-timestamp latency of the anomalies), without
its echo baseline. Fewer detectors flag fewer events, so the anomaly counts differ.

    python bench/latency_without.py [--rate 20000] [--seconds 20] [--without river,autoencoder] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e  # noqa: E402
from run import TANSU_FETCH  # noqa: E402


def _config_writer(disabled: list[str]) -> Any:
    write = bench_e2e.write_config

    def write_config(path: Path, *args: Any, **kwargs: Any) -> Path:
        written = write(path, *args, **kwargs)
        config = yaml.safe_load(written.read_text())
        for section in disabled:
            config[section] = {**config.get(section, {}), "enabled": False}
        written.write_text(yaml.safe_dump(config))
        return written

    return write_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--without", default="river,autoencoder", help="config sections to disable")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from stream_detector.embedded_broker import EmbeddedBroker

    variants = [("all detectors", []), (f"without {args.without}", args.without.split(","))]
    original = bench_e2e.write_config
    with EmbeddedBroker() as broker:
        for _ in range(args.repeat):
            for label, disabled in variants:
                bench_e2e.write_config = _config_writer(disabled) if disabled else original
                r = bench_e2e._latency_phase(broker.bootstrap_servers, args.rate, int(args.rate * args.seconds), 10, TANSU_FETCH, 1, lambda _: None)
                ts = r["timestamps"]
                print(
                    f"{label}: p50 / p99 / max {ts['p50_ms']:.0f} / {ts['p99_ms']:.0f} / {ts['max_ms']:.0f} ms "
                    f"({ts['count']} anomalies); batches of {r['mean_batch_records']:.0f} records, "
                    f"{r['mean_batch_ms']:.1f} ms on average; daemon {r['daemon_events_per_s']:,.0f} ev/s",
                    flush=True,
                )
    bench_e2e.write_config = original


if __name__ == "__main__":
    main()
