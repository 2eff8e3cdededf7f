"""Invalid configurations of every kind are one ``ConfigError`` naming the key.

Environment values that should be JSON, topic names and topics shared between roles, settings
the daemon manages itself, YAML files that expand without bound, and the Kafka client settings
checked at start (``stream_detector.runtime.preflight``: no client here gets as far as
connecting, each is refused while it is built). The real processes are in
tests/integration/test_invalid_config.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stream_detector.cli import _require_extra
from stream_detector.config import MAX_TOPIC_NAME_LENGTH, MAX_YAML_ALIAS_EXPANSION, Settings, load_settings
from stream_detector.errors import ConfigError
from stream_detector.runtime.preflight import _explain, check_client, check_files, check_kafka_settings
from tests.paths import REPO_ROOT

SECRET = "hunter2-not-for-logs"


def settings(**sections: Any) -> Settings:
    return Settings(**sections)


def refused(**sections: Any) -> str:
    """The message of the ConfigError that loading these sections gives."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={f"STREAM_DETECTOR_{name.upper()}": _json(value) for name, value in sections.items()})
    return str(caught.value)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def yaml_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "detector.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --- environment values that are not JSON -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("STREAM_DETECTOR_KAFKA__CLIENT_CONFIG", "kafka.client_config"),
        ("STREAM_DETECTOR_SCHEMA__KEY_FIELDS", "schema.key_fields"),
        ("STREAM_DETECTOR_RIVER__PARAMS", "river.params"),
        ("STREAM_DETECTOR_ALERTS__WINDOWS", "alerts.windows"),
        ("STREAM_DETECTOR_RIVER", "river"),
    ],
)
def test_env_value_that_is_not_json_names_the_variable_and_key(name: str, key: str) -> None:
    value = "{sasl.password: " + SECRET
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"STREAM_DETECTOR_METRICS__PORT": "9200", name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: {key} ")
    assert "not JSON" in message
    assert SECRET not in message  # the value may be a secret: never repeated


def test_env_json_values_still_load() -> None:
    loaded = load_settings(
        None, environ={"STREAM_DETECTOR_KAFKA__CLIENT_CONFIG": '{"client.id": "x"}', "STREAM_DETECTOR_SCHEMA__KEY_FIELDS": '["store_id", "channel"]'}
    )
    assert loaded.kafka.client_config == {"client.id": "x"}
    assert loaded.schema.key_fields == ["store_id", "channel"]


# --- topics and group --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "x" * (MAX_TOPIC_NAME_LENGTH + 1), "sales anomalies", "sales/eu", "ventes-été"])
@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("kafka", "input_topic"),
        ("kafka", "output_topic"),
        ("kafka", "dlq_topic"),
        ("state", "changelog_topic"),
        ("alerts", "control_topic"),
        ("alerts", "feedback_topic"),
    ],
)
def test_illegal_topic_names_are_refused_naming_the_key(section: str, field: str, name: str) -> None:
    message = refused(**{section: {field: name}})
    assert f"{section}.{field}: " in message


def test_legal_topic_names_pass() -> None:
    longest = "t" * MAX_TOPIC_NAME_LENGTH
    loaded = settings(kafka={"input_topic": "sales.v2_eu-1", "output_topic": longest}, state={"changelog_topic": "detector_state"})
    assert loaded.kafka.output_topic == longest


@pytest.mark.parametrize(
    ("sections", "key", "other"),
    [
        ({"kafka": {"output_topic": "sales"}}, "kafka.output_topic", "kafka.input_topic"),
        ({"kafka": {"dlq_topic": "sales"}}, "kafka.dlq_topic", "kafka.input_topic"),
        ({"state": {"changelog_topic": "sales-anomalies"}}, "state.changelog_topic", "kafka.output_topic"),
        ({"kafka": {"output_topic": "stream-detector-state"}}, "state.changelog_topic", "kafka.output_topic"),  # the default changelog
        ({"alerts": {"control_topic": "sales"}}, "alerts.control_topic", "kafka.input_topic"),
        ({"alerts": {"control_topic": "ops", "feedback_topic": "ops"}}, "alerts.feedback_topic", "alerts.control_topic"),
    ],
)
def test_the_daemons_topics_are_distinct(sections: dict[str, Any], key: str, other: str) -> None:
    message = refused(**sections)
    assert f"  {key}" in message and f"is also {other}" in message
    assert "Value error" not in message and "(top level)" not in message


def test_anomalies_and_dead_letters_may_share_a_topic_and_a_disabled_state_frees_its_name() -> None:
    settings(kafka={"output_topic": "detector-out", "dlq_topic": "detector-out"})
    settings(kafka={"output_topic": "stream-detector-state"}, state={"enabled": False})


