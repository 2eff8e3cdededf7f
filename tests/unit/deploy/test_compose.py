"""docker-compose.yml, Dockerfile, Prometheus and Grafana config agree with each other and with the code.

No Docker engine is needed: the files are parsed and cross-checked against
config/detector.yaml, the settings loader and the CLI parser. The Dockerfile's HEALTHCHECK
command is run for real against a metrics server on a free port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_detector.cli import build_parser
from stream_detector.config import Settings, load_settings
from tests.paths import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DETECTOR_YAML = REPO_ROOT / "config" / "detector.yaml"
SERVICES = ("kafka", "kafka-init", "detector", "generator", "prometheus", "grafana")
CONFIG_IN_IMAGE = "/etc/stream-detector/detector.yaml"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(DETECTOR_YAML, environ={})


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def binds(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount, short or long syntax."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                out.append((source, target))
        elif volume.get("type") == "bind":
            out.append((volume["source"], volume["target"]))
    return out


def published(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of each published port, short or long syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            out.append((int(parts[-2]), int(parts[-1])))
    return out


def build_dir(service: dict[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


@pytest.fixture(scope="module")
def dockerfile(services: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    return dockerfile_instructions(build_dir(services["detector"])[1])


def kafka_init_topics(service: dict[str, Any]) -> dict[str, int]:
    script = " ".join(argv(service.get("entrypoint")) + argv(service.get("command")))
    topics = {}
    for line in script.splitlines():
        if "kafka-topics.sh" in line and "--create" in line:
            args = shlex.split(line)
            assert "--if-not-exists" in args, line
            topics[args[args.index("--topic") + 1]] = int(args[args.index("--partitions") + 1])
    return topics


# --- the services ----------------------------------------------------------------------------


def test_every_service_exists(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


def test_depends_on_names_real_services_with_sensible_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for dependency in depends:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["detector"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert "kafka-init" in services["generator"]["depends_on"]


def test_bind_mounted_host_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = [(name, source) for name, service in services.items() for source, _ in binds(service)]
    assert mounts, "expected bind mounts (detector config, prometheus config, grafana provisioning)"
    for name, source in mounts:
        path = (COMPOSE_FILE.parent / source).resolve()
        # a file, or (Grafana's provisioning and dashboards) a directory with files in it
        assert path.is_file() or (path.is_dir() and any(p.is_file() for p in path.iterdir())), f"{name}: {source} does not exist"


def test_built_services_have_a_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = [name for name, service in services.items() if "build" in service]
    assert {"detector", "generator"} <= set(built)
    for name in built:
        context, dockerfile = build_dir(services[name])
        assert context.is_dir(), name
        assert dockerfile.is_file(), f"{name}: no Dockerfile at {dockerfile}"


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = environment(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert listeners == {"PLAINTEXT": ":9092", "CONTROLLER": ":9093", "EXTERNAL": ":29092"}
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"PLAINTEXT": "kafka:9092", "EXTERNAL": "localhost:29092"}
    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocol_map) == set(listeners)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert (29092, 29092) in published(kafka)
    assert "kafka-topics.sh --bootstrap-server localhost:9092 --list" in " ".join(argv(kafka["healthcheck"]["test"]))


def test_kafka_init_creates_the_configured_topics(services: dict[str, dict[str, Any]], settings: Settings) -> None:
    init = services["kafka-init"]
    assert init["image"] == services["kafka"]["image"]
    topics = kafka_init_topics(init)
    k = settings.kafka
    assert set(topics) == {k.input_topic, k.output_topic, k.dlq_topic}
    assert topics == {"sales": 3, "sales-anomalies": 3, "sales-dlq": 1}


# --- ports and addresses agree with config/detector.yaml -------------------------------------


def test_detector_mounts_the_config_the_image_runs_with(services: dict[str, dict[str, Any]], dockerfile: list[tuple[str, str]]) -> None:
    detector = services["detector"]
    assert ("./config/detector.yaml", CONFIG_IN_IMAGE) in binds(detector)
    assert any(v.endswith(":ro") for v in detector["volumes"] if isinstance(v, str) and CONFIG_IN_IMAGE in v)
    cmd = json.loads(dict(final_stage(dockerfile))["CMD"])
    assert cmd == ["run", "--config", CONFIG_IN_IMAGE]
    assert "command" not in detector  # uses the image's CMD


def test_detector_environment_is_valid_config(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["detector"])
    assert env["STREAM_DETECTOR_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    # Every STREAM_DETECTOR_* variable must be a real key: load_settings rejects unknown ones.
    effective = load_settings(DETECTOR_YAML, environ=env)
    assert effective.kafka.bootstrap_servers == "kafka:9092"


def test_detector_publishes_the_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    effective = load_settings(DETECTOR_YAML, environ=environment(services["detector"]))
    port = effective.metrics.port
    assert port == 9108
    assert (port, port) in published(services["detector"])
    assert effective.metrics.host == "0.0.0.0"  # reachable from outside the container


def test_prometheus_scrapes_the_detector_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert (9090, 9090) in published(prometheus)
    source = {target: source for source, target in binds(prometheus)}["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((COMPOSE_FILE.parent / source).read_text(encoding="utf-8"))
    assert config["global"]["scrape_interval"] == "5s"
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "stream-detector"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    effective = load_settings(DETECTOR_YAML, environ=environment(services["detector"]))
    assert targets == [f"detector:{effective.metrics.port}"]


def test_prometheus_loads_the_mounted_alert_rules(services: dict[str, dict[str, Any]]) -> None:
    """rule_files (relative to the config file, as Prometheus resolves them) are mounted read-only."""
    prometheus = services["prometheus"]
    mounted = {target: source for source, target in binds(prometheus)}
    config = yaml.safe_load((COMPOSE_FILE.parent / mounted["/etc/prometheus/prometheus.yml"]).read_text(encoding="utf-8"))
    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no rule files"
    for rule_file in rule_files:
        target = os.path.normpath(os.path.join("/etc/prometheus", rule_file))
        assert target in mounted, f"{rule_file} ({target}) is not mounted into the prometheus service"
        assert (COMPOSE_FILE.parent / mounted[target]).resolve() == (REPO_ROOT / "config" / "prometheus" / "rules.yml").resolve()
        assert any(v.endswith(":ro") for v in prometheus["volumes"] if isinstance(v, str) and f":{target}" in v)
        rules = yaml.safe_load((COMPOSE_FILE.parent / mounted[target]).read_text(encoding="utf-8"))
        assert any("alert" in rule for group in rules["groups"] for rule in group["rules"])


def test_grafana_service(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss:")
    assert grafana["image"].split(":", 1)[1] not in ("", "latest")  # a pinned version
    assert (3000, 3000) in published(grafana)
    assert "prometheus" in grafana["depends_on"]
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # anonymous visitors can look, not edit
    volumes = [v for v in grafana["volumes"] if isinstance(v, str)]
    assert volumes and all(v.endswith(":ro") for v in volumes), "grafana's mounts must be read-only"
    mounted = {target: source for source, target in binds(grafana)}
    assert set(mounted) >= {"/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards"}


def test_grafana_provisioning_points_at_the_mounted_files_and_prometheus(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounted = {target: (COMPOSE_FILE.parent / source).resolve() for source, target in binds(grafana)}

    def host_path(container_path: str) -> Path:
        """Where a path inside the grafana container comes from on the host."""
        for target, source in sorted(mounted.items(), key=lambda item: -len(item[0])):
            if container_path == target or container_path.startswith(target + "/"):
                return source / os.path.relpath(container_path, target)
        raise AssertionError(f"{container_path} is not mounted into grafana")

    [datasource] = yaml.safe_load((mounted["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text(encoding="utf-8"))["datasources"]
    assert datasource["type"] == "prometheus"
    url = re.fullmatch(r"http://([\w.-]+):(\d+)/?", datasource["url"])
    assert url, datasource["url"]
    assert url.group(1) == "prometheus" and url.group(1) in services  # the compose service, by name
    assert int(url.group(2)) in [container for _, container in published(services["prometheus"])]

    [provider] = yaml.safe_load((mounted["/etc/grafana/provisioning/dashboards"] / "dashboards.yml").read_text(encoding="utf-8"))["providers"]
    dashboards_dir = host_path(provider["options"]["path"])
    dashboards = sorted(dashboards_dir.glob("*.json"))
    assert [p.name for p in dashboards] == ["stream-detector.json"]
    assert dashboards_dir.resolve() == (REPO_ROOT / "config" / "grafana" / "dashboards").resolve()
    for path in dashboards:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert f'"uid": "{datasource["uid"]}"' in path.read_text(encoding="utf-8"), path.name
        assert dashboard["uid"]
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert host_path(home).is_file(), home


def test_generator_command_parses_and_targets_the_input_topic(services: dict[str, dict[str, Any]], settings: Settings) -> None:
    generator = services["generator"]
    assert argv(generator["entrypoint"]) == ["stream-detector"]
    args = build_parser().parse_args(argv(generator["command"]))
    assert args.command == "generate"
    assert args.count == 100_000_000
    assert args.rate == 500
    assert args.bootstrap_servers == "kafka:9092"
    assert args.topic == settings.kafka.input_topic
    assert args.output is None
    # The image's HEALTHCHECK probes the detector's metrics port; the generator has none.
    assert generator["healthcheck"] == {"disable": True}


def test_in_network_bootstrap_address_is_the_plaintext_listener(services: dict[str, dict[str, Any]]) -> None:
    advertised = environment(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in advertised.split(",")
    assert environment(services["detector"])["STREAM_DETECTOR_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"


# --- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "detector"


def test_dockerfile_exposes_the_metrics_port_and_has_a_healthcheck(dockerfile: list[tuple[str, str]], settings: Settings) -> None:
    final = final_stage(dockerfile)
    exposed = {int(p.split("/")[0]) for keyword, rest in final if keyword == "EXPOSE" for p in rest.split()}
    assert settings.metrics.port in exposed
    [healthcheck] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "NONE" not in healthcheck.upper().split()
    assert "127.0.0.1:%s/healthz" in healthcheck or f"127.0.0.1:{settings.metrics.port}/healthz" in healthcheck
    assert str(settings.metrics.port) in healthcheck


def test_dockerfile_base_entrypoint_and_config(dockerfile: list[tuple[str, str]]) -> None:
    assert all(rest.split()[0].startswith("python:3.11-slim") for keyword, rest in dockerfile if keyword == "FROM")
    final = dict(final_stage(dockerfile))
    assert json.loads(final["ENTRYPOINT"]) == ["stream-detector"]
    copies = [rest.split() for keyword, rest in final_stage(dockerfile) if keyword == "COPY"]
    assert ["config/detector.yaml", CONFIG_IN_IMAGE] in copies
    installs = [rest for keyword, rest in dockerfile if keyword == "RUN" and "pip install" in rest]
    assert any("--no-cache-dir ." in rest for rest in installs)


def test_dockerfile_copy_sources_exist(dockerfile: list[tuple[str, str]]) -> None:
    for keyword, rest in dockerfile:
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            if any(ch in source for ch in "*?["):
                continue
            assert (REPO_ROOT / source).exists(), f"COPY source {source} missing"


def test_dockerfile_healthcheck_command_works(dockerfile: list[tuple[str, str]]) -> None:
    """Run the HEALTHCHECK's command: exit 0 against a live /healthz, non-zero with nothing there."""
    from stream_detector.metrics import Metrics
    from stream_detector.metrics_server import MetricsServer

    [healthcheck] = [rest for keyword, rest in final_stage(dockerfile) if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    command = [sys.executable, *command[1:]]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}

    server = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready")).start()
    try:
        port = server.port
        ok = subprocess.run(command, env={**env, "STREAM_DETECTOR_METRICS__PORT": str(port)}, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
    down = subprocess.run(command, env={**env, "STREAM_DETECTOR_METRICS__PORT": str(port)}, capture_output=True, timeout=30)
    assert down.returncode != 0


def test_compose_file_has_no_unescaped_interpolation() -> None:
    """Compose substitutes $VAR / ${VAR} everywhere; a shell variable meant for a container must be $$VAR."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert re.findall(r"(?<!\$)\$(?!\$)[{A-Za-z_]", code) == []
