"""The Grafana dashboard and the Prometheus alert rules only use metrics the daemon exports.

No broker and no Grafana: the dashboard JSON and the provisioning files are parsed and
cross-checked; the set of exported metric names comes from ``Metrics().exposition()`` after
the label setters the daemon calls (``observe.init_metrics``, ``observe.observe_batch`` and the
Kafka callbacks) have run on one real batch. When ``promtool`` is installed every dashboard
expression is also parsed by Prometheus' own parser. tests/integration/test_observability.py
checks the same names against a live daemon and a real Prometheus server.

The PromQL helpers here (``dashboard_expressions``, ``metric_names``, ...) are imported by the
integration test too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.paths import REPO_ROOT

DASHBOARD = REPO_ROOT / "config" / "grafana" / "dashboards" / "stream-detector.json"
DATASOURCES = REPO_ROOT / "config" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = REPO_ROOT / "config" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
RULES = REPO_ROOT / "config" / "prometheus" / "rules.yml"
DETECTOR_YAML = REPO_ROOT / "config" / "detector.yaml"
SCRAPE_JOB = "stream-detector"

# Metric names a PromQL expression may use that the daemon does not export: series made by
# Prometheus itself (per scrape target, and for alerts).
PROMETHEUS_BUILTINS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)
# Labels every scraped series gets from its target.
TARGET_LABELS = frozenset({"job", "instance"})
# The panels the Operations issue asks for: metric names that must be on the dashboard.
REQUIRED_ON_DASHBOARD = {
    "stream_detector_events_total",  # throughput by outcome
    "stream_detector_anomalies_total",  # anomalies per minute
    "stream_detector_detector_fired_total",  # ... by detector
    "stream_detector_score_bucket",  # fused-score distribution
    "stream_detector_threshold",
    "stream_detector_end_to_end_latency_seconds_bucket",
    "stream_detector_consumer_lag",
    "stream_detector_dlq_total",
    "stream_detector_learning_keys",
    "stream_detector_autoencoder_train_loss",
    "stream_detector_autoencoder_info",
    "stream_detector_batch_size_events_bucket",
    "stream_detector_batch_seconds_bucket",
    "stream_detector_scoring_rounds_bucket",
}
REQUIRED_ALERTS = {
    "StreamDetectorDown",
    "StreamDetectorConsumerLagGrowing",
    "StreamDetectorNoEventsConsumed",
    "StreamDetectorDeadLetterSpike",
    "StreamDetectorAnomalyRateSpike",
}

# --- PromQL, just enough to find metric names and label matchers -------------------------------

# Grafana's variables, replaced by something PromQL accepts (durations, or a match-all regex).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "1m",
    "${__interval}": "1m",
    "${__range}": "1h",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
        "start",
        "end",
    }
)
# name{matchers}: name, then the matchers' text (strings included).
_SELECTOR = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)?\s*\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_]\w*)\s*\)\s*$", re.S)


def substitute_variables(expr: str, variables: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: built-ins by durations, ``$name`` by ``variables``
    (default: ``.*``, which is what "All" means for a regex matcher)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: (variables or {}).get(m.group(1), ".*"), expr)


def stream_detector_names(expr: str) -> set[str]:
    """Identifiers starting with ``stream_detector_`` outside string literals."""
    code = _STRING.sub('""', expr)
    return set(re.findall(r"(?<![\w:])(stream_detector_[\w:]*)(?=\s*[{\[\s),]|\s*$)", code))


def metric_names(expr: str) -> set[str]:
    """Every metric name in a PromQL expression: identifiers that are not functions, keywords,
    label names (in matchers and grouping clauses) or durations."""
    code = _STRING.sub('""', substitute_variables(expr))
    code = re.sub(r"\{[^{}]*\}", "{}", code)  # label matchers
    code = re.sub(r"\[[^\]]*\]", "[]", code)  # ranges and subqueries
    code = _GROUPING.sub(" ", code)
    code = re.sub(r"\boffset\s+-?\w+", " ", code)
    names = set()
    for match in _IDENTIFIER.finditer(code):
        name = match.group(1)
        rest = code[match.end() :].lstrip()
        if name in _KEYWORDS or rest.startswith("("):  # a function or an aggregation
            continue
        names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str | None, list[tuple[str, str, str]]]]:
    """(metric name or None, [(label, op, value)]) for each ``name{...}`` in ``expr``."""
    for match in _SELECTOR.finditer(expr):
        yield match.group(1), _MATCHER.findall(match.group(2))


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by (...)`` / ``without (...)`` / ``on (...)`` / ``ignoring (...)``."""
    labels = set()
    for clause in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", _STRING.sub('""', expr)):
        labels.update(label.strip() for label in clause.group(1).split(",") if label.strip())
    return labels


