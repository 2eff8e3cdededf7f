"""The text tables that ``stream-detector evaluate`` prints."""

from __future__ import annotations

import numpy as np

from stream_detector.evaluation.report import DOCSTRING_EVENTS, ChangeStats, ChangeSummary, DatasetReport, EvaluationReport, RankingStats
from stream_detector.events.event_time import iso_utc


def fmt(value: float | None, digits: int = 3) -> str:
    """A metric with ``digits`` decimals, or "-" when it is undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_delay(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def format_report(report: EvaluationReport, source: str = "") -> str:
    r = report
    lines = [
        f"evaluated {r.records:,} records{f' ({source})' if source else ''} in {r.seconds:.1f} s "
        f"({r.events_per_second:,.0f} events/s); batch size {r.batch_size}, threshold {r.threshold}",
        f"counted {r.counted:,} events (first {r.skip_warmup:,} records skipped as warm-up, {r.invalid:,} invalid): "
        f"{r.normal:,} normal, {r.labelled:,} point anomalies",
        "",
        f"{'kind':<18}{'labelled':>9}{'flagged':>9}{'precision':>11}{'recall':>8}{'F1':>8}{'AUC':>8}",
    ]
    for s in r.kinds.values():
        lines.append(f"{s.kind:<18}{s.labelled:>9,}{s.flagged:>9,}{fmt(s.precision):>11}{fmt(s.recall):>8}{fmt(s.f1):>8}{fmt(s.auc):>8}")
    lines.append(f"{'all point kinds':<18}{r.labelled:>9,}{r.tp:>9,}{fmt(r.precision):>11}{fmt(r.recall):>8}{fmt(r.f1):>8}{fmt(r.auc):>8}")
    lines.append(
        f"{'normal':<18}{r.normal:>9,}{r.fp:>9,}   false-positive rate {fmt(r.false_positive_rate, 5)} (TP {r.tp:,}, FP {r.fp:,}, FN {r.fn:,}, TN {r.tn:,})"
    )
    if r.ranking is not None:
        lines += ["", format_ranking(r.ranking)]
    if r.changes is not None:
        lines += ["", format_changes(r.changes)]
    lines += ["", f"level shift records: {r.level_shifts:,}, matching no change: {r.level_shifts_unmatched:,}"]
    lines += ["", f"{'collective kind':<18}{'windows':>9}{'detected':>9}{'recall':>8}{'delay median':>14}{'delay max':>12}"]
    for w in r.windows.values():
        lines.append(f"{w.kind:<18}{w.windows:>9,}{w.detected:>9,}{fmt(w.recall):>8}{_fmt_delay(w.delay_median_s):>14}{_fmt_delay(w.delay_max_s):>12}")
    lines.append(
        f"collective alerts: {r.collective_alerts:,}, matching no window: {r.collective_false_alarms:,} "
        f"(a window is detected by an alert for its key within [start, end + {r.window_grace_s / 60:.0f} min])"
    )
    if r.detectors:
        kinds = list(r.kinds)
        width = max(10, *(len(k) + 2 for k in kinds))
        lines += ["", "share of events on which each detector alone passes the threshold:"]
        lines.append(f"{'detector':<14}{'normal':>10}" + "".join(f"{k:>{width}}" for k in kinds))
        for name, d in r.detectors.items():
            lines.append(f"{name:<14}{fmt(d['false_positive_rate'], 5):>10}" + "".join(f"{fmt(d['recall'].get(k)):>{width}}" for k in kinds))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_changes(summary: ChangeSummary) -> str:
    """The per-change table: what each lasting change cost, and a summary line."""
    g = summary
    lines = [
        f"lasting changes (labelled as change points, not anomalies; their keys' {g.changed_events:,} events from the change on, "
        f"{g.changed_labelled:,} of them point-labelled, are left out of the point metrics above):",
        f"{'change':<22}{'key':<22}{'from':<19}{'events':>8}{'alerts':>8}{'labelled':>10}{'flagged':>9}"
        f"{'normal again after':>20}{'last alert':>12}{'shifts':>8}",
    ]
    for c in g.changes:
        lines.append(_change_line(c))
    normal = [c.normal_after for c in g.changes if c.normal_after is not None]
    within = sum(1 for n in normal if n <= g.normal_run)
    lines.append(
        f"changes: {len(g.changes)}; alerts per change median {_count(g.alerts_median)}, max {_count(g.alerts_max)} "
        f"(not on injected point anomalies: median {_count(g.cost_median)}, max {_count(g.cost_max)}); "
        f"normal again within {g.normal_run} events: {within} of {len(g.changes)}; never normal again: {g.never_normal} "
        f"({fmt(100 * g.never_normal / len(g.changes) if g.changes else None, 0)} %)"
    )
    lines.append(
        f"(normal again after n: the key's events since the change before the first {g.normal_run} in a row without an alert; "
        f"never: no such run to the end of the stream; labelled: alerts on point anomalies injected into the key; shifts: its level_shift records)"
    )
    return "\n".join(lines)


def _count(value: float | None) -> str:
    """A count, or a median of counts (which may end in .5), with thousands separators."""
    return "-" if value is None else f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _change_line(c: ChangeStats) -> str:
    change = c.change
    name = change.name + (f" x{change.factor:g}" if change.factor is not None else "")
    key = f"{change.key_set}={change.key}"
    share = f"{100 * c.alerts / c.events:.1f} %" if c.events else "-"
    normal = "never" if c.normal_after is None else f"{c.normal_after:,}"
    last = "-" if c.last_alert is None else f"{c.last_alert:,}"
    start = iso_utc(change.start)[:16] + "Z"
    return f"{name:<22}{key:<22}{start:<19}{c.events:>8,}{c.alerts:>8,}{c.labelled_alerts:>10,}{share:>9}{normal:>20}{last:>12}{c.shifts:>8,}"


def format_ranking(ranking: RankingStats) -> str:
    """Two lines on how the scores rank: the ROC AUCs of the surprise, and the alerts that share one score."""
    g = ranking

    def share(count: int) -> str:
        return f"{count:,} ({100 * count / g.alerts:.0f} %)" if g.alerts else "0"

    return (
        f"ranking: surprise AUC {fmt(g.surprise_auc)} (point anomalies against all other events); "
        f"true against false alerts: AUC {fmt(g.alert_score_auc)} by score, {fmt(g.alert_surprise_auc)} by surprise\n"
        f"of {g.alerts:,} alerts, at most {share(g.top_score_alerts)} share one score, {share(g.top_surprise_alerts)} one surprise"
    )


def format_dataset_report(report: DatasetReport) -> str:
    r = report
    head = f"{r.dataset}: {r.n:,} events, {len(r.features)} feature(s) ({', '.join(r.features)})"
    head += f", {r.anomalies:,} labelled anomalies" if r.anomalies is not None else ", no anomaly labels"
    lines = [head + f"; {r.seconds:.1f} s"]
    if r.anomalies is not None:
        first = f"first {min(DOCSTRING_EVENTS, r.n):,}"
        after = f"after {r.warmup:,}"
        lines += ["", f"{'ROC AUC':<48}{'all events':>12}{first:>14}{after:>13}"]
        for m in r.models:
            key = m.name.strip()
            lines.append(f"{m.name:<48}{fmt(r.auc_all[key], 4):>12}{fmt(r.auc_first[key], 4):>14}{fmt(r.auc_after_warmup[key], 4):>13}")
        if r.river_docstring_rolling_auc is not None:
            lines.append(
                f"River's docstring protocol (RollingROCAUC(window_size={DOCSTRING_EVENTS:,}) over the first "
                f"{DOCSTRING_EVENTS:,} events): {100 * r.river_docstring_rolling_auc:.2f}%"
            )
        lines.append(f"stream-detector at its threshold: {r.flagged:,} flagged, precision {fmt(r.precision)}, recall {fmt(r.recall)}")
        lines.append(
            f"(the fused score is 0 until calibration_min_events={r.warmup:,} scores were seen; 'after {r.warmup:,}' leaves those events out for every model)"
        )
    else:
        lines += ["", "ROC AUC: n/a (no labels)", f"stream-detector at its threshold: {r.flagged:,} flagged"]
        if r.event_time is not None:
            lines.append("highest-scored hours per model (for inspection only):")
            for m in r.models:
                if not m.scores.size or np.ptp(m.scores) == 0:
                    lines.append(f"  {m.name.strip():<46}every event scored {m.scores[0] if m.scores.size else 0:g}")
                    continue
                top = np.argsort(-m.scores, kind="stable")[:5]
                lines.append(f"  {m.name.strip():<46}" + ", ".join(iso_utc(r.event_time[i])[:13] + "h" for i in top))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
