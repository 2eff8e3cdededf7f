"""Anomaly latency at one rate with detectors switched off: what a cheaper pipeline would give.

Phases alternate on one embedded broker: the default pipeline, then the same daemon with the
named config sections disabled (``--without river,autoencoder``: z-score, duplicates and
silence left), repeated ``--repeat`` times. Each phase is section 4's daemon phase of
``bench/run.py`` (warm-up, paced producer, Kafka-timestamp latency of the anomalies), without
its echo baseline. Fewer detectors flag fewer events, so the anomaly counts differ.

    python -m bench.latency_without [--rate 20000] [--seconds 20] [--without river,autoencoder] [--repeat 2]
"""

from __future__ import annotations

import argparse

from bench.bench_e2e import latency_phase
from bench.run import TANSU_FETCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--without", default="river,autoencoder", help="config sections to disable")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from stream_detector.embedded_broker import EmbeddedBroker

    variants = [("all detectors", []), (f"without {args.without}", args.without.split(","))]
    with EmbeddedBroker() as broker:
        for _ in range(args.repeat):
            for label, disabled in variants:
                sections = {section: {"enabled": False} for section in disabled}
                r = latency_phase(broker.bootstrap_servers, args.rate, int(args.rate * args.seconds), 10, TANSU_FETCH, 1, lambda _: None, sections=sections)
                ts = r["timestamps"]
                print(
                    f"{label}: p50 / p99 / max {ts['p50_ms']:.0f} / {ts['p99_ms']:.0f} / {ts['max_ms']:.0f} ms "
                    f"({ts['count']} anomalies); batches of {r['mean_batch_records']:.0f} records, "
                    f"{r['mean_batch_ms']:.1f} ms on average; daemon {r['daemon_events_per_s']:,.0f} ev/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
