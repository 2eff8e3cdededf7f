"""stream_detector.evaluation: metrics on a hand-made case, window matching, the plot, the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest

from stream_detector.config import load_settings
from stream_detector.errors import ConfigError
from stream_detector.evaluation import (
    CollectiveAlert,
    Labels,
    Progress,
    WindowLabel,
    evaluate,
    format_report,
    generated_events,
    load_dataset,
    match_windows,
    plot_report,
    roc_auc,
)
from stream_detector.events.decode import EventSchema
from stream_detector.features import FeatureBatch
from stream_detector.runtime.replay import replay
from stream_detector.scoring.factory import build_pipeline, event_schema
from stream_detector.scoring.pipeline import BatchResult
from tests.paths import REPO_ROOT

T0 = 1_767_571_200.0  # 2026-01-05T00:00:00Z


class ThresholdPipeline:
    """A stand-in pipeline: fused score = min(amount / 1000, 1), flagged above 0.1 (amount > 100)."""

    detector_names = ["amount"]
    threshold = 0.1

    def __init__(self) -> None:
        self.batches: list[int] = []

    def process(self, batch: FeatureBatch) -> BatchResult:
        self.batches.append(batch.n)
        fused = np.minimum(batch.column("amount") / 1000.0, 1.0)
        return BatchResult(
            fused=fused,
            is_anomaly=fused > self.threshold,
            probability={"amount": 1.0 - fused},
            raw={"amount": fused},
            threshold=self.threshold,
        )


def _event(i: int, amount: float, store: str = "s-1") -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "timestamp": int((T0 + 60 * i) * 1000), "amount": amount, "store_id": store})


# e0..e9; labelled: e1, e2 price_spike, e5, e6 refund_burst, e7 duplicate.
# Flagged (amount > 100): e1, e3, e5, e6, e9.  An invalid record sits between e4 and e5.
AMOUNTS = [10, 500, 20, 300, 5, 150, 200, 30, 40, 900]
POINT_LABELS = {"e1": "price_spike", "e2": "price_spike", "e5": "refund_burst", "e6": "refund_burst", "e7": "duplicate"}


def _tiny_events() -> list[bytes]:
    events = [_event(i, a) for i, a in enumerate(AMOUNTS)]
    events.insert(5, b"{not json")
    return events


def _tiny_labels(windows: list[WindowLabel] | None = None) -> Labels:
    return Labels(points=dict(POINT_LABELS), windows=list(windows or []))


def test_metrics_on_a_hand_made_case():
    pipeline = ThresholdPipeline()
    report = evaluate(_tiny_events(), _tiny_labels(), pipeline, EventSchema(), batch_size=3)
    assert pipeline.batches == [3, 2, 3, 2]  # 11 records in batches of 3; the invalid 6th is dropped
    assert (report.records, report.invalid, report.counted) == (11, 1, 10)
    assert (report.labelled, report.normal) == (5, 5)
    assert (report.tp, report.fp, report.fn, report.tn) == (3, 2, 2, 3)
    assert report.precision == pytest.approx(0.6)
    assert report.recall == pytest.approx(0.6)
    assert report.f1 == pytest.approx(0.6)
    assert report.false_positive_rate == pytest.approx(0.4)

    ps, rb, dup = report.kinds["price_spike"], report.kinds["refund_burst"], report.kinds["duplicate"]
    # price_spike against normal events: TP 1 (e1), FP 2 (e3, e9).
    assert (ps.labelled, ps.flagged) == (2, 1)
    assert ps.precision == pytest.approx(1 / 3)
    assert ps.recall == pytest.approx(0.5)
    assert ps.f1 == pytest.approx(0.4)
    # Each event of a refund burst is matched on its own event id.
    assert (rb.labelled, rb.flagged, rb.recall) == (2, 2, 1.0)
    assert rb.precision == pytest.approx(0.5)
    assert rb.f1 == pytest.approx(2 / 3)
    assert (dup.labelled, dup.flagged, dup.precision, dup.recall, dup.f1) == (1, 0, 0.0, 0.0, 0.0)
    assert report.kinds["quantity_burst"].labelled == 0 and report.kinds["quantity_burst"].recall is None
    # AUC of the fused score (amount / 1000): positives 500, 20, 150, 200, 30 vs 10, 300, 5, 40, 900.
    pos, neg = [500, 20, 150, 200, 30], [10, 300, 5, 40, 900]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert report.auc == pytest.approx(expected)
    assert report.detectors["amount"]["fired_normal"] == 2
    assert report.detectors["amount"]["recall"]["refund_burst"] == 1.0
    assert report.labels_not_seen == 0


def test_skip_warmup_counts_records_from_position_n():
    # Skip the first 4 records (e0..e3): counted e4, invalid, e5..e9.
    report = evaluate(_tiny_events(), _tiny_labels(), ThresholdPipeline(), EventSchema(), batch_size=4, skip_warmup=4)
    assert (report.counted, report.invalid) == (6, 1)
    # Counted: e4 (normal), e5, e6 (rb, flagged), e7 (dup), e8 (normal), e9 (normal, flagged).
    assert (report.tp, report.fp, report.fn, report.tn) == (2, 1, 1, 2)
    assert report.kinds["price_spike"].labelled == 0


def test_labels_never_seen_are_reported():
    labels = _tiny_labels()
    labels.points["e-missing"] = "price_spike"
    report = evaluate(_tiny_events(), labels, ThresholdPipeline(), EventSchema(), batch_size=100)
    assert report.labels_not_seen == 1
    assert report.kinds["price_spike"].labelled == 2
    assert any("never appeared" in note for note in report.notes)


def test_roc_auc_exact_values():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_match_windows_key_interval_and_grace():
    windows = [WindowLabel("store_stopped", "s-1", 1000.0, 2000.0), WindowLabel("store_stopped", "s-2", 5000.0, 6000.0)]
    alerts = [
        CollectiveAlert("s-1", 2500.0),  # after the end, within 15 min: detected, 1500 s after the start
        CollectiveAlert("s-1", 2800.0),  # a second alert for the same window
        CollectiveAlert("s-2", 4000.0),  # before its window
        CollectiveAlert("s-2", 6901.0),  # 901 s after the end: too late
        CollectiveAlert("s-3", 1500.0),  # another store
        CollectiveAlert("s-2", 5500.0, kind="other_kind"),  # another kind of window
    ]
    matches, unmatched = match_windows(windows, alerts, grace_s=900.0)
    assert [m.detected for m in matches] == [True, False]
    assert matches[0].first_alert == 2500.0 and matches[0].delay_s == 1500.0
    assert matches[1].delay_s is None
    assert sorted((a.key, a.event_time) for a in unmatched) == [("s-2", 4000.0), ("s-2", 5500.0), ("s-2", 6901.0), ("s-3", 1500.0)]


def _windows() -> list[WindowLabel]:
    return [
        WindowLabel("store_stopped", "s-1", T0 + 60, T0 + 120),
        WindowLabel("store_stopped", "s-2", T0 + 180, T0 + 240),
    ]


def test_evaluate_consumes_collective_alerts():
    calls = []

    def alerts_fn(decoded, result):
        calls.append(decoded.features.n)
        if len(calls) == 1:  # a timer detector fires while some batch is processed
            return [CollectiveAlert("s-1", T0 + 150), ("s-9", T0 + 100)]
        return []

    report = evaluate(_tiny_events(), _tiny_labels(_windows()), ThresholdPipeline(), EventSchema(), batch_size=5, collective_alerts_fn=alerts_fn)
    assert calls == [5, 4, 1]
    w = report.windows["store_stopped"]
    assert (w.windows, w.detected, w.recall) == (2, 1, 0.5)
    assert w.delay_median_s == pytest.approx(90.0) and w.delay_max_s == pytest.approx(90.0)
    assert w.note is None
    assert (report.collective_alerts, report.collective_false_alarms) == (2, 1)


def test_without_collective_alerts_store_stopped_recall_is_zero_with_a_note():
    report = evaluate(_tiny_events(), _tiny_labels(_windows()), ThresholdPipeline(), EventSchema(), batch_size=5)
    w = report.windows["store_stopped"]
    assert (w.windows, w.detected, w.recall) == (2, 0, 0.0)
    assert w.note and "no collective alerts" in w.note
    table = format_report(report)
    assert "store_stopped" in table and "no collective alerts" in table


def test_skip_warmup_drops_windows_that_start_before_the_first_counted_event():
    # Counted from record 3 (e3 at T0 + 180): the s-1 window (T0 + 60) is out, s-2 (T0 + 180) in.
    report = evaluate(_tiny_events(), _tiny_labels(_windows()), ThresholdPipeline(), EventSchema(), batch_size=5, skip_warmup=3)
    assert report.windows["store_stopped"].windows == 1


def test_labels_load_reads_generate_output(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_bytes(
        b'{"kind":"price_spike","event_id":"e-0-1"}\n'
        b"\n"
        b'{"kind":"store_stopped","store_id":"s-022","start":"2026-01-05T11:08:00.000Z","end":"2026-01-05T13:42:00.000Z"}\n'
    )
    labels = Labels.load(path)
    assert labels.points == {"e-0-1": "price_spike"}
    (window,) = labels.windows
    assert (window.kind, window.key, window.end - window.start) == ("store_stopped", "s-022", 154 * 60.0)
    path.write_bytes(b'{"kind":"store_stopped","store_id":"s-1"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        Labels.load(path)


def test_evaluate_agrees_with_replay_on_the_real_pipeline():
    """evaluate() and replay run the same pipeline: the same events are flagged."""
    settings = load_settings(environ={})
    labels = Labels()
    events = list(generated_events(4000, seed=2, anomaly_rate=0.02, labels=labels))
    report = evaluate(events, labels, build_pipeline(settings), event_schema(settings), settings.processing.batch_size)
    out = io.BytesIO()
    replay(settings, io.BytesIO(b"\n".join(events) + b"\n"), out)
    replayed = np.array([orjson.loads(line)["is_anomaly"] for line in out.getvalue().splitlines()])
    assert report.series is not None
    assert np.array_equal(report.series.flagged, replayed)
    assert report.tp + report.fp == int(replayed.sum()) > 0
    assert report.labelled == len(labels.points)


def test_plot_is_a_png(tmp_path):
    report = evaluate(_tiny_events(), _tiny_labels(_windows()), ThresholdPipeline(), EventSchema(), batch_size=4, skip_warmup=2)
    path = plot_report(report, tmp_path / "plots" / "eval.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_progress_prints_at_most_every_interval():
    stream = io.StringIO()
    progress = Progress("evaluate", total=100, stream=stream, interval=0.05)
    progress(10)  # too soon after the start
    time.sleep(0.06)
    progress(50)
    progress(60)  # too soon after the last line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "50/100 events (50.0 %)" in lines[0] and "events/s" in lines[0]


def test_datasets_ship_with_river():
    shuttle = load_dataset("shuttle")
    assert shuttle.X.shape == (49_097, 9)
    assert shuttle.y is not None and int(shuttle.y.sum()) == 3_511
    water = load_dataset("waterflow")
    assert water.X.shape == (1_268, 1)
    assert water.y is None  # no anomaly labels in WaterFlow


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_DETECTOR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "stream_detector", *args], cwd=REPO_ROOT, env=env, capture_output=True, timeout=timeout)


def test_cli_evaluate_generate_prints_the_table(tmp_path):
    started = time.monotonic()
    proc = _cli("evaluate", "--generate", "5000", "--seed", "1", "--json", str(tmp_path / "report.json"))
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
    events.write_bytes(_event(0, 1.0) + b"\n")
    labels.write_bytes(b'{"kind": "price_spike", "event_id": "e0"}\n')
    assert _cli("evaluate", "--events", str(events)).returncode == 2  # no --labels
    assert _cli("evaluate", "--generate", "10", "--events", str(events)).returncode == 2
    assert _cli("evaluate", "--events", str(tmp_path / "missing.jsonl"), "--labels", str(labels)).returncode == 2
    assert _cli("evaluate", "--events", str(events), "--labels", str(events)).returncode == 2  # not labels
    proc = _cli("evaluate", "--events", str(events), "--labels", str(labels))
    assert proc.returncode == 0, proc.stderr.decode()
    assert "price_spike" in proc.stdout.decode()
    assert _cli("evaluate", "--generate", "10", "--skip-warmup", "-1").returncode == 2