def test_group_id_must_not_be_empty_nor_make_an_illegal_changelog_name() -> None:
    assert "kafka.group_id: " in refused(kafka={"group_id": ""})
    message = refused(kafka={"group_id": "fraud team"})
    assert "kafka.group_id: the default state.changelog_topic (kafka.group_id + '-state') is not a legal topic name ('fraud team-state' has" in message
    message = refused(kafka={"group_id": "fraud team"}, state={"changelog_topic": "fraud-state"})
    assert "kafka.group_id: the default scaling.population_topic (kafka.group_id + '-population') is not a legal topic name" in message
    named = settings(kafka={"group_id": "fraud team"}, state={"changelog_topic": "fraud-state"}, scaling={"population_topic": "fraud-population"})
    assert named.kafka.group_id == "fraud team"


def test_the_population_topic_is_distinct_from_the_others() -> None:
    message = refused(kafka={"output_topic": "shared"}, scaling={"population_topic": "shared"})
    assert "scaling.population_topic: 'shared' is also kafka.output_topic" in message
    assert settings(kafka={"output_topic": "shared"}, scaling={"population_topic": "shared", "share_calibration": False})


@pytest.mark.parametrize("section", ["client_config", "consumer_config", "producer_config"])
@pytest.mark.parametrize("name", ["bootstrap.servers", "group.id", "transactional.id", "enable.auto.commit", "Enable.Auto.Offset.Store"])
def test_settings_the_daemon_manages_are_refused_in_the_pass_through(section: str, name: str) -> None:
    message = refused(kafka={section: {name: "x"}})
    assert f"kafka.{section}: {name!r} is not allowed here: " in message


# --- the YAML file ------------------------------------------------------------------------------


def alias_bomb(levels: int) -> str:
    lines = ["river:", "  params:", "    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, alias_bomb(9))  # 10**9 values once expanded
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert message.startswith(f"config file {path}: YAML aliases at river.params.a8 expand to 1,111,111,111 values")


def test_yaml_anchors_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    text = (
        "silence:\n  fields: &keys [store_id]\nschema:\n  key_fields: *keys\n"
        "zscore:\n  min_std_by_feature: &floors {log_quantity: 0.3}\n"
        "river:\n  params: {<<: {n_trees: 5, height: 4}, window_size: 100}\n"
    )
    loaded = load_settings(yaml_file(tmp_path, text), environ={})
    assert loaded.schema.key_fields == loaded.silence.fields == ["store_id"]
    assert loaded.river.params == {"n_trees": 5, "height": 4, "window_size": 100}


def test_yaml_alias_limit_counts_the_values_aliases_add(tmp_path: Path) -> None:
    # One anchored list of n strings repeated by k aliases adds k * (n + 1) values.
    def text(n: int, k: int) -> str:
        return f"river:\n  params:\n    base: &b [{', '.join(['x'] * n)}]\n" + "".join(f"    c{i}: *b\n" for i in range(k))

    assert MAX_YAML_ALIAS_EXPANSION == 10_000
    loaded = load_settings(yaml_file(tmp_path, text(999, 10)), environ={})  # adds 10,000: at the limit
    assert len(loaded.river.params) == 11
    with pytest.raises(ConfigError, match=r"YAML aliases at river\.params expand to 11,023 values"):
        load_settings(yaml_file(tmp_path, text(1000, 10)), environ={})  # adds 10,010


def test_recursive_yaml_alias_is_refused(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "river:\n  params: &p\n    n_trees: 5\n    again: *p\n")
    with pytest.raises(ConfigError, match=r"the YAML alias at river\.params\.again refers to a value that contains it \(anchored at line 2\)"):
        load_settings(path, environ={})


def test_yaml_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "river:\n  params:\n    a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings(path, environ={})


def test_yaml_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, b"kafka:\n  group_id: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text: byte 0xe9 at position 22"):
        load_settings(path, environ={})


def test_shipped_config_still_loads() -> None:
    assert load_settings(REPO_ROOT / "config" / "detector.yaml", environ={}) == Settings()


# --- Kafka client settings, checked at start --------------------------------------------------


def test_missing_or_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^kafka.consumer_config.ssl.certificate.location: /nonexistent/cert.pem: no such file$"):
        check_files(settings(kafka={"consumer_config": {"ssl.certificate.location": "/nonexistent/cert.pem"}}), "consumer")
    with pytest.raises(ConfigError, match=r"^kafka.client_config.ssl.ca.location: "):
        check_files(settings(kafka={"client_config": {"ssl.ca.location": str(tmp_path / "ca.pem")}}), "admin")
    with pytest.raises(ConfigError, match=r"^kafka.client_config.sasl.oauthbearer.assertion.file: "):
        check_files(settings(kafka={"client_config": {"sasl.oauthbearer.assertion.file": str(tmp_path / "a.jwt")}}), "producer")
    if os.getuid() != 0:  # root reads anything
        locked = tmp_path / "key.pem"
        locked.write_text("x")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="not readable by this process"):
            check_files(settings(kafka={"client_config": {"ssl.key.location": str(locked)}}), "consumer")


