"""``stream-detector backtest`` on a real broker: offsets, timestamps, limits, nothing produced."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka.admin import AdminClient

from stream_detector.config import load_settings
from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.runtime.backtest import backtest
from stream_detector.runtime.replay import replay
from tests.daemon_helpers import DaemonProcess, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name
from tests.paths import REPO_ROOT

INVALID = [b"{not json", b'{"event_id": "x-1", "amount": 1.0}', b"[1, 2]"]  # invalid_json, missing_field, not_an_object


def _events(count: int, seed: int) -> list[dict]:
    return [event for event, _ in SalesGenerator(GeneratorConfig(seed=seed, anomaly_rate=0.02)).generate(count)]


def _config(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    path = tmp_path / "detector.yaml"
    config = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "input_topic": topic,
            # Names no test creates: a backtest must not create or write them.
            "output_topic": unique_name("never-out"),
            "dlq_topic": unique_name("never-dlq"),
        },
        "logging": {"format": "json"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _settings(path: Path):
    return load_settings(path, environ={})


def _anomalous_ids(records, decoded, result, into: list[str]) -> None:
    into.extend(decoded.features.event_ids[result.is_anomaly].tolist())


def test_from_offset_zero_scores_every_record_and_produces_nothing(kafka_bootstrap, make_topics, tmp_path):
    topic = make_topics(partitions=2, prefix="bt-sales")[0]
    events = _events(5000, seed=11)
    records = [(e["store_id"].encode(), orjson.dumps(e)) for e in events] + [(b"bad", v) for v in INVALID]
    produce_all(kafka_bootstrap, topic, records)
    settings = _settings(_config(tmp_path, kafka_bootstrap, topic))

    flagged: list[str] = []
    summary = backtest(settings, from_offset=0, on_batch=lambda *a: _anomalous_ids(*a, into=flagged))
    assert summary.records == len(records)
    assert summary.events == len(events)
    assert summary.invalid == len(INVALID)
    assert summary.invalid_by_reason == {"invalid_json": 1, "missing_field": 1, "not_an_object": 1}
    assert summary.anomalies == len(flagged) > 0
    assert set(summary.fired) == {"zscore", "duplicates", "hst", "autoencoder"}
    assert summary.fired["duplicates"] > 0  # the generator re-sends some sales
    assert summary.stopped_by == "end of range"
    assert sum(p.records for p in summary.partitions) == len(records)
    text = summary.format()
    assert "anomalies that would have been raised" in text and "nothing was produced" in text

    # Nothing was produced: the output and dead-letter topics were never created.
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert settings.kafka.output_topic not in topics
    assert settings.kafka.dlq_topic not in topics


def test_same_decisions_as_replay_on_one_partition(kafka_bootstrap, make_topics, tmp_path):
    """One partition keeps the order, and the pipeline does not depend on batch boundaries, so a
    backtest flags exactly what replay flags for the same records."""
    topic = make_topics(partitions=1, prefix="bt-order")[0]
    events = _events(4000, seed=12)
    values = [orjson.dumps(e) for e in events]
    produce_all(kafka_bootstrap, topic, ((None, v) for v in values))
    settings = _settings(_config(tmp_path, kafka_bootstrap, topic))

    flagged: list[str] = []
    summary = backtest(settings, from_offset=0, on_batch=lambda *a: _anomalous_ids(*a, into=flagged))
    out = io.BytesIO()
    replay(settings, io.BytesIO(b"\n".join(values) + b"\n"), out)
    replayed = [line["event_id"] for line in map(orjson.loads, out.getvalue().splitlines()) if line["is_anomaly"]]
    assert summary.events == len(events)
    assert flagged == replayed
    assert len(flagged) > 0


def test_raises_what_the_daemon_raises_over_several_partitions(kafka_bootstrap, make_topics, tmp_path):
    """The daemon keeps a pipeline per input partition; so does a backtest, which therefore
    flags the same events as a daemon that read the same topic from the start (one pipeline
    for all partitions, as before, flagged others: the models saw another mix of events)."""
    topic = make_topics(partitions=3, prefix="bt-daemon")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="bt-out")
    events = _events(4500, seed=15)
    produce_all(kafka_bootstrap, topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events))
    sections = {
        "scoring": {"calibration_window": 500, "calibration_min_events": 200, "calibration_refresh": 100},
        "autoencoder": {"enabled": False},  # no torch import: a faster start
    }
    config = write_config(tmp_path / "daemon.yaml", kafka_bootstrap, topic, output_topic, dlq_topic, unique_name("g"), **sections)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= len(events), 90, "every event scored")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    raised = {r["event_id"] for r in map(orjson.loads, (m.value() for m in read_all(kafka_bootstrap, output_topic, idle=2.0))) if r["event_id"]}

    flagged: list[str] = []
    backtest(_settings(config), from_offset=0, on_batch=lambda *a: _anomalous_ids(*a, into=flagged))
    assert len(raised) > 20
    assert set(flagged) == raised and len(flagged) == len(raised)


def test_offset_range_and_limit(kafka_bootstrap, make_topics, tmp_path):
    topic = make_topics(partitions=1, prefix="bt-range")[0]
    events = _events(1000, seed=13)
    produce_all(kafka_bootstrap, topic, ((None, orjson.dumps(e)) for e in events))
    settings = _settings(_config(tmp_path, kafka_bootstrap, topic))

    ids: list[str] = []
    summary = backtest(settings, from_offset=100, until_offset=350, on_batch=lambda r, d, res: ids.extend(d.features.event_ids.tolist()))
    assert summary.records == 250
    assert ids == [e["event_id"] for e in events[100:350]]
    (part,) = summary.partitions
    assert (part.first, part.last) == (100, 349)

    ids.clear()
    summary = backtest(settings, from_offset=900, limit=40, on_batch=lambda r, d, res: ids.extend(d.features.event_ids.tolist()))
    assert (summary.records, summary.stopped_by) == (40, "limit")
    assert ids == [e["event_id"] for e in events[900:940]]

    # Past the end: nothing to read, and it ends at once rather than waiting.
    started = time.monotonic()
    summary = backtest(settings, from_offset=10_000, idle_timeout_s=20)
    assert (summary.records, summary.stopped_by) == (0, "end of range")
    assert time.monotonic() - started < 15


def test_from_timestamp_starts_at_the_first_record_at_or_after_it(kafka_bootstrap, make_topics, tmp_path):
    topic = make_topics(partitions=2, prefix="bt-time")[0]
    events = _events(1200, seed=14)
    before, after = events[:700], events[700:]
    produce_all(kafka_bootstrap, topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in before))
    time.sleep(0.05)
    cut_ms = int(time.time() * 1000)
    time.sleep(0.05)
    produce_all(kafka_bootstrap, topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in after))
    settings = _settings(_config(tmp_path, kafka_bootstrap, topic))

    ids: list[str] = []
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cut_ms / 1000)) + f".{cut_ms % 1000:03d}Z"
    summary = backtest(settings, from_timestamp=iso, on_batch=lambda r, d, res: ids.extend(d.features.event_ids.tolist()))
    assert summary.records == len(after)
    assert sorted(ids) == sorted(e["event_id"] for e in after)

    # A time after every record: nothing to read.
    later = backtest(settings, from_timestamp=int(time.time() * 1000) + 60_000)
    assert later.records == 0


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "stream_detector", *args], cwd=REPO_ROOT, env=env, capture_output=True, timeout=timeout)


def test_cli_backtest(kafka_bootstrap, make_topics, tmp_path):
    topic = make_topics(partitions=1, prefix="bt-cli")[0]
    events = _events(3000, seed=15)
    produce_all(kafka_bootstrap, topic, ((None, orjson.dumps(e)) for e in events))
    config = _config(tmp_path, kafka_bootstrap, topic)

    proc = _cli("backtest", "--config", str(config), "--from-offset", "0", "--json", str(tmp_path / "summary.json"))
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "events scored: 3,000" in out
    assert "anomalies that would have been raised" in out
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["records"] == 3000 and summary["topic"] == topic

    both = _cli("backtest", "--config", str(config), "--from-offset", "0", "--from-timestamp", "2026-01-01T00:00:00Z")
    assert both.returncode == 2
    bad_time = _cli("backtest", "--config", str(config), "--from-timestamp", "yesterday")
    assert bad_time.returncode == 2 and b"ISO-8601" in bad_time.stderr


@pytest.mark.parametrize("kwargs", [{"from_offset": -1}, {"from_offset": 0, "limit": 0}, {}])
def test_bad_arguments_are_config_errors(kwargs, tmp_path):
    from stream_detector.errors import ConfigError

    settings = load_settings(environ={})
    with pytest.raises(ConfigError):
        backtest(settings, **kwargs)
