"""Run the real daemon (``python -m stream_detector run``) as a child process in tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.kafka_helpers import fast_group_config

REPO_ROOT = Path(__file__).resolve().parent.parent


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
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last metrics: "
                             f"{ {k: v for k, v in metrics.items() if 'events_total' in k or 'assigned' in k} }\n{self.log_tail()}")

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