def test_present_files_probe_and_other_roles_sections_pass(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    check_files(settings(kafka={"client_config": {"ssl.ca.location": str(ca)}}), "consumer")
    check_files(settings(kafka={"client_config": {"ssl.ca.location": str(tmp_path)}}), "consumer")  # a CA directory
    check_files(settings(kafka={"client_config": {"ssl.ca.location": "probe"}}), "consumer")
    # The producer's file does not concern the consumer.
    check_files(settings(kafka={"producer_config": {"ssl.key.location": "/nonexistent"}}), "consumer")


@pytest.mark.parametrize(
    ("kafka", "role", "key", "reason"),
    [
        ({"client_config": {"no.such.property": "1"}}, "admin", "kafka.client_config.no.such.property", 'No such configuration property: "no.such.property"'),
        ({"consumer_config": {"fetch.max.bites": 1}}, "consumer", "kafka.consumer_config.fetch.max.bites", "No such configuration property"),
        (
            {"producer_config": {"linger.ms": "soon"}},
            "producer",
            "kafka.producer_config.linger.ms",
            '"queue.buffering.max.ms"',
        ),  # reported by librdkafka's name
        (
            {"client_config": {"acks": "most"}, "producer_config": {"acks": "some"}},
            "producer",
            "kafka.producer_config.acks",
            "Invalid value",
        ),  # the role's section wins
        (
            {"client_config": {"security.protocol": "sasl_plaintext", "sasl.mechanisms": "NOPE"}},
            "consumer",
            "kafka.client_config.sasl.mechanisms",
            "Unsupported SASL mechanism: NOPE",
        ),
        ({"client_config": {"security.protocol": "TLS"}}, "producer", "kafka.client_config.security.protocol", 'Invalid value "TLS"'),
        (
            {"consumer_config": {"session.timeout.ms": 6000, "max.poll.interval.ms": 3000}},
            "consumer",
            "kafka.consumer_config.max.poll.interval.ms",
            "must be >=",
        ),
        ({"client_config": {"statistics.interval.ms": -5}}, "admin", "kafka.client_config.statistics.interval.ms", "outside allowed range"),
    ],
)
def test_librdkafka_refusals_name_the_key(kafka: dict[str, Any], role: Any, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_client(settings(kafka=kafka), role)
    message = str(caught.value)
    assert message.startswith(f"{key}: the Kafka "), message
    assert reason in message and "Failed to create" not in message


def test_exactly_once_producer_settings_are_checked_with_the_daemons_own() -> None:
    # The daemon sets transaction.timeout.ms 60 s for exactly-once; librdkafka wants
    # message.timeout.ms within it.
    loaded = settings(processing={"guarantee": "exactly-once"}, kafka={"producer_config": {"message.timeout.ms": 120_000}})
    with pytest.raises(ConfigError, match=r"^kafka.producer_config.message.timeout.ms: the Kafka producer refuses it"):
        check_kafka_settings(loaded)


def test_check_runs_the_files_before_the_clients() -> None:
    loaded = settings(kafka={"client_config": {"security.protocol": "ssl", "ssl.ca.location": "/nonexistent/ca.pem"}})
    with pytest.raises(ConfigError, match=r"^kafka.client_config.ssl.ca.location: /nonexistent/ca.pem: no such file$"):
        check_kafka_settings(loaded)


def test_refusals_never_print_a_secret() -> None:
    loaded = settings(kafka={"client_config": {"sasl.password": SECRET, "sasl.username": "u"}, "sasl_password": SECRET})
    message = _explain(f'Invalid value "{SECRET}" for configuration property "sasl.password"', loaded, "consumer")
    assert SECRET not in message and message.startswith("kafka.sasl_password: ")
    # A short secret is masked where it stands alone, not inside other words.
    loaded = settings(kafka={"client_config": {"ssl.key.password": "p"}})
    assert "Unsupported" in _explain("Unsupported value p", loaded, "consumer")
    assert "value **********" in _explain("Unsupported value p", loaded, "consumer")


def test_refusal_naming_no_setting_names_the_sections_in_play() -> None:
    loaded = settings(kafka={"client_config": {"client.id": "x"}, "producer_config": {"linger.ms": 1}})
    assert _explain("Failed to create producer: something odd", loaded, "producer") == (
        "kafka.client_config or kafka.producer_config: the Kafka producer refuses these settings: something odd"
    )


# --- a missing optional dependency ------------------------------------------------------------


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as after a plain `pip install`
    with pytest.raises(ConfigError) as caught:
        _require_extra("matplotlib", "plot", "--plot")
    assert str(caught.value) == "--plot needs matplotlib, which is not installed: pip install 'stream-detector[plot]'"
