"""evaluation.plot: the --plot figure is a PNG."""

from __future__ import annotations

from stream_detector.evaluation import evaluate, plot_report
from stream_detector.events.decode import EventSchema
from tests.unit.evaluation.tiny_case import ThresholdPipeline, store_stopped_windows, tiny_events, tiny_labels


def test_plot_is_a_png(tmp_path):
    report = evaluate(tiny_events(), tiny_labels(store_stopped_windows()), ThresholdPipeline(), EventSchema(), batch_size=4, skip_warmup=2)
    path = plot_report(report, tmp_path / "plots" / "eval.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
