"""Probe: what one more produce-consume hop adds to the latency, on the embedded broker.

    python -m bench.hop_latency [--rate 5000] [--seconds 20] [--partitions 12]

Step 2 of docs/architecture.md (per-key state owned by its key) puts two more hops on the path
of every event: the event's key-set columns to a repartition topic, the partial score back.
Issue 20 allows the anomaly p99 at 5,000 events/s 1.5x of today's, so this measures the hops
alone, before anything is built. Records carrying their send time are produced to topic 0 at
``rate`` records/s (in batches of rate / 100, every 10 ms); relay k (a consumer in its own group,
``fetch.wait.max.ms`` 10, and a producer with ``linger.ms`` 5, the daemon's) copies topic k to
topic k+1; a reader of each topic, assigned every partition, records receive time minus send
time. So the latency of topic k is k hops after the first. Every topic has ``partitions``
partitions; records are keyed by a store id, as the generator's.

Not in the suite: a probe, run by hand; the method and a run are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from stream_detector.embedded_broker import EmbeddedBroker
from stream_detector.runtime.topics import ensure_topics

HOPS = 2  # relays: topics 0 .. HOPS
STAMP = struct.Struct("<d")  # the send time, time.time()
GROUP = {"session.timeout.ms": 6000, "max.poll.interval.ms": 7000}


def relay(bootstrap: str, source: str, target: str, stop: threading.Event, ready: threading.Event) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"relay-{source}", "auto.offset.reset": "latest", "fetch.wait.max.ms": 10, **GROUP})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.subscribe([source], on_assign=lambda _c, _p: ready.set())
    while not stop.is_set():
        for msg in consumer.consume(500, timeout=0.05):
            if msg.error() is None:
                producer.produce(target, msg.value(), msg.key())
        producer.poll(0)
    producer.flush(5)
    consumer.close()


def reader(bootstrap: str, topic: str, partitions: int, stop: threading.Event, out: list[float]) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}", "fetch.wait.max.ms": 10, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(partitions)])
    while not stop.is_set():
        messages = consumer.consume(500, timeout=0.05)
        now = time.time()  # when the batch is in hand
        for msg in messages:
            if msg.error() is None:
                out.append(now - STAMP.unpack(msg.value())[0])
    consumer.close()


def run(rate: int, seconds: float, partitions: int) -> dict[int, np.ndarray]:
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        prefix = f"hop-{int(time.time())}"
        topics = [f"{prefix}-{k}" for k in range(HOPS + 1)]
        ensure_topics(bootstrap, dict.fromkeys(topics, partitions))
        stop = threading.Event()
        latencies: dict[int, list[float]] = {k: [] for k in range(HOPS + 1)}
        ready = [threading.Event() for _ in range(HOPS)]
        threads = [threading.Thread(target=relay, args=(bootstrap, topics[k], topics[k + 1], stop, ready[k])) for k in range(HOPS)]
        threads += [threading.Thread(target=reader, args=(bootstrap, topics[k], partitions, stop, latencies[k])) for k in range(HOPS + 1)]
        for t in threads:
            t.start()
        for r in ready:
            r.wait(60)
        time.sleep(2.0)  # readers at the end of every partition
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        batch = max(1, rate // 100)  # every 10 ms
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds:
            for i in range(batch):
                producer.produce(topics[0], STAMP.pack(time.time()), f"s-{(sent + i) % 24:03d}".encode())
            sent += batch
            producer.poll(0)
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))
        producer.flush(10)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(15)
        return {k: np.asarray(v) for k, v in latencies.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=12)
    args = parser.parse_args(argv)
    result = run(args.rate, args.seconds, args.partitions)
    print(f"hop latency: {args.rate:,} records/s for {args.seconds:.0f} s, {args.partitions} partitions per topic\n")
    print("| topic | records | p50 ms | p99 ms | p99 added by the hops after the first |")
    print("|---|---|---|---|---|")
    base = None
    for k, lat in result.items():
        p50, p99 = (float(np.percentile(lat, q)) * 1000 for q in (50, 99)) if lat.size else (float("nan"), float("nan"))
        base = p99 if k == 0 else base
        added = "-" if k == 0 or base is None else f"{p99 - base:.1f}"
        print(f"| {k} hop{'s' if k != 1 else ''} after the first | {lat.size:,} | {p50:.1f} | {p99:.1f} | {added} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
