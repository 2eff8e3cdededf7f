"""``ArrayHistogram`` (whole arrays into a histogram) against client_python's own ``Histogram``
fed value by value, and the series a fresh ``Metrics`` exposes before anything happened."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from stream_detector.alerting.feedback import LABELS as FEEDBACK_LABELS
from stream_detector.alerting.windows import ControlError, WindowBook
from stream_detector.events.decode import REASONS
from stream_detector.metrics import (
    CONTROL_OUTCOMES,
    FEEDBACK_OUTCOMES,
    POPULATION_OUTCOMES,
    SCORE_BUCKETS,
    ArrayHistogram,
    Metrics,
)


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    """{family name: (type, help, {(sample name, sorted labels): value})} of the exposition,
    without the ``_created`` samples (client_python adds them, ``ArrayHistogram`` does not)."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name.endswith("_created"):  # the text format puts them in a gauge of their own
            continue
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples if not s.name.endswith("_created")}
        out[family.name] = (family.type, family.documentation, samples)
    return out


def _assert_same_exposition(reference: CollectorRegistry, ours: CollectorRegistry) -> None:
    expected, got = _families(reference), _families(ours)
    assert got.keys() == expected.keys()
    for name, (kind, documentation, samples) in expected.items():
        assert got[name][:2] == (kind, documentation), name
        assert got[name][2].keys() == samples.keys(), name
        for key, value in samples.items():
            if key[0].endswith("_sum"):  # one float sum per batch against one per value
                assert got[name][2][key] == pytest.approx(value, rel=1e-9), key
            else:
                assert got[name][2][key] == value, key


def _values(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.r_[rng.random(2000), 1 - 10.0 ** -rng.uniform(1, 7, 500), list(SCORE_BUCKETS), [0.0, 1.0, 2.0, -1.0, np.nan]]


@pytest.mark.parametrize("labelled", [False, True])
def test_array_histogram_equals_a_histogram_fed_value_by_value(labelled: bool) -> None:
    reference, ours = CollectorRegistry(), CollectorRegistry()
    labelnames = ["detector"] if labelled else []
    expected = Histogram("s", "help text", labelnames, buckets=SCORE_BUCKETS, registry=reference)
    histogram = ArrayHistogram("s", "help text", labelnames, SCORE_BUCKETS, ours)
    series = ["zscore", "fused"] if labelled else [None]
    for seed, name in enumerate(series):
        labels = [name] if name is not None else []
        values = _values(seed)
        child = expected.labels(*labels) if labels else expected
        for v in values:
            if not np.isnan(v):  # NaN carries no score: left out
                child.observe(float(v))
        got = histogram.labels(*labels)
        for chunk in np.array_split(values, 7):  # several batches, an empty one too
            got.observe_many(chunk)
        got.observe_many(np.array([]))
    _assert_same_exposition(reference, ours)


def test_a_declared_series_is_exposed_at_zero_like_a_histogram_child() -> None:
    reference, ours = CollectorRegistry(), CollectorRegistry()
    Histogram("s", "help text", ["detector"], buckets=SCORE_BUCKETS, registry=reference).labels("hst")
    ArrayHistogram("s", "help text", ["detector"], SCORE_BUCKETS, ours).labels("hst")
    _assert_same_exposition(reference, ours)


def test_the_score_histogram_keeps_its_name_labels_buckets_and_help() -> None:
    """What the dashboard and the alert rules query: the ``Histogram`` it replaced, as it was declared."""
    reference = CollectorRegistry()
    before = Histogram(
        "stream_detector_score", "Calibrated scores (1 - tail probability), per detector and fused.", ["detector"], buckets=SCORE_BUCKETS, registry=reference
    )
    metrics = Metrics()
    values = _values(3)
    for name in ("zscore", "fused"):
        for v in values[~np.isnan(values)]:
            before.labels(name).observe(float(v))
        metrics.score.labels(name).observe_many(values)
    expected = _families(reference)["stream_detector_score"]
    assert _families(metrics.registry)["stream_detector_score"][:2] == expected[:2]
    assert _families(metrics.registry)["stream_detector_score"][2].keys() == expected[2].keys()


def test_array_histogram_checks_labels_and_refuses_a_second_metric_of_its_name() -> None:
    registry = CollectorRegistry()
    histogram = ArrayHistogram("s", "help", ["detector"], SCORE_BUCKETS, registry)
    with pytest.raises(ValueError, match="label value"):
        histogram.labels()
    with pytest.raises(DuplicateTimeseries):
        Histogram("s", "help", ["detector"], registry=registry)
    with pytest.raises(ValueError, match="sorted"):
        ArrayHistogram("t", "help", [], (1.0, 0.5), CollectorRegistry())


# --- closed label sets ----------------------------------------------------------------------


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples
    }


def test_a_fresh_metrics_exposes_every_closed_label_set_at_zero() -> None:
    samples = _samples(Metrics())
    expected = [
        *(("stream_detector_dlq_total", (("reason", reason),)) for reason in REASONS),
        *(("stream_detector_events_total", (("outcome", outcome),)) for outcome in ("scored", "invalid")),
        ("stream_detector_commits_total", (("result", "ok"),)),
        *(("stream_detector_alerts_suppressed_total", (("reason", reason),)) for reason in ("window", "feedback")),
        *(("stream_detector_control_records_total", (("outcome", outcome),)) for outcome in CONTROL_OUTCOMES),
        *(
            ("stream_detector_feedback_total", (("label", label), ("outcome", outcome)))
            for label, outcomes in FEEDBACK_OUTCOMES.items()
            for outcome in outcomes
        ),
        *(("stream_detector_alert_windows", (("state", state),)) for state in ("known", "active")),
        *(("stream_detector_population_records_total", (("outcome", outcome),)) for outcome in POPULATION_OUTCOMES),
    ]
    for key in expected:
        assert samples.get(key) == 0.0, key
    # the dead-letter series the dashboard's panel and the DeadLetterSpike rule read
    assert {labels[0][1] for name, labels in samples if name == "stream_detector_dlq_total"} == set(REASONS)


def test_the_closed_label_sets_cover_what_their_sources_give() -> None:
    assert set(FEEDBACK_OUTCOMES) == {*FEEDBACK_LABELS, "unknown"}
    book = WindowBook(max_seconds=7 * 86400)
    window = {"name": "promo", "start": "2026-11-27T00:00:00Z", "end": "2026-11-29T00:00:00Z"}
    outcomes = [
        book.apply_control(window),
        book.apply_control(window),
        book.apply_control({"action": "cancel", "name": "promo"}),
        book.apply_control({"action": "cancel", "name": "promo"}),
    ]
    for bad in (["promo"], {"action": "cancel"}, {**window, "end": "2026-11-26T00:00:00Z"}, {**window, "end": "2162-01-01T00:00:00Z"}):
        with pytest.raises(ControlError) as raised:
            book.apply_control(bad)
        outcomes.append(raised.value.reason)
    assert set(outcomes) | {"not_json"} == set(CONTROL_OUTCOMES)
