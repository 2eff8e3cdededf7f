"""Configuration: config/detector.yaml equals the defaults, env overrides, errors that name the key.

Every ``load_settings`` call passes ``environ`` explicitly, so the developer's own
``STREAM_DETECTOR_*`` variables never leak into these tests; the CLI tests run in a
subprocess with those variables removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stream_detector.config import Settings, librdkafka_config, load_settings, masked_dump
from stream_detector.errors import ConfigError
from tests.paths import REPO_ROOT

DETECTOR_YAML = REPO_ROOT / "config" / "detector.yaml"
MASK = "**********"


def write(tmp_path: Path, text: str, name: str = "detector.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m stream_detector ARGS`` from the repo root, without the caller's STREAM_DETECTOR_* vars."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "stream_detector", *args],
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


# --- (a) config/detector.yaml is the defaults ------------------------------------------------


def test_detector_yaml_equals_defaults() -> None:
    assert load_settings(DETECTOR_YAML, environ={}) == load_settings(None, environ={})


def test_detector_yaml_values_have_the_defaults_types() -> None:
    """Stricter than model equality: pydantic's lax mode would turn a YAML string "1e-9" (PyYAML
    reads exponents without a dot as strings) into the right float and hide the typo."""
    raw = yaml.safe_load(DETECTOR_YAML.read_text(encoding="utf-8"))
    defaults = Settings().model_dump(mode="json", by_alias=True)
    assert set(raw) == set(defaults), "sections differ"
    drift = []
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), f"keys of {section} differ"
        for key, value in values.items():
            got = raw[section][key]
            if got != value or type(got) is not type(value):
                drift.append(f"{section}.{key}: detector.yaml has {got!r}, the default is {value!r}")
    assert drift == [], "config/detector.yaml is out of step with stream_detector/config.py"


def test_every_setting_in_detector_yaml_is_documented() -> None:
    """Each section key has a comment right above it (a comment block may cover the key)."""
    lines = DETECTOR_YAML.read_text(encoding="utf-8").splitlines()
    undocumented = []
    section = None
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            section = line.split(":")[0]
        match = re.match(r"^  ([a-z_]+):", line)
        if match:
            previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
            if not previous.strip().startswith("#"):
                undocumented.append(f"{section}.{match.group(1)}")
    assert undocumented == []


def test_detector_yaml_validates_with_the_cli() -> None:
    result = cli("config", "validate", str(DETECTOR_YAML))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_config_show_output_loads_back_as_the_same_settings(tmp_path: Path) -> None:
    result = cli("config", "show", "--config", str(DETECTOR_YAML))
    assert result.returncode == 0, result.stderr
    shown = write(tmp_path, result.stdout)
    assert load_settings(shown, environ={}) == load_settings(None, environ={})


# --- (b) environment overrides ---------------------------------------------------------------


def test_env_overrides_the_yaml() -> None:
    environ = {"STREAM_DETECTOR_KAFKA__BOOTSTRAP_SERVERS": "10.0.0.1:9092", "STREAM_DETECTOR_METRICS__PORT": "9200"}
    settings = load_settings(DETECTOR_YAML, environ=environ)
    defaults = load_settings(None, environ={})
    assert settings.kafka.bootstrap_servers == "10.0.0.1:9092"
    assert settings.metrics.port == 9200
    # Nothing else moved.
    assert settings.kafka.model_copy(update={"bootstrap_servers": defaults.kafka.bootstrap_servers}) == defaults.kafka
    assert settings.metrics.model_copy(update={"port": defaults.metrics.port}) == defaults.metrics
    assert settings.model_copy(update={"kafka": defaults.kafka, "metrics": defaults.metrics}) == defaults


def test_env_beats_yaml_and_merges_with_the_rest_of_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka:\n  group_id: from-yaml\n  bootstrap_servers: yaml:9092\nmetrics:\n  port: 9300\n")
    settings = load_settings(path, environ={"STREAM_DETECTOR_KAFKA__BOOTSTRAP_SERVERS": "env:9092"})
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.kafka.group_id == "from-yaml"
    assert settings.metrics.port == 9300


def test_env_names_are_case_insensitive_and_other_variables_are_ignored() -> None:
    settings = load_settings(None, environ={"stream_detector_metrics__port": "9201", "PATH": "/bin", "KAFKA_HOME": "/x"})
    assert settings.metrics.port == 9201


def test_env_complex_values_are_json() -> None:
    environ = {
        "STREAM_DETECTOR_KAFKA__CLIENT_CONFIG": '{"security.protocol": "SASL_SSL"}',
        "STREAM_DETECTOR_AUTOENCODER__HIDDEN": "[8, 2]",
    }
    settings = load_settings(None, environ=environ)
    assert settings.kafka.client_config == {"security.protocol": "SASL_SSL"}
    assert settings.autoencoder.hidden == [8, 2]


def test_env_sasl_password_reaches_librdkafka_but_not_config_show() -> None:
    settings = load_settings(None, environ={"STREAM_DETECTOR_KAFKA__SASL_PASSWORD": "hunter2"})
    assert librdkafka_config(settings, "consumer")["sasl.password"] == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in yaml.safe_dump(masked_dump(settings))


def test_env_overrides_the_schema_section() -> None:
    settings = load_settings(None, environ={"STREAM_DETECTOR_SCHEMA__KEY_FIELDS": '["store_id", "register_id"]'})
    assert settings.schema.key_fields == ["store_id", "register_id"]


def test_unprefixed_schema_variable_is_ignored() -> None:
    assert load_settings(None, environ={"SCHEMA__KEY_FIELDS": '["x"]'}) == load_settings(None, environ={})


# --- (c) unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ("kafka:\n  bogus: 1\n", "kafka.bogus"),
        ("bogus:\n  x: 1\n", "bogus"),
        ("metrics:\n  prot: 9108\n", "metrics.prot"),
        ("zscore:\n  key_sets:\n    - fields: [store_id]\n      features: [log_amount]\n      bogus: 1\n", "zscore.key_sets.0.bogus"),
    ],
)
def test_unknown_yaml_key_is_rejected_naming_the_dotted_key(tmp_path: Path, text: str, dotted: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert f"{dotted}: unknown key" in message
    assert str(path) in message


# --- (d) bad values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ("metrics:\n  port: abc\n", "metrics.port"),
        ("metrics:\n  port: 70000\n", "metrics.port"),
        ("kafka:\n  bootstrap_servers: no-port\n", "kafka.bootstrap_servers"),
        ("kafka:\n  auto_offset_reset: newest\n", "kafka.auto_offset_reset"),
        ("processing:\n  batch_size: 0\n", "processing.batch_size"),
        ("schema:\n  feature_fields: [quantity]\n", "schema.feature_fields"),
        ("river:\n  model: NoSuchModel\n", "river.model"),
        ("autoencoder:\n  device: tpu\n", "autoencoder.device"),
        ("river:\n  features: [log_amount, bogus_feature]\n", "river.features"),
        ("kafka: 5\n", "kafka"),
    ],
)
def test_bad_yaml_value_names_the_key(tmp_path: Path, text: str, dotted: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert re.search(rf"^  {re.escape(dotted)}: ", str(info.value), re.MULTILINE), str(info.value)


def test_cross_field_check_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "scoring:\n  calibration_window: 1000\n  calibration_min_events: 5000\n")
    with pytest.raises(ConfigError, match="calibration_min_events must not exceed calibration_window"):
        load_settings(path, environ={})


STORE_KEY_SET = "zscore:\n  key_sets:\n    - {{fields: [store_id], features: [log_amount], moves_with: [{}]}}\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (STORE_KEY_SET.format("product_id"), r"zscore\.key_sets\.0: .*moves_with names \['product_id'\]"),
        (STORE_KEY_SET.format("store_id"), r"zscore\.key_sets\.0: .*leave out at least one"),
        ("zscore:\n  level_shift:\n    gradual:\n      key_sets: [customer]\n", r"zscore: .*gradual\.key_sets names \['customer'\]"),
        ("zscore:\n  level_shift:\n    gradual:\n      cap: 0.5\n      slack: 1.0\n", r"zscore\.level_shift\.gradual: .*cap \(0\.5\) must be above slack"),
        ("zscore:\n  level_shift:\n    adapt_clip_z: 0\n", r"zscore\.level_shift\.adapt_clip_z: .*greater than 0"),
    ],
)
def test_level_shift_settings_are_checked_with_the_key_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(write(tmp_path, text), environ={})


def test_gradual_shifts_default_to_the_store_key_set_only_where_it_exists(tmp_path: Path) -> None:
    """The default names store_id; a configuration without that key set is valid and watches none."""
    from stream_detector.scoring.factory import build_pipeline

    text = "zscore:\n  key_sets:\n    - {fields: [product_id], features: [log_unit_price]}\nautoencoder:\n  enabled: false\n"
    pipeline = build_pipeline(load_settings(write(tmp_path, text), environ={}))
    assert pipeline.level_shifts is not None and pipeline.level_shifts.gradual == ()
    default = build_pipeline(load_settings(None, environ={})).level_shifts
    assert default is not None and default.gradual == ("store_id",)


def test_config_windows_are_validated_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("alerts:\n  windows:\n    - name: sale\n      start: 2026-11-27\n      end: 2026-11-20\n")
    with pytest.raises(ConfigError, match=r"alerts\.windows\.0.*must be after start"):
        load_settings(path, environ={})
    path.write_text("alerts:\n  windows:\n    - {name: a, start: 2026-11-27, end: 2026-11-28}\n    - {name: a, start: 2026-11-27, end: 2026-11-28}\n")
    with pytest.raises(ConfigError, match="repeated"):
        load_settings(path, environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("kafka: [\n", "not valid YAML"), ("- a\n- b\n", "mapping of sections")],
)
def test_malformed_yaml_is_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, text), environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), environ={}) == load_settings(None, environ={})


def test_non_string_top_level_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "1: 2\n"), environ={})


# --- (e) environment errors ------------------------------------------------------------------


def test_unknown_env_section_is_rejected_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"STREAM_DETECTOR_BOGUS__X": "1"})
    assert "STREAM_DETECTOR_BOGUS__X" in str(info.value)


def test_unknown_env_key_is_rejected_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={"STREAM_DETECTOR_KAFKA__BOGUS": "1"})
    message = str(info.value)
    assert "kafka.bogus: unknown key" in message
    assert "STREAM_DETECTOR_KAFKA__BOGUS" in message


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(DETECTOR_YAML, environ={"STREAM_DETECTOR_METRICS__PORT": "abc"})
    message = str(info.value)
    assert "metrics.port" in message
    assert "STREAM_DETECTOR_METRICS__PORT" in message


def test_loading_leaves_os_environ_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_DETECTOR_METRICS__PORT", "9555")
    before = dict(os.environ)
    assert load_settings(None, environ={}).metrics.port == 9108
    assert load_settings(None).metrics.port == 9555  # environ=None reads os.environ
    assert dict(os.environ) == before


# --- (f) the CLI exits 2 on a bad config -----------------------------------------------------


@pytest.fixture
def bad_yaml(tmp_path: Path) -> Path:
    return write(tmp_path, "kafka:\n  bogus: 1\n", "BAD.yaml")


def test_cli_config_validate_exits_2_naming_the_key(bad_yaml: Path) -> None:
    result = cli("config", "validate", str(bad_yaml))
    assert result.returncode == 2
    assert "kafka.bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_run_exits_2_on_a_bad_config(bad_yaml: Path) -> None:
    result = cli("run", "--config", str(bad_yaml))
    assert result.returncode == 2
    assert "kafka.bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = cli("config", "validate", str(write(tmp_path, "metrics:\n  port: abc\n", "BAD.yaml")))
    assert result.returncode == 2
    assert "metrics.port" in result.stderr


@pytest.mark.parametrize("params, problem", [("bogus: 3", "bogus"), ("window_size: 0", "window_size")])
def test_cli_validate_builds_the_detectors_and_names_free_form_river_params(tmp_path: Path, params: str, problem: str) -> None:
    # river.params goes to the model unchecked by the settings models: validate builds the
    # pipeline, so a name the model does not take or a value it refuses still exits 2.
    result = cli("config", "validate", str(write(tmp_path, f"river:\n  params:\n    {params}\n", "BAD.yaml")))
    assert result.returncode == 2
    assert "river.params" in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bad_env_exits_2_naming_the_variable() -> None:
    result = cli("config", "show", env={"STREAM_DETECTOR_METRICS__PORT": "abc"})
    assert result.returncode == 2
    assert "STREAM_DETECTOR_METRICS__PORT" in result.stderr


# --- (g) config show masks secrets -----------------------------------------------------------

SECRET_YAML = """\
kafka:
  client_config:
    sasl.password: hunter2
    ssl.key.password: x
    security.protocol: SASL_SSL
    sasl.username: detector
  consumer_config:
    sasl.password: hunter2
  sasl_password: hunter2
"""


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    result = cli("config", "show", "--config", str(write(tmp_path, SECRET_YAML)))
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    shown = yaml.safe_load(result.stdout)["kafka"]
    assert shown["client_config"] == {
        "sasl.password": MASK,
        "ssl.key.password": MASK,
        "security.protocol": "SASL_SSL",
        "sasl.username": "detector",
    }
    assert shown["consumer_config"] == {"sasl.password": MASK}
    assert shown["sasl_password"] == MASK


def test_masked_dump_keeps_the_real_values_for_librdkafka(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SECRET_YAML), environ={})
    assert "hunter2" not in yaml.safe_dump(masked_dump(settings))
    conf = librdkafka_config(settings, "consumer")
    assert conf["sasl.password"] == "hunter2"
    assert conf["ssl.key.password"] == "x"
    # masked_dump copies; the settings themselves are untouched.
    assert settings.kafka.client_config["sasl.password"] == "hunter2"
