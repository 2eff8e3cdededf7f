"""Run the real daemon (``python -m stream_detector run``) as a child process in tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.kafka_helpers import fast_group_config
from tests.paths import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, bootstrap: str, input_topic: str, output_topic: str, dlq_topic: str, group: str, **sections: Any) -> Path:
    """A daemon config for one test: its own topics, group and metrics port."""
    config: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topic": input_topic,
            "output_topic": output_topic,
            "dlq_topic": dlq_topic,
            "group_id": group,
            "consumer_config": fast_group_config(),
        },
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


class DaemonProcess:
    """``stream-detector run --config FILE`` in a child process, with its metrics endpoint."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = yaml.safe_load(config_path.read_text())["metrics"]["port"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream_detector", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
        return self

    def metrics(self) -> dict[str, float]:
        """The current /metrics as {'name{labels}': value} (empty while not serving)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return parse_metrics(text)

    def wait_for(self, condition: Callable[[dict[str, float]], bool], timeout: float, what: str) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        metrics: dict[str, float] = {}
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode} while waiting for {what}:\n{self.log_tail()}")
            metrics = self.metrics()
            if metrics and condition(metrics):
                return metrics
            time.sleep(0.25)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; last metrics: "
            f"{ {k: v for k, v in metrics.items() if 'events_total' in k or 'assigned' in k} }\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    return metrics.get(name, 0.0)


# -- helpers for the resilience tests (tests/integration/test_resilience.py) -----------------


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int, client_config: dict[str, Any] | None = None) -> list[int]:
    """The group's committed offset of each partition of ``topic`` (-1001 where none), without joining."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**(client_config or {}), "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return [tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        consumer.close()


def read_topic(
    bootstrap: str,
    topic: str,
    expected: int | None = None,
    timeout: float = 30.0,
    idle: float = 2.0,
    isolation_level: str = "read_uncommitted",
    client_config: dict[str, Any] | None = None,
) -> list[Any]:
    """Every record of ``topic`` from the beginning, without a group (kafka_helpers.read_all)."""
    from tests.kafka_helpers import read_all

    return read_all(bootstrap, topic, expected=expected, timeout=timeout, idle=idle, isolation_level=isolation_level, client_config=client_config)


def by_partition(messages: list[Any]) -> dict[int, list[bytes]]:
    """Record values per partition, in offset order."""
    out: dict[int, list[Any]] = {}
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        out.setdefault(message.partition(), []).append(message.value())
    return out


def expected_anomalies(config_path: Path, values_by_partition: dict[int, list[bytes]]) -> dict[str, float]:
    """What an uninterrupted daemon with this config flags: {event_id: score}.

    The daemon keeps one pipeline per input partition and its results do not depend on batch
    boundaries, so scoring each partition's records in offset order with a fresh pipeline
    gives the anomalies an uninterrupted run publishes.
    """
    from stream_detector.config import load_settings
    from stream_detector.events.decode import decode_batch
    from stream_detector.scoring.factory import build_pipeline, event_schema

    settings = load_settings(config_path, environ={})
    schema = event_schema(settings)
    size = settings.processing.batch_size
    flagged: dict[str, float] = {}
    for values in values_by_partition.values():
        pipeline = build_pipeline(settings)
        for start in range(0, len(values), size):
            decoded = decode_batch(values[start : start + size], schema)
            result = pipeline.process(decoded.features)
            for i in result.is_anomaly.nonzero()[0].tolist():
                flagged[str(decoded.features.event_ids[i])] = float(result.fused[i])
    return flagged


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def generate_labelled(count: int, seed: int, anomaly_rate: float = 0.01) -> tuple[list[dict], dict[str, str], list]:
    """Generated sale events, their point labels (event_id -> kind) and the window labels."""
    from stream_detector.generator import GeneratorConfig, SalesGenerator

    generator = SalesGenerator(GeneratorConfig(seed=seed, anomaly_rate=anomaly_rate))
    events, labels = [], {}
    for event, label in generator.generate(count):
        events.append(event)
        if label is not None and label.event_id:
            labels[label.event_id] = label.kind
    return events, labels, generator.window_labels
