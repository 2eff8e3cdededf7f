"""Observability end to end: a real daemon on a real broker, its live /metrics, promtool, and a
real Prometheus server scraping it with the project's alert rules.

One daemon (``stream-detector run`` in a child process) serves every test in this module. It
consumes a few thousand generated sale events plus some malformed records, so every labelled
series (dead letters by reason, consumer lag per partition, ...) exists. Then:

- /healthz and /readyz answer as Kubernetes probes expect;
- every metric name the Grafana dashboard and the alert rules use is in the live scrape;
- ``promtool`` checks the rules (and runs their unit tests) and lints the live scrape;
- Debian's ``prometheus`` binary scrapes the daemon every second with rules.yml loaded: the
  series arrive, ``up`` is 1, every rule evaluates, every dashboard query runs and returns
  data, and stopping the daemon makes StreamDetectorDown pending.

``promtool``/``prometheus`` come from Debian's ``prometheus`` package (``make install`` installs
it when run as root); the tests that need them skip, saying so, when they are missing.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream_detector.config import Settings
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.runtime.topics import ensure_topics
from tests.daemon_helpers import REPO_ROOT, DaemonProcess, free_port, metric, parse_metrics, write_config
from tests.kafka_helpers import produce_all, unique_name
from tests.unit.deploy.test_dashboard import (
    SCRAPE_JOB,
    dashboard_expressions,
    rule_expressions,
    stream_detector_names,
    substitute_variables,
)

RULES = REPO_ROOT / "config" / "prometheus" / "rules.yml"
RULES_TEST = REPO_ROOT / "config" / "prometheus" / "rules_test.yml"
PROMETHEUS_YML = REPO_ROOT / "config" / "prometheus" / "prometheus.yml"
N_EVENTS = 4_000
N_MORE = 2_000  # produced while Prometheus scrapes, so rates are not zero
PARTITIONS = 3
BAD_RECORDS = [b"{not json", b"[1, 2, 3]", orjson.dumps({"timestamp": "2026-01-05T10:00:00Z", "amount": 1.0})]
# Series that exist only after something went wrong (a librdkafka error): declared in the
# scrape (# HELP / # TYPE) but without samples in a healthy run.
ONLY_AFTER_ERRORS = {"stream_detector_kafka_errors_total"}
SCORED = 'stream_detector_events_total{outcome="scored"}'
INVALID = 'stream_detector_events_total{outcome="invalid"}'
INSTALL_HINT = "Debian: apt-get install prometheus; `make install` does it when run as root"


def _records(events: list[dict], bad_every: int) -> list[tuple[bytes | None, bytes]]:
    records: list[tuple[bytes | None, bytes]] = []
    for i, event in enumerate(events):
        records.append((event["store_id"].encode(), orjson.dumps(event)))
        if i % bad_every == 0:
            records.append((b"bad", BAD_RECORDS[(i // bad_every) % len(BAD_RECORDS)]))
    return records


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def sample_names(exposition: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


def declared_names(exposition: str) -> set[str]:
    """Names a family's samples would have, for every # TYPE line (families without samples too)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"], "gauge": [""], "summary": ["", "_sum", "_count"]}
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in suffixes.get(kind, [""]))
    return names


@dataclass
class Live:
    daemon: DaemonProcess
    bootstrap: str
    input_topic: str
    produced: int
    readiness: list[tuple[float, int, str]] = field(default_factory=list)  # (seconds after start, status, body)
    scrape: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.daemon.port}"


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("observability")
    input_topic, output_topic, dlq_topic = unique_name("obs-sales"), unique_name("obs-out"), unique_name("obs-dlq")
    ensure_topics(kafka_bootstrap, {input_topic: PARTITIONS, output_topic: 1, dlq_topic: 1})
    events = [event for event, _ in SalesGenerator(GeneratorConfig(seed=5, anomaly_rate=0.01)).generate(N_EVENTS)]
    produced = produce_all(kafka_bootstrap, input_topic, _records(events, bad_every=100))

    config = write_config(
        tmp / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, unique_name("obs"), processing={"commit_interval_ms": 500}
    )
    daemon = DaemonProcess(config, tmp / "daemon.log").start()
    state = Live(daemon, kafka_bootstrap, input_topic, produced)
    try:
        # Poll /readyz from the moment the process starts: 503 until partitions are assigned.
        started = time.monotonic()
        while time.monotonic() - started < 90:
            assert daemon.process is not None and daemon.process.poll() is None, f"daemon exited:\n{daemon.log_tail()}"
            try:
                status, _, body = http_get(f"{state.base}/readyz", timeout=2)
            except OSError:
                time.sleep(0.02)  # not listening yet
                continue
            state.readiness.append((time.monotonic() - started, status, body))
            if status == 200:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"/readyz never answered 200: {state.readiness[-3:]}\n{daemon.log_tail()}")

        daemon.wait_for(
            lambda m: metric(m, SCORED) + metric(m, INVALID) >= produced and any(k.startswith("stream_detector_consumer_lag{") for k in m),
            timeout=120,
            what=f"{produced} records handled and consumer lag reported",
        )
        status, _, state.scrape = http_get(f"{state.base}/metrics")
        assert status == 200
        yield state
    finally:
        daemon.stop(signal.SIGTERM)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(f"promtool not installed ({INSTALL_HINT})")
    return path


