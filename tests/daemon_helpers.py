"""Run the real daemon (``python -m stream_detector run``) as a child process.

Used by the integration tests and by the benchmarks (``bench/bench_e2e.py``), which add their
own timing on top of ``DaemonProcess``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.kafka_helpers import fast_group_config
from tests.paths import REPO_ROOT

# /metrics as name -> [(labels, value)], one entry per sample (``parse_samples``).
Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(keep_overrides: bool = True) -> dict[str, str]:
    """Our environment for a child process, with the repository importable.

    ``keep_overrides=False`` leaves out the ``STREAM_DETECTOR_*`` variables, so the child's
    settings come from its config file alone (the benchmarks do this).
    """
    env = {k: v for k, v in os.environ.items() if keep_overrides or not k.startswith("STREAM_DETECTOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time process ``pid`` has used so far (Linux /proc), None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_config(path: Path, bootstrap: str, input_topic: str, output_topic: str, dlq_topic: str, group: str, **sections: Any) -> Path:
    """A daemon config for one test: its own topics, group and metrics port.

    Calibration is shared between partitions only where a test asks for it
    (``scaling={"share_calibration": True}``): with it, what a partition flags depends on how far
    the others have got, and ``expected_anomalies`` (a fresh pipeline per partition) is exact
    only without it."""
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
        "scaling": {"share_calibration": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


class DaemonProcess:
    """``stream-detector run --config FILE`` in a child process, with its metrics endpoint.

    ``python_args`` go before ``-m stream_detector`` (``["-m", "cProfile", "-o", "daemon.prof"]``);
    ``env`` replaces the child's environment (default: ``child_env()``); ``die_with_parent``
    asks Linux to SIGTERM the daemon if this process dies first.
    """

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        *,
        python_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = yaml.safe_load(config_path.read_text())["metrics"]["port"]
        self.python_args = list(python_args)
        self.env = None if env is None else dict(env)
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        preexec_fn = None
        if self.die_with_parent:
            from stream_detector.embedded_broker import die_with_parent_hook

            preexec_fn = die_with_parent_hook()
        # The child writes the log through its own copy of the descriptor.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.python_args, "-m", "stream_detector", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=child_env() if self.env is None else self.env,
                preexec_fn=preexec_fn,
            )
        return self

    def metrics_text(self, timeout: float = 2.0) -> str:
        """The current /metrics exposition; OSError while it is not serving."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as response:
            return response.read().decode()

    def metrics(self) -> dict[str, float]:
        """The current /metrics as {'name{labels}': value} (empty while not serving)."""
        try:
            text = self.metrics_text()
        except OSError:
            return {}
        return parse_metrics(text)

    def samples(self, timeout: float = 2.0) -> Samples:
        """The current /metrics as name -> [(labels, value)]; OSError while it is not serving."""
        return parse_samples(self.metrics_text(timeout))

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the daemon process has used so far (Linux /proc)."""
        return process_cpu_seconds(None if self.process is None else self.process.pid)

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


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics exposition as name -> [(labels, value)] (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of the first sample of ``name`` whose labels include ``labels``; 0 if none."""
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


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
