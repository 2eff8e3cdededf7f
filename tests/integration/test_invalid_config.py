"""Every invalid configuration ends the process at once: exit 2, the key named, no traceback.

Each case is a real ``python -m stream_detector`` process against the session's broker, so
the configuration under test is the only thing wrong with it: librdkafka settings are
checked when the daemon starts (``stream_detector.runtime.preflight``), not retried for
ever, and environment overrides and YAML files are checked before anything else runs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_helpers import child_env, write_config
from tests.paths import REPO_ROOT

SECRET = "hunter2-not-for-logs"  # a password in some cases: never printed
# A bad configuration must be refused well before this (the daemon starts in a few seconds).
EXIT_WITHIN_S = 15.0

# Nine levels of ten aliases each: 10**9 strings once expanded.
ALIAS_BOMB = "river:\n  params:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)


@dataclass(frozen=True)
class Case:
    id: str
    key: str  # what stderr must name
    sections: dict[str, Any] = field(default_factory=dict)  # merged into the test's config
    env: dict[str, str] = field(default_factory=dict)
    append: bytes = b""  # raw YAML appended to the config file
    command: tuple[str, ...] = ("run",)


CASES = [
    # Environment overrides: a list or mapping that is not JSON.
    Case("env-mapping-not-json", "STREAM_DETECTOR_KAFKA__CLIENT_CONFIG", env={"STREAM_DETECTOR_KAFKA__CLIENT_CONFIG": "{security.protocol: ssl"}),
    Case("env-list-not-json", "STREAM_DETECTOR_SCHEMA__KEY_FIELDS", env={"STREAM_DETECTOR_SCHEMA__KEY_FIELDS": "store_id"}),
    Case("env-section-not-json", "STREAM_DETECTOR_RIVER", env={"STREAM_DETECTOR_RIVER": "{n_trees: 3}"}, command=("config", "show")),
    # Topics and group.
    Case("empty-input-topic", "kafka.input_topic", sections={"kafka": {"input_topic": ""}}),
    Case("empty-dlq-topic", "kafka.dlq_topic", sections={"kafka": {"dlq_topic": ""}}),
    Case("illegal-output-topic", "kafka.output_topic", sections={"kafka": {"output_topic": "sales anomalies/eu"}}),
    Case("output-is-input", "kafka.output_topic", sections={"kafka": {"output_topic": "{input}"}}),
    Case("empty-group", "kafka.group_id", sections={"kafka": {"group_id": ""}}),
    Case("empty-changelog-topic", "state.changelog_topic", sections={"state": {"changelog_topic": ""}}),
    Case("control-is-input", "alerts.control_topic", sections={"alerts": {"control_topic": "{input}"}}),
    # librdkafka settings passed through.
    Case(
        "ssl-ca-missing",
        "kafka.client_config.ssl.ca.location",
        sections={"kafka": {"client_config": {"security.protocol": "ssl", "ssl.ca.location": "/nonexistent/ca.pem"}}},
    ),
    Case("unknown-client-property", "kafka.client_config.no.such.property", sections={"kafka": {"client_config": {"no.such.property": "1"}}}),
    Case("unknown-consumer-property", "kafka.consumer_config.fetch.max.bites", sections={"kafka": {"consumer_config": {"fetch.max.bites": 1024}}}),
    Case(
        "bad-sasl-mechanism",
        "kafka.client_config.sasl.mechanisms",
        sections={
            "kafka": {
                "client_config": {"security.protocol": "sasl_plaintext", "sasl.mechanisms": "SCRAM-SHA-1024", "sasl.username": "u"},
                "sasl_password": SECRET,
            }
        },
    ),
    Case(
        "unknown-sasl-mechanism",
        "kafka.client_config.sasl.mechanism",
        sections={"kafka": {"client_config": {"security.protocol": "sasl_ssl", "sasl.mechanism": "KERBEROS", "sasl.username": "u", "sasl.password": SECRET}}},
    ),
    Case("bad-producer-value", "kafka.producer_config.linger.ms", sections={"kafka": {"producer_config": {"linger.ms": "soon"}}}),
    Case(
        "poll-interval-below-session",
        "kafka.consumer_config.max.poll.interval.ms",
        sections={"kafka": {"consumer_config": {"session.timeout.ms": 6000, "max.poll.interval.ms": 3000}}},
    ),
    Case(
        "managed-consumer-setting",
        "kafka.consumer_config: 'enable.auto.commit' is not allowed here",
        sections={"kafka": {"consumer_config": {"enable.auto.commit": True}}},
    ),
    Case(
        "ssl-ca-missing-validate",
        "kafka.client_config.ssl.ca.location",
        sections={"kafka": {"client_config": {"ssl.ca.location": "/nonexistent/ca.pem"}}},
        command=("config", "validate"),
    ),
    Case(
        "unknown-property-validate",
        "kafka.producer_config.no.such.property",
        sections={"kafka": {"producer_config": {"no.such.property": "1"}}},
        command=("config", "validate"),
    ),
    Case(
        "unknown-property-backtest",
        "kafka.consumer_config.fetch.max.bites",
        sections={"kafka": {"consumer_config": {"fetch.max.bites": 1024}}},
        command=("backtest", "--from-offset", "0"),
    ),
    # The metrics endpoint's port is taken ({busy}: a port this test holds).
    Case("metrics-port-in-use", "metrics.port", sections={"metrics": {"port": "{busy}"}}),
    # The YAML file itself.
    Case("alias-bomb-show", "river.params", append=ALIAS_BOMB.encode(), command=("config", "show")),
    Case("alias-bomb-run", "river.params", append=ALIAS_BOMB.encode()),
    Case("recursive-alias", "river.params", append=b"river:\n  params: &p\n    n_trees: 5\n    again: *p\n", command=("config", "show")),
    Case("not-utf8", "not UTF-8", append=b"# caf\xe9\n"),
]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _fill(value: Any, names: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in names:
        return names[value[1:-1]]
    return value


def _run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "stream_detector", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(args)} still running after {EXIT_WITHIN_S:.0f} s instead of refusing its configuration:\n{err[-3000:]}")
    return result, time.monotonic() - started


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_configuration_exits_2_naming_the_key(
    case: Case, kafka_bootstrap: str, unique_name: Callable[[str], str], busy_port: int, tmp_path: Path
) -> None:
    input_topic = unique_name("in")
    sections = _fill(case.sections, {"input": input_topic, "busy": busy_port})
    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, unique_name("out"), unique_name("dlq"), unique_name("grp"), **sections)
    if case.append:
        config.write_bytes(config.read_bytes() + case.append)
    args = [*case.command, str(config)] if case.command == ("config", "validate") else [*case.command, "--config", str(config)]
    env = {**child_env(keep_overrides=False), **case.env}

    result, took = _run(args, env)

    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert SECRET not in output
    assert case.key in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("stream-detector:") == 1, result.stderr[-3000:]
    assert len(result.stdout) < 10_000, "printed the configuration anyway"
    assert took < EXIT_WITHIN_S


def test_valid_settings_of_the_same_kinds_still_start(kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path) -> None:
    """The checks refuse what is wrong, not the settings around it: readable files, known
    properties and aliases (within the limit) pass ``config validate``."""
    ca = tmp_path / "ca.pem"
    ca.write_text("")  # readable; librdkafka only loads it for ssl connections
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        unique_name("in"),
        unique_name("out"),
        unique_name("dlq"),
        unique_name("grp"),
        kafka={"client_config": {"ssl.ca.location": str(ca), "client.id": "detector"}, "producer_config": {"linger.ms": 10}},
    )
    config.write_bytes(config.read_bytes() + b"river:\n  params: &p {n_trees: 5, height: 4}\nzscore:\n  min_std_by_feature: &m {log_quantity: 0.3}\n")
    result, _ = _run(["config", "validate", str(config)], child_env(keep_overrides=False))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_evaluate_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    """As after a plain ``pip install``: matplotlib cannot be imported."""
    blocked = "import sys; sys.modules['matplotlib'] = None; from stream_detector.cli import main; raise SystemExit(main(sys.argv[1:]))"
    plot = tmp_path / "eval.png"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", blocked, "evaluate", "--generate", "2000", "--plot", str(plot)],
        cwd=REPO_ROOT,
        env=child_env(keep_overrides=False),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "pip install 'stream-detector[plot]'" in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        next(line for line in result.stderr.splitlines() if "stream-detector[plot]" in line)
    ]
    assert not plot.exists()
    assert time.monotonic() - started < EXIT_WITHIN_S, "evaluated before finding out it cannot plot"