# --- the daemon's own endpoints ---------------------------------------------------------------


def test_health_and_readiness_probes(live: Live) -> None:
    status, content_type, body = http_get(f"{live.base}/healthz")
    assert (status, body) == (200, "ok\n")
    assert content_type.startswith("text/plain")

    status, content_type, body = http_get(f"{live.base}/readyz")
    assert status == 200, body
    assert content_type.startswith("text/plain")
    assert body.startswith("ready:") and "partition" in body

    # Before the assignment /readyz said 503 with a reason in plain text (when we were quick
    # enough to see it: the group join takes a few seconds on tansu).
    before = [(t, s, b) for t, s, b in live.readiness if s != 200]
    # (the reason's wording is the daemon's: "no partitions assigned yet", "not running", ...)
    assert all(s == 503 and b.strip() and not b.startswith("ready") for _, s, b in before), before
    seen = sorted({b.strip() for _, _, b in before})
    ready_at = live.readiness[-1][0]
    print(f"\n/readyz: {len(before)} x 503 {seen} before 200 after {ready_at:.1f}s: {live.readiness[-1][2].strip()!r}")

    status, _, body = http_get(f"{live.base}/nothing-here")
    assert status == 404


def test_every_dashboard_and_rule_metric_is_in_the_live_scrape(live: Live) -> None:
    wanted = {name: where for where, expr in dashboard_expressions() + rule_expressions() for name in stream_detector_names(expr)}
    assert len(wanted) >= 15, wanted
    present = sample_names(live.scrape)
    declared = declared_names(live.scrape)
    missing = {name: where for name, where in wanted.items() if name not in present and not (name in ONLY_AFTER_ERRORS and name in declared)}
    assert not missing, f"not in the live scrape: {missing}"
    # and the daemon really did the work the panels show
    values = parse_metrics(live.scrape)
    assert metric(values, SCORED) == N_EVENTS
    assert metric(values, INVALID) == live.produced - N_EVENTS
    assert sum(v for k, v in values.items() if k.startswith("stream_detector_dlq_total{")) == live.produced - N_EVENTS
    assert metric(values, "stream_detector_up") == 1
    assert metric(values, "stream_detector_assigned_partitions") == PARTITIONS
    assert sum(1 for k in values if k.startswith("stream_detector_consumer_lag{")) == PARTITIONS
    assert any(k.startswith("stream_detector_autoencoder_info{device=") for k in values)
    print(
        f"\nlive scrape: {len(present)} sample names; the dashboard and rules use {len(wanted)} stream_detector_ names, all present"
        f" ({', '.join(sorted(n for n in wanted if n not in present)) or 'none'} declared without samples)"
    )


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_the_config() -> None:
    promtool = _promtool()
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROMETHEUS_YML)], ["test", "rules", str(RULES_TEST)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_promtool_check_metrics_accepts_the_live_scrape(live: Live) -> None:
    promtool = _promtool()
    done = subprocess.run([promtool, "check", "metrics"], input=live.scrape, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (done.stdout + done.stderr).strip(), done.stdout + done.stderr  # no lint warnings either


# --- a real Prometheus -------------------------------------------------------------------------


class PrometheusServer:
    """Debian's prometheus binary on a free loopback port, scraping one target every second."""

    def __init__(self, binary: str, tmp_path: Path, target: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": SCRAPE_JOB, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
        }
        self.config_path = tmp_path / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        # The child keeps its own handle on the log: ours can close once it has started.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        status, _, body = http_get(url, timeout=10)
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", (path, params, status, body[:500])
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def wait(self, condition: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}"
            try:
                last = condition()
            except (OSError, AssertionError, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _prometheus_binary() -> str:
    path = shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if Path(p).is_file()), None)
    if path is None:
        pytest.skip(f"the prometheus server binary is not installed ({INSTALL_HINT})")
    return path


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def test_real_prometheus_scrapes_the_daemon_and_evaluates_rules_and_dashboard(live: Live, tmp_path: Path) -> None:
    binary = _prometheus_binary()
    server = PrometheusServer(binary, tmp_path, f"127.0.0.1:{live.daemon.port}")
    try:
        server.wait(lambda: http_get(f"{server.base}/-/ready")[0] == 200, 60, "prometheus ready")
        # the daemon's series arrive
        events = server.wait(
            lambda: [v for v in _values(server.query("stream_detector_events_total")) if v > 0], 30, "stream_detector_events_total > 0 in Prometheus"
        )
        assert sum(events) >= live.produced
        up = server.query(f'up{{job="{SCRAPE_JOB}"}}')
        assert _values(up) == [1.0], up
        [target] = server.api("targets")["activeTargets"]
        assert target["health"] == "up" and target["labels"]["job"] == SCRAPE_JOB, target

        # more input while Prometheus watches, so rates, quantiles and dead letters are not flat
        more = [event for event, _ in SalesGenerator(GeneratorConfig(seed=6, anomaly_rate=0.01)).generate(N_MORE)]
        total = live.produced + produce_all(live.bootstrap, live.input_topic, _records(more, bad_every=50))
        server.wait(lambda: sum(_values(server.query("stream_detector_events_total"))) >= total, 60, f"{total} records in Prometheus")
        time.sleep(2.5)  # a few more scrapes after the last batch

        # every alert rule is loaded and evaluates without error
        def rules_ok() -> list[dict[str, Any]]:
            rules = [r for g in server.api("rules")["groups"] for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else []

        rules = server.wait(rules_ok, 30, "every rule evaluated with health ok")
        assert {r["name"] for r in rules} == {where.split("'")[1] for where, _ in rule_expressions()}

        # The second batch had 2% malformed records (40 of 2040, above 1% and 10 in 5 minutes):
        # StreamDetectorDeadLetterSpike goes pending (for: 5m), and nothing else is pending or
        # firing. (Waited for: NoEventsConsumed can be pending for a moment while the counters
        # were flat before the second batch, until the next evaluations see the increase.)
        def alerts() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for a in server.api("alerts")["alerts"]:
                out.setdefault(a["labels"]["alertname"], []).append(a)
            return out

        seen: list[dict[str, list[dict[str, Any]]]] = []

        def only_the_spike() -> dict[str, list[dict[str, Any]]] | None:
            seen.append(alerts())
            return seen[-1] if set(seen[-1]) == {"StreamDetectorDeadLetterSpike"} else None

        try:
            active = server.wait(only_the_spike, 30, "StreamDetectorDeadLetterSpike pending, and no other alert")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nactive alerts, first and last seen: {seen[:1]} ... {seen[-1:]}") from None
        [spike] = active["StreamDetectorDeadLetterSpike"]
        assert spike["state"] == "pending" and spike["labels"]["severity"] == "warning", spike
        assert 0.01 < float(spike["value"]) < 0.05, spike

        # every dashboard query runs, and all but the error-only ones return series
        empty, errors = [], []
        for where, expr in dashboard_expressions():
            try:
                result = server.query(substitute_variables(expr))
            except AssertionError as exc:
                errors.append(f"{where}: {exc}")
                continue
            if not result and not (stream_detector_names(expr) & ONLY_AFTER_ERRORS) and "ALERTS" not in expr:
                empty.append(f"{where}: {expr}")
        assert not errors, "\n".join(errors)
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
        fused_p50 = _values(
            server.query(substitute_variables('histogram_quantile(0.5, sum by (le) (rate(stream_detector_score_bucket{detector="fused"}[$__rate_interval])))'))
        )
        assert fused_p50 and 0.0 <= fused_p50[0] <= 1.0, fused_p50
        default_threshold = Settings().scoring.threshold
        assert _values(server.query("stream_detector_threshold")) == [pytest.approx(default_threshold)]
        lag = server.query("stream_detector_consumer_lag")
        assert {s["metric"]["partition"] for s in lag} == {str(p) for p in range(PARTITIONS)}, lag
        print(f"\nprometheus {binary}: {len(dashboard_expressions())} dashboard queries and {len(rules)} rules evaluated; fused p50 {fused_p50[0]:.4f}")

        # the detector goes away: up drops to 0 and StreamDetectorDown goes pending (for: 1m)
        assert live.daemon.stop(signal.SIGTERM) == 0, live.daemon.log_tail()
        server.wait(lambda: _values(server.query(f'up{{job="{SCRAPE_JOB}"}}')) == [0.0], 30, "up == 0 after the daemon stopped")

        [alert] = server.wait(lambda: alerts().get("StreamDetectorDown"), 30, "StreamDetectorDown pending")
        assert alert["state"] == "pending" and alert["labels"]["severity"] == "critical", alert
    finally:
        server.stop()