# --- the dashboard -------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and panels inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every query in the dashboard: panel targets, annotations, variables."""
    dashboard = dashboard or load_dashboard()
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = _LABEL_VALUES.match(query)
            out.append((f"variable {variable['name']!r}", match.group(1) if match else query))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [(f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def provisioned_datasource() -> dict[str, Any]:
    [datasource] = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    return datasource


# --- what the daemon exports ---------------------------------------------------------------------


def exported_samples() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """{sample name: {label sets}} of ``Metrics().exposition()`` after the daemon's label setters.

    Mirrors what the daemon does (stream_detector/runtime/daemon.py), with label values taken
    from the real pipeline built from config/detector.yaml, and one real batch scored:

    - ``Daemon._init_metrics``: threshold, detector_enabled / calibrated / fired per detector,
      the autoencoder's device;
    - ``observe.observe_batch``: batch seconds and size, rounds, events by outcome, the score
      histograms (``observe_scores``), calibrated, keys and learning keys per key set, the
      autoencoder's loss and steps;
    - the Kafka side: anomalies and fired (``_produce_anomalies``), dead letters by reason,
      commits, checkpoint time, restore time, recoveries, librdkafka errors by code, consumer
      lag per partition (``_on_stats``), assigned partitions, up, end-to-end latency.
    """
    from prometheus_client.parser import text_string_to_metric_families

    from stream_detector.config import load_settings
    from stream_detector.events.decode import REASONS, decode_batch
    from stream_detector.generator import GeneratorConfig, SalesGenerator
    from stream_detector.metrics import Metrics
    from stream_detector.runtime.daemon import observe_scores
    from stream_detector.scoring.factory import build_pipeline, event_schema

    settings = load_settings(DETECTOR_YAML, environ={})
    pipeline = build_pipeline(settings)
    m = Metrics()

    # Daemon._init_metrics
    m.threshold.set(pipeline.threshold)
    for name in pipeline.detector_names:
        m.detector_enabled.labels(name).set(1)
        m.calibrated.labels(name).set(0)
        m.fired.labels(name)
    for detector in pipeline.detectors:
        device = getattr(detector, "device", None)
        if device is not None:
            m.device.info({"device": str(device)})

    # one real batch, then observe.observe_batch
    records = [orjson.dumps(event) for event, _ in SalesGenerator(GeneratorConfig(seed=3)).generate(600)]
    records.append(b"{not json")
    decoded = decode_batch(records, event_schema(settings))
    result = pipeline.process(decoded.features)
    m.batch_seconds.observe(0.05)
    m.batch_size.observe(len(records))
    m.rounds.observe(result.rounds)
    m.events.labels("scored").inc(decoded.features.n)
    m.events.labels("invalid").inc(len(decoded.invalid))
    observe_scores(m, result)
    for detector in pipeline.detectors:
        m.calibrated.labels(detector.name).set(1 if pipeline.calibrators[detector.name].ready else 0)
        if hasattr(detector, "n_keys"):
            for key_set, n in detector.n_keys().items():
                m.keys.labels(key_set).set(n)
            for key_set, n in detector.learning_keys().items():
                m.learning_keys.labels(key_set).set(n)
        loss = getattr(detector, "last_train_loss", None)
        if loss is not None:
            m.train_loss.set(loss)
            m.train_steps.set(detector.train_steps_total)

    # the Kafka side of the loop
    m.anomalies.inc()
    for name in pipeline.detector_names:
        m.fired.labels(name).inc()
    for reason in REASONS:
        m.dlq.labels(reason).inc()
    m.commits.labels("ok").inc()
    m.checkpoint_seconds.observe(0.01)
    m.restore_seconds.observe(0.01)
    m.recoveries.inc()
    m.kafka_errors.labels("_TRANSPORT").inc()
    m.lag.labels(settings.kafka.input_topic, "0").set(0)
    m.assigned.set(1)
    m.up.set(1)
    m.latency.observe(0.01)
    # the alerting side (windows, feedback)
    m.suppressed.labels("window").inc()
    m.annotated.inc()
    m.feedback.labels("false_positive", "applied").inc()
    m.feedback_rules.set(1)
    m.control.labels("added").inc()
    m.windows.labels("known").set(1)
    m.windows.labels("active").set(0)

    samples: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
    return samples


@pytest.fixture(scope="module")
def exported() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    return exported_samples()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


# --- tests: structure ----------------------------------------------------------------------------


def test_dashboard_is_valid_json_with_unique_ids_and_a_sane_grid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "stream-detector"
    assert dashboard["title"]
    assert dashboard.get("id") is None  # provisioned: Grafana assigns the id
    assert isinstance(dashboard["schemaVersion"], int)
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "heatmap", "gauge", "bargauge", "table", "text", "state-timeline"}, panel["type"]
        assert panel.get("title"), panel
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in occupied, f"{panel['title']!r} overlaps {occupied[(x, y)]!r}"
                occupied[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        targets = panel.get("targets")
        assert targets, f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["expr"].strip(), (panel["title"], target)


def test_every_panel_and_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasource = provisioned_datasource()
    expected = {"type": "prometheus", "uid": datasource["uid"]}
    assert datasource["type"] == "prometheus"
    for panel in all_panels(dashboard):
        assert panel.get("datasource") == expected, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource", expected) == expected, (panel["title"], target["refId"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == expected, annotation["name"]
    # and nothing anywhere in the file names another data source
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', DASHBOARD.read_text(encoding="utf-8")))
    assert uids <= {expected["uid"], dashboard["uid"], "-- Grafana --"}, uids


def test_grafana_provisioning_files(dashboard: dict[str, Any]) -> None:
    datasource = provisioned_datasource()
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["access"] == "proxy"
    assert datasource["uid"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", datasource["uid"])
    assert datasource.get("isDefault") is True
    # $__rate_interval is computed from the scrape interval: keep it equal to prometheus.yml's.
    prometheus = yaml.safe_load((REPO_ROOT / "config" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    [provider] = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider.get("allowUiUpdates") is False


# --- tests: the queries --------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    """The small PromQL scanner the other tests rely on."""
    expr = (
        "histogram_quantile(0.99, sum by (le, detector) "
        '(rate(stream_detector_score_bucket{detector="fused", instance=~"$instance"}[$__rate_interval]))) > bool 0.5'
    )
    assert metric_names(expr) == {"stream_detector_score_bucket"}
    assert stream_detector_names(expr) == {"stream_detector_score_bucket"}
    assert grouping_labels(expr) == {"le", "detector"}
    assert list(selectors(expr)) == [("stream_detector_score_bucket", [("detector", "=", "fused"), ("instance", "=~", "$instance")])]
    expr = 'up{job="stream-detector"} == 0 or absent(up{job="stream-detector"}) and on (instance) stream_detector_up offset 5m'
    assert metric_names(expr) == {"up", "stream_detector_up"}
    assert metric_names("sum(rate(a_total[5m])) / ignoring(reason) group_left sum(b)") == {"a_total", "b"}
    assert metric_names('count_over_time(x{label="stream_detector_fake"}[1h:1m])') == {"x"}
    assert stream_detector_names('x{label="stream_detector_fake"}') == set()
    assert substitute_variables('a{instance=~"$instance"}[$__rate_interval]') == 'a{instance=~".*"}[1m]'


def test_dashboard_covers_what_operations_asked_for(dashboard: dict[str, Any]) -> None:
    exprs = [expr for _, expr in dashboard_expressions(dashboard)]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used >= REQUIRED_ON_DASHBOARD, REQUIRED_ON_DASHBOARD - used
    # fused-score quantiles next to the threshold, latency p50/p95/p99, anomalies by detector
    assert any("histogram_quantile" in e and 'detector="fused"' in e and "stream_detector_score_bucket" in e for e in exprs)
    latency = [e for e in exprs if "histogram_quantile" in e and "stream_detector_end_to_end_latency_seconds_bucket" in e]
    assert {re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in latency} >= {"0.5", "0.95", "0.99"}
    assert any("by (detector)" in e and "stream_detector_detector_fired_total" in e for e in exprs)
    assert any("by (outcome)" in e and "stream_detector_events_total" in e for e in exprs)
    assert any("by (reason)" in e and "stream_detector_dlq_total" in e for e in exprs)
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) >= 4, rows


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_only_exported_or_builtin_metric_names(source: str, exported: dict[str, set]) -> None:
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    assert exprs
    problems = []
    for where, expr in exprs:
        ours = stream_detector_names(expr)
        names = metric_names(expr)
        if not ours <= names:
            problems.append(f"{where}: scanner disagreement {ours} vs {names}")
        for name in names:
            if name.startswith("stream_detector_"):
                if name not in exported:
                    problems.append(f"{where}: {name} is not exported by the daemon")
            elif name not in PROMETHEUS_BUILTINS:
                problems.append(f"{where}: {name} is neither a stream_detector_ metric nor a Prometheus built-in")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_label_matchers_groupings_and_legends_name_real_labels(source: str, exported: dict[str, set], dashboard: dict[str, Any]) -> None:
    """``{label="value"}``, ``by (label)`` and ``{{label}}`` only name labels the metrics have,
    and equality matchers only values the daemon exports (e.g. detector="fused")."""
    labels_of: dict[str, set[str]] = {name: {k for ls in label_sets for k, _ in ls} | TARGET_LABELS for name, label_sets in exported.items()}
    values_of: dict[tuple[str, str], set[str]] = {}
    for name, label_sets in exported.items():
        for label_set in label_sets:
            for k, v in label_set:
                values_of.setdefault((name, k), set()).add(v)
    builtin_labels = TARGET_LABELS | {"alertname", "alertstate", "severity", "le"}
    problems = []
    items: list[tuple[str, str, str]] = []
    if source == "dashboard":
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                items.append((f"{panel['title']!r}/{target['refId']}", target["expr"], target.get("legendFormat", "")))
        for annotation in dashboard["annotations"]["list"]:
            if annotation.get("expr"):
                items.append((annotation["name"], annotation["expr"], annotation.get("titleFormat", "") + annotation.get("textFormat", "")))
    else:
        items = [(where, expr, "") for where, expr in rule_expressions()]
    for where, expr, legend in items:
        available: set[str] = set()
        for name in metric_names(expr):
            available |= labels_of.get(name, builtin_labels)
        for name, matchers in selectors(expr):
            for label, op, value in matchers:
                if name is None or name not in exported:
                    continue
                if label not in labels_of[name]:
                    problems.append(f"{where}: {name} has no label {label!r}")
                elif op == "=" and label not in TARGET_LABELS and value not in values_of.get((name, label), set()):
                    problems.append(f"{where}: {name}{{{label}={value!r}}} matches nothing the daemon exports")
        for label in grouping_labels(expr):
            if label not in available:
                problems.append(f"{where}: groups by {label!r}, which none of {sorted(metric_names(expr))} has")
        for label in _LEGEND_LABEL.findall(legend):
            if label not in available:
                problems.append(f"{where}: legend uses {{{{{label}}}}}, which none of {sorted(metric_names(expr))} has")
    assert not problems, "\n".join(problems)


def test_dashboard_expressions_parse_with_promtool(tmp_path: Path) -> None:
    """Prometheus' own parser (``promtool check rules``) accepts every dashboard query."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; `make install` does it as root)")
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute_variables(expr)} for i, (_, expr) in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- tests: the alert rules ----------------------------------------------------------------------


def test_alert_rules_have_for_severity_and_annotations() -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(alerts)
    for name, rule in alerts.items():
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name
    down = alerts["StreamDetectorDown"]["expr"]
    assert f'up{{job="{SCRAPE_JOB}"}} == 0' in down and f'absent(up{{job="{SCRAPE_JOB}"}})' in down
    assert alerts["StreamDetectorDown"]["labels"]["severity"] == "critical"
    # the scrape job the rules name is the one prometheus.yml defines
    prometheus = yaml.safe_load((REPO_ROOT / "config" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert SCRAPE_JOB in [job["job_name"] for job in prometheus["scrape_configs"]]
    assert [(RULES.parent / f).resolve() for f in prometheus["rule_files"]] == [RULES.resolve()]
