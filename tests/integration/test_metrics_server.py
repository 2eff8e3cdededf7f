"""The metrics endpoint of the real daemon under hostile clients (issue 19, point 7).

Hundreds of idle connections, half-sent requests and clients that hang up before the answer
must not make the daemon start a thread each, must not stop /metrics answering, and must not
write tracebacks into the JSON log. A metrics port already in use is a one-line error, exit 2.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_helpers import DaemonProcess, child_env, write_config
from tests.kafka_helpers import unique_name
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.integration

IDLE = 500  # connections that never send a byte
HALF_SENT = 50  # connections that send part of a request line and stop
HANG_UPS = 30  # clients that send a whole request and reset the connection at once


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes, float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return response.status, response.read(), time.monotonic() - started


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    return s


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset, as a client that crashed or timed out does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _config(tmp_path: Path, kafka_bootstrap: str, make_topics, port: int | None = None) -> Path:
    input_topic, output_topic, dlq_topic = make_topics(partitions=1, n=3, prefix="metrics-server")
    path = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        unique_name("detector"),
        autoencoder={"enabled": False},
        river={"enabled": False},
        **({"metrics": {"port": port}} if port is not None else {}),
    )
    return path


def test_metrics_endpoint_holds_under_idle_half_sent_and_reset_connections(kafka_bootstrap, make_topics, tmp_path):
    config = _config(tmp_path, kafka_bootstrap, make_topics)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    held: list[socket.socket] = []
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        # Ready: every Kafka client has started its threads, so the count is the daemon's own.
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(daemon.port, "/readyz")[0] == 200:
                    break
            except OSError:  # not serving yet, or 503 (HTTPError) until partitions are assigned
                pass
            assert daemon.process.poll() is None, daemon.log_tail()
            assert time.monotonic() < deadline, f"never ready\n{daemon.log_tail()}"
            time.sleep(0.2)
        time.sleep(0.5)
        baseline = _threads(pid)

        for _ in range(IDLE):
            held.append(_connect(daemon.port))
        for i in range(HALF_SENT):
            s = _connect(daemon.port)
            s.send(b"GET /metr" if i % 2 else b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        time.sleep(1.0)

        threads = _threads(pid)
        assert threads <= baseline + 8, f"{threads} threads with {len(held)} held connections (baseline {baseline})"
        for path in ("/metrics", "/healthz", "/readyz"):
            status, _, took = _get(daemon.port, path)
            assert status == 200, (path, status)
            assert took < 2.0, f"{path} took {took:.2f}s with {len(held)} held connections"
        assert b"stream_detector_events_total" in _get(daemon.port, "/metrics")[1]

        # Clients that ask and hang up before reading the answer.
        for _ in range(HANG_UPS):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            _reset(s)
        time.sleep(1.0)
        assert _get(daemon.port, "/metrics")[0] == 200
        assert _threads(pid) <= baseline + 8
    finally:
        for s in held:
            s.close()
        code = daemon.stop()
    log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert code == 0, log[-3000:]


def test_metrics_port_in_use_is_a_one_line_error(kafka_bootstrap, make_topics, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, kafka_bootstrap, make_topics, port=port)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "stream_detector", "run", "--config", str(config)],
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - started < 30
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("stream-detector:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "metrics.port" in errors[0] and str(port) in errors[0] and "in use" in errors[0]
