"""evaluation.run: metrics on a hand-made case, skip-warmup, collective alerts, and agreement
with replay on the real pipeline."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

from stream_detector.config import load_settings
from stream_detector.evaluation import CollectiveAlert, Labels, evaluate, format_report, generated_events
from stream_detector.events.decode import EventSchema
from stream_detector.runtime.replay import replay
from stream_detector.scoring.factory import build_pipeline, event_schema
from tests.unit.evaluation.tiny_case import AMOUNTS, T0, ThresholdPipeline, event, store_stopped_windows, tiny_events, tiny_labels


def test_metrics_on_a_hand_made_case():
    pipeline = ThresholdPipeline()
    report = evaluate(tiny_events(), tiny_labels(), pipeline, EventSchema(), batch_size=3)
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
    # Ranking: one detector, so the surprise is -log10(1 - fused) (tiny_case: p = 1 - fused), and
    # ranks like the fused score; the five alerts (500, 300, 150, 200, 900) share no value.
    ranking = report.ranking
    assert ranking is not None and ranking.surprise_auc == pytest.approx(expected)
    assert (ranking.alerts, ranking.top_score_alerts, ranking.top_surprise_alerts) == (5, 1, 1)
    # True alerts 500, 150, 200 against false 300, 900: 1 of 6 pairs (500 > 300), by either.
    assert ranking.alert_score_auc == pytest.approx(1 / 6) and ranking.alert_surprise_auc == pytest.approx(1 / 6)
    assert report.to_dict()["ranking"] == ranking.to_dict()
    lines = format_report(report).splitlines()
    assert (
        f"ranking: surprise AUC {expected:.3f} (point anomalies against all other events); true against false alerts: AUC 0.167 by score, 0.167 by surprise"
    ) in lines
    assert "of 5 alerts, at most 1 (20 %) share one score, 1 (20 %) one surprise" in lines


def test_skip_warmup_counts_records_from_position_n():
    # Skip the first 4 records (e0..e3): counted e4, invalid, e5..e9.
    report = evaluate(tiny_events(), tiny_labels(), ThresholdPipeline(), EventSchema(), batch_size=4, skip_warmup=4)
    assert (report.counted, report.invalid) == (6, 1)
    # Counted: e4 (normal), e5, e6 (rb, flagged), e7 (dup), e8 (normal), e9 (normal, flagged).
    assert (report.tp, report.fp, report.fn, report.tn) == (2, 1, 1, 2)
    assert report.kinds["price_spike"].labelled == 0


def test_labels_never_seen_are_reported():
    labels = tiny_labels()
    labels.points["e-missing"] = "price_spike"
    report = evaluate(tiny_events(), labels, ThresholdPipeline(), EventSchema(), batch_size=100)
    assert report.labels_not_seen == 1
    assert report.kinds["price_spike"].labelled == 2
    assert any("never appeared" in note for note in report.notes)


def test_evaluate_consumes_collective_alerts():
    calls = []

    def alerts_fn(decoded, result):
        calls.append(decoded.features.n)
        if len(calls) == 1:  # a timer detector fires while some batch is processed
            return [CollectiveAlert("s-1", T0 + 150), ("s-9", T0 + 100)]
        return []

    report = evaluate(tiny_events(), tiny_labels(store_stopped_windows()), ThresholdPipeline(), EventSchema(), batch_size=5, collective_alerts_fn=alerts_fn)
    assert calls == [5, 4, 1]
    w = report.windows["store_stopped"]
    assert (w.windows, w.detected, w.recall) == (2, 1, 0.5)
    assert w.delay_median_s == pytest.approx(90.0) and w.delay_max_s == pytest.approx(90.0)
    assert w.note is None
    assert (report.collective_alerts, report.collective_false_alarms) == (2, 1)


def test_without_collective_alerts_store_stopped_recall_is_zero_with_a_note():
    report = evaluate(tiny_events(), tiny_labels(store_stopped_windows()), ThresholdPipeline(), EventSchema(), batch_size=5)
    w = report.windows["store_stopped"]
    assert (w.windows, w.detected, w.recall) == (2, 0, 0.0)
    assert w.note and "no collective alerts" in w.note
    table = format_report(report)
    assert "store_stopped" in table and "no collective alerts" in table


def test_skip_warmup_drops_windows_that_start_before_the_first_counted_event():
    # Counted from record 3 (e3 at T0 + 180): the s-1 window (T0 + 60) is out, s-2 (T0 + 180) in.
    report = evaluate(tiny_events(), tiny_labels(store_stopped_windows()), ThresholdPipeline(), EventSchema(), batch_size=5, skip_warmup=3)
    assert report.windows["store_stopped"].windows == 1


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


def _drift_case() -> tuple[list[bytes], Labels]:
    """Store s-1 as in the tiny case; store s-2 sells at 50 for 10 events, then changes (from
    minute 20 on) for 70 events, of which the threshold pipeline flags the first 5 (amount
    500, then it sells at 50 again) and one more later (event 60 of the change)."""
    from stream_detector.evaluation import ChangeLabel

    events = [event(i, a) for i, a in enumerate(AMOUNTS)]
    amounts = [50.0] * 10 + [500.0] * 5 + [50.0] * 55 + [500.0] + [50.0] * 9
    events += [event(10 + i, a, store="s-2") for i, a in enumerate(amounts)]
    labels = tiny_labels()
    labels.points["e23"] = "price_spike"  # a point label on the changed key, after the change
    labels.changes.append(ChangeLabel("level_shift", "store_id", "s-2", T0 + 60 * 20, "store_format", "amount", 10.0))
    return events, labels


def test_changes_are_measured_per_change_and_left_out_of_the_point_metrics():
    events, labels = _drift_case()
    report = evaluate(events, labels, ThresholdPipeline(), EventSchema(), batch_size=7)
    # The point metrics are those of s-1's ten events and s-2's ten before the change.
    assert (report.counted, report.labelled, report.normal) == (20, 5, 15)
    assert (report.tp, report.fp, report.fn, report.tn) == (3, 2, 2, 13)
    changes = report.changes
    assert changes is not None and (changes.changed_events, changes.changed_labelled, changes.normal_run) == (70, 1, 50)
    (stats,) = changes.changes
    assert (stats.events, stats.alerts, stats.normal_after, stats.last_alert, stats.labelled) == (70, 6, 5, 60, 1)
    assert (changes.alerts_median, changes.alerts_max, changes.never_normal) == (6.0, 6, 0)
    assert (stats.labelled_alerts, changes.cost_median, changes.cost_max) == (1, 5.0, 5)  # e23 is an anomaly found
    text = format_report(report)
    assert "lasting changes (labelled as change points, not anomalies; their keys' 70 events" in text
    assert "store_format x10" in text and "store_id=s-2" in text
    assert (
        "changes: 1; alerts per change median 6, max 6 (not on injected point anomalies: median 5, max 5); "
        "normal again within 50 events: 1 of 1; never normal again: 0 (0 %)"
    ) in text
    as_dict = report.to_dict()["changes"]
    assert as_dict["changes"][0]["normal_after"] == 5 and as_dict["changes"][0]["start"] == "2026-01-05T00:20:00.000Z"


def test_a_change_never_normal_again_and_skip_warmup():
    events, labels = _drift_case()
    events += [event(90 + i, 500.0, store="s-2") for i in range(30)]  # s-2 alerts again to the end
    report = evaluate(events, labels, ThresholdPipeline(), EventSchema(), batch_size=4, skip_warmup=60)
    # Counted from record 60 (event e60): the change's events 40..99, its alerts 60 and 70..99.
    (stats,) = report.changes.changes
    assert (stats.events, stats.alerts, stats.normal_after, stats.last_alert) == (60, 31, None, 59)
    assert "never" in format_report(report)


def test_without_change_labels_the_report_has_no_change_section():
    report = evaluate(tiny_events(), tiny_labels(), ThresholdPipeline(), EventSchema(), batch_size=3)
    assert report.changes is None
    assert "lasting changes" not in format_report(report)
    assert "changes" not in report.to_dict()


def test_generated_drift_labels_come_before_the_changed_events():
    labels = Labels()
    known_when_seen = []
    for raw in generated_events(3_000, seed=4, anomaly_rate=0.01, labels=labels, drift_at=1_000):
        record = orjson.loads(raw)
        if record["store_id"] == "s-024":  # the new store opens with the drift
            known_when_seen.append(len(labels.changes))
    assert known_when_seen and set(known_when_seen) == {6}
    assert [c.scenario for c in labels.changes] == ["price_change"] * 3 + ["new_store", "new_product", "store_format"]
