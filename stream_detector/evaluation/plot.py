"""The ``evaluate --plot`` figure. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stream_detector.evaluation.formatting import fmt
from stream_detector.evaluation.report import EvaluationReport

_KIND_STYLE = {
    "price_spike": ("tab:red", "^"),
    "quantity_burst": ("tab:orange", "s"),
    "decimal_error": ("tab:purple", "D"),
    "refund_burst": ("tab:blue", "v"),
    "duplicate": ("tab:green", "o"),
}
_Y_CAP = 12.5


def plot_report(report: EvaluationReport, path: str | Path, title: str = "") -> Path:
    """Fused score over event time with labelled anomalies by kind and the threshold, and a
    panel of per-kind recall. Saved as PNG with the Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if report.series is None:
        raise ValueError("the report has no per-event series (evaluate(..., keep_series=False))")
    s = report.series
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(14, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1.3])

    # -log10(1 - fused): 1 - fused is the Bonferroni-adjusted tail probability, so the axis
    # reads "1 in 10^y"; the tick labels show the fused score itself.
    y = np.clip(-np.log10(np.clip(1.0 - s.fused, 1e-300, 1.0)), 0.0, _Y_CAP)
    x = s.event_time.astype("datetime64[s]") if s.event_time.size else s.event_time
    normal = s.kind_code == 0
    top.scatter(x[normal], y[normal], s=1, c="0.6", alpha=0.5, linewidths=0, rasterized=True, label="normal event")
    fp = normal & s.flagged
    if fp.any():
        top.scatter(x[fp], y[fp], s=14, c="black", marker="x", linewidths=0.8, label=f"flagged normal event ({int(fp.sum()):,})")
    for code, kind in enumerate(s.kinds, start=1):
        mine = s.kind_code == code
        if not mine.any():
            continue
        color, marker = _KIND_STYLE.get(kind, ("tab:brown", "P"))
        top.scatter(x[mine], y[mine], s=16, c=color, marker=marker, alpha=0.8, linewidths=0, label=f"{kind} ({int(mine.sum()):,})")
    for i, m in enumerate(m for w in report.windows.values() for m in w.matches):
        top.axvspan(
            np.datetime64(int(m.window.start), "s"),
            np.datetime64(int(m.window.end), "s"),
            color="tab:cyan",
            alpha=0.15,
            linewidth=0,
            label="store_stopped window" if i == 0 else None,
        )
    if report.skip_warmup and s.position.size:
        cut = s.position >= report.skip_warmup
        if cut.any():
            top.axvline(x[np.argmax(cut)], color="0.3", linestyle=":", label=f"end of warm-up ({report.skip_warmup:,} records)")
    threshold_y = -math.log10(1.0 - report.threshold)
    top.axhline(threshold_y, color="red", linestyle="--", linewidth=1, label=f"threshold {report.threshold}")
    ticks = list(range(0, 13, 2))
    top.set_yticks(ticks, ["0"] + [f"$1-10^{{-{t}}}$" for t in ticks[1:]])
    top.set_ylim(-0.2, _Y_CAP + 0.3)
    top.set_ylabel("fused score (log scale of 1 − score)")
    top.set_xlabel("event time (UTC)")
    top.set_title(title or f"fused score of {report.records:,} events")
    top.legend(loc="upper left", fontsize=8, markerscale=1.5, ncol=2, framealpha=0.9)
    top.grid(alpha=0.3)

    names = [k.kind for k in report.kinds.values()] + [w.kind for w in report.windows.values()]
    recalls = [k.recall for k in report.kinds.values()] + [w.recall for w in report.windows.values()]
    counts = [k.labelled for k in report.kinds.values()] + [w.windows for w in report.windows.values()]
    colors = [_KIND_STYLE.get(n, ("tab:cyan", ""))[0] for n in names]
    bars = bottom.bar(names, [r or 0.0 for r in recalls], color=colors)
    for bar, r, n, name in zip(bars, recalls, counts, names, strict=True):
        text = f"{fmt(r, 2)} (n={n:,})"
        if name in report.windows and report.windows[name].note:
            text += "\nno collective alerts"
        bottom.annotate(
            text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points"
        )
    bottom.set_ylim(0, 1.25)
    bottom.set_ylabel("recall")
    bottom.set_title(
        f"recall by kind; all point kinds: precision {fmt(report.precision)}, recall {fmt(report.recall)}, "
        f"F1 {fmt(report.f1)}, false-positive rate {fmt(report.false_positive_rate, 5)}",
        fontsize=10,
    )
    bottom.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=110)
    return path
