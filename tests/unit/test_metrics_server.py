"""The metrics endpoint (stream_detector/metrics_server.py) in this process, on loopback.

What it promises: /metrics, /healthz and /readyz answer; connections are bounded (the oldest
one still sending its request is dropped to make room) and timed out; nothing it drops starts
a thread or writes to stderr; a port in use is a ConfigError naming metrics.port.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from stream_detector.errors import ConfigError
from stream_detector.metrics import Metrics
from stream_detector.metrics_server import MAX_REQUEST_BYTES, MetricsServer


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    srv = MetricsServer(metrics, "127.0.0.1", 0, lambda: (False, "restoring state"), max_connections=8, request_timeout_s=0.5).start()
    yield srv
    srv.stop()


def ask(port: int, request: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    answer = ask(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("stream_detector_metrics_connections_dropped_total", {"reason": reason}) or 0.0


def test_answers_metrics_health_and_readiness(server: MetricsServer) -> None:
    status, body = get(server.port, "/metrics")
    assert status == 200 and b"stream_detector_events_total" in body
    assert get(server.port, "/healthz") == (200, b"ok\n")
    assert get(server.port, "/readyz?verbose") == (503, b"restoring state\n")
    assert get(server.port, "/nope")[0] == 404
    assert get(server.port, "/metrics", "HEAD") == (200, b"")
    assert get(server.port, "/metrics", "POST")[0] == 405
    answer = ask(server.port, b"hello\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = ask(server.port, b"GET /" + b"x" * (MAX_REQUEST_BYTES + 10) + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_idle_connections_past_the_bound_are_dropped_without_threads(server: MetricsServer, metrics: Metrics) -> None:
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        held[-1].sendall(b"GET /metr")  # half-sent
        started = time.monotonic()
        status, _ = get(server.port, "/metrics")
        assert status == 200 and time.monotonic() - started < 1.0
        assert threading.active_count() == threads
        deadline = time.monotonic() + 2
        while dropped(metrics, "evicted") < 40 - 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dropped(metrics, "evicted") >= 40 - 8
    finally:
        for s in held:
            s.close()


def test_idle_and_half_sent_requests_time_out(server: MetricsServer, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "stream_detector.metrics")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=3)
    half = socket.create_connection(("127.0.0.1", server.port), timeout=3)
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    try:
        started = time.monotonic()
        for s in (idle, half):
            with contextlib.suppress(ConnectionResetError):  # closed or reset: either way, not answered
                assert s.recv(100) == b""
        assert 0.4 < time.monotonic() - started < 2.0
    finally:
        idle.close()
        half.close()
    time.sleep(0.1)
    assert dropped(metrics, "timeout") == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one summary, not one line per connection"
    assert "timeout" in warnings[0].getMessage() and warnings[0].exc_info is None


def test_clients_that_hang_up_leave_no_traceback(server: MetricsServer, capfd: pytest.CaptureFixture[str]) -> None:
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset before the answer is read
    time.sleep(0.3)
    assert get(server.port, "/healthz")[0] == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and err == ""


def test_port_in_use_names_metrics_port(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics\.port: port {port} on 127\.0\.0\.1 is already in use"):
            MetricsServer(metrics, "127.0.0.1", port, lambda: (True, ""))


def test_unusable_host_names_metrics_host(metrics: Metrics) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.host"):
        MetricsServer(metrics, "192.0.2.1", 0, lambda: (True, ""))  # TEST-NET-1: not an address of this host


def test_stop_closes_the_port(metrics: Metrics) -> None:
    srv = MetricsServer(metrics, "127.0.0.1", 0, lambda: (True, "")).start()
    port = srv.port
    held = socket.create_connection(("127.0.0.1", port))
    srv.stop()
    held.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_healthz_follows_the_liveness_callback(metrics: Metrics) -> None:
    state = {"alive": (True, "ok")}
    srv = MetricsServer(metrics, "127.0.0.1", 0, lambda: (True, "ready"), alive=lambda: state["alive"]).start()
    try:
        assert get(srv.port, "/healthz") == (200, b"ok\n")
        state["alive"] = (False, "the consume loop stopped: boom")
        assert get(srv.port, "/healthz") == (503, b"the consume loop stopped: boom\n")
        assert get(srv.port, "/readyz") == (200, b"ready\n")
    finally:
        srv.stop()
