"""The command line end to end (subprocess): replay, generate, evaluate, run with a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.paths import REPO_ROOT
from tests.unit.evaluation.tiny_case import event


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "stream_detector", *args], cwd=REPO_ROOT, env=env, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gen")
    events, labels = d / "events.jsonl", d / "labels.jsonl"
    proc = cli("generate", "--count", "300", "--seed", "5", "--anomaly-rate", "0.05", "--output", str(events), "--labels", str(labels))
    assert proc.returncode == 0, proc.stderr.decode()
    return events, labels


def test_replay_one_line_out_per_line_in(generated, tmp_path):
    events, _ = generated
    lines = events.read_bytes().splitlines()
    assert len(lines) == 300
    malformed = {
        10: b"{not json",
        50: b"",  # blank line
        120: b'{"event_id": "x", "amount": "12"}',
        200: b"[1, 2, 3]",
        250: b"\xff\xfe",
    }
    for pos in sorted(malformed):
        lines.insert(pos, malformed[pos])
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dst = tmp_path / "out" / "scored.jsonl"
    proc = cli("replay", "--input", str(src), "--output", str(dst))
    assert proc.returncode == 0, proc.stderr.decode()
    out = [orjson.loads(line) for line in dst.read_bytes().splitlines()]
    assert len(out) == len(lines)
    for number, (raw, line) in enumerate(zip(lines, out, strict=True), start=1):
        if number - 1 in malformed:
            assert set(line) == {"line", "error"}, line
            assert line["line"] == number
            assert isinstance(line["error"], str) and line["error"]
            continue
        event = orjson.loads(raw)
        assert set(line) == {"event_id", "key", "score", "surprise", "is_anomaly", "detectors"}, line
        assert line["event_id"] == event["event_id"]
        assert line["key"] == event["store_id"]
        assert 0.0 <= line["score"] <= 1.0
        assert isinstance(line["is_anomaly"], bool)
        assert set(line["detectors"]) == {"zscore", "duplicates", "hst", "autoencoder"}
        for v in line["detectors"].values():
            assert 0.0 <= v <= 1.0
    assert out[50]["error"].startswith("invalid_json")
    assert out[120]["error"].split(":")[0] in ("wrong_type", "missing_field")


def test_replay_stdin_stdout():
    src = b'{"event_id":"a","timestamp":"2026-01-05T10:00:00.000Z","store_id":"s","amount":3.5}\n\nnope\n'
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "stream_detector", "replay"], cwd=REPO_ROOT, env=env, input=src, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [sorted(o) for o in out] == [
        ["detectors", "event_id", "is_anomaly", "key", "score", "surprise"],
        ["error", "line"],
        ["error", "line"],
    ]
    assert [o.get("line") for o in out] == [None, 2, 3]


def test_generate_to_stdout():
    proc = cli("generate", "--count", "50", "--seed", "1", "--output", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.splitlines()
    assert len(lines) == 50
    events = [orjson.loads(line) for line in lines]
    assert all(isinstance(e, dict) and e["event_id"] and "amount" in e and "timestamp" in e for e in events)
    assert len({e["event_id"] for e in events}) == 50
    # Deterministic.
    assert cli("generate", "--count", "50", "--seed", "1", "--output", "-").stdout == proc.stdout


def test_generate_writes_labels(generated):
    events, labels = generated
    ids = {orjson.loads(line)["event_id"] for line in events.read_bytes().splitlines()}
    rows = [orjson.loads(line) for line in labels.read_bytes().splitlines()]
    assert rows, "5 % anomalies over 300 events should give labels"
    for row in rows:
        assert "kind" in row
        if row["kind"] != "store_stopped":
            assert row["event_id"] in ids


def test_run_with_invalid_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n  nope: {\n")
    proc = cli("run", "--config", str(bad), timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr.decode())
    assert b"YAML" in proc.stderr or b"yaml" in proc.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("scoring:\n  threshold: 5\n")
    proc = cli("run", "--config", str(unknown), timeout=60)
    assert proc.returncode == 2
    assert b"scoring.threshold" in proc.stderr


def test_cli_evaluate_generate_prints_the_table(tmp_path):
    started = time.monotonic()
    proc = cli("evaluate", "--generate", "5000", "--seed", "1", "--json", str(tmp_path / "report.json"), timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for text in ("precision", "recall", "F1", "false-positive rate", "all point kinds", "price_spike", "duplicate", "store_stopped", "no collective alerts"):
        assert text in out, out
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["records"] == 5000
    assert set(report["kinds"]) >= {"price_spike", "quantity_burst", "decimal_error", "refund_burst", "duplicate"}
    assert report["windows"]["store_stopped"]["recall"] in (0.0, None)
    assert elapsed < 30, f"evaluate --generate 5000 took {elapsed:.1f} s"


def test_cli_evaluate_usage_errors(tmp_path):
    events, labels = tmp_path / "events.jsonl", tmp_path / "labels.jsonl"
    events.write_bytes(event(0, 1.0) + b"\n")
    labels.write_bytes(b'{"kind": "price_spike", "event_id": "e0"}\n')
    assert cli("evaluate", "--events", str(events)).returncode == 2  # no --labels
    assert cli("evaluate", "--generate", "10", "--events", str(events)).returncode == 2
    assert cli("evaluate", "--events", str(tmp_path / "missing.jsonl"), "--labels", str(labels)).returncode == 2
    assert cli("evaluate", "--events", str(events), "--labels", str(events)).returncode == 2  # not labels
    proc = cli("evaluate", "--events", str(events), "--labels", str(labels))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "price_spike" in proc.stdout.decode()
    assert cli("evaluate", "--generate", "10", "--skip-warmup", "-1").returncode == 2
    assert b"--instances and --restart-every go with --partitions" in cli("evaluate", "--generate", "10", "--instances", "2").stderr
    assert b"some would own none" in cli("evaluate", "--generate", "10", "--partitions", "2", "--instances", "3").stderr


def test_cli_evaluate_as_a_deployment(tmp_path):
    proc = cli("evaluate", "--generate", "3000", "--seed", "1", "--partitions", "4", "--instances", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "scored as 4 partitions over 2 instances, windows of 250 records, calibration shared" in out and "all point kinds" in out


def test_generate_drift_writes_change_labels(tmp_path):
    events, labels = tmp_path / "events.jsonl", tmp_path / "labels.jsonl"
    proc = cli("generate", "--count", "2000", "--seed", "3", "--drift", "--output", str(events), "--labels", str(labels))
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [orjson.loads(line) for line in labels.read_bytes().splitlines()]
    changes = [r for r in rows if r["kind"] == "level_shift"]
    assert [c["scenario"] for c in changes] == ["price_change"] * 3 + ["new_store", "new_product", "store_format"]
    lines = events.read_bytes().splitlines()
    assert len(lines) == 2000 and orjson.loads(lines[1000])["timestamp"] == changes[0]["start"]  # --drift: from the middle
    plain = cli("generate", "--count", "2000", "--seed", "3", "--output", "-").stdout.splitlines()
    assert plain[:1000] == lines[:1000] and plain != lines
    assert cli("generate", "--count", "10", "--drift-at", "-1", "--output", "-").returncode == 2


def test_cli_evaluate_drift_prints_the_change_table(tmp_path):
    proc = cli("evaluate", "--generate", "4000", "--seed", "2", "--drift-at", "2500", "--json", str(tmp_path / "report.json"), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for text in ("drift from event 2,500", "lasting changes (labelled as change points, not anomalies", "new_store x30", "all point kinds", "changes: 6;"):
        assert text in out, out
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert len(report["changes"]["changes"]) == 6 and report["changes"]["normal_run"] == 50
    events, labels = tmp_path / "events.jsonl", tmp_path / "labels.jsonl"
    events.write_bytes(event(0, 1.0) + b"\n")
    labels.write_bytes(b'{"kind": "price_spike", "event_id": "e0"}\n')
    proc = cli("evaluate", "--events", str(events), "--labels", str(labels), "--drift")
    assert proc.returncode == 2 and b"--drift" in proc.stderr
