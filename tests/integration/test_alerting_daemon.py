"""Alert windows and analysts' feedback through the real daemon and a real broker.

One input partition (one pipeline). After a generated warm-up, crafted decimal errors (amount
x 100) go to stores in and out of windows; feedback marks one as a false positive, and the
same pattern for the same store is then suppressed, also after a restart.
"""

from __future__ import annotations

import signal
from datetime import datetime, timedelta

import orjson
import pytest

from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

pytestmark = pytest.mark.integration

N_WARMUP = 6_000


def _probe(template: dict, event_id: str, at: datetime, factor: float = 100.0) -> dict:
    """A copy of a normal sale with its amount keyed in wrong (a decimal error)."""
    return {**template, "event_id": event_id, "timestamp": at.isoformat().replace("+00:00", "Z"), "amount": round(template["amount"] * factor, 2)}


def _scored(n: int):
    return lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= n


def test_windows_and_feedback_decide_what_is_published(kafka_bootstrap, make_topics, tmp_path):
    input_topic, output_topic, dlq_topic, control_topic, feedback_topic = make_topics(partitions=1, n=5, prefix="alerting")
    group = unique_name("detector")
    events, _labels, _windows = generate_labelled(N_WARMUP, seed=11, anomaly_rate=0.0)
    last = {}
    for e in events:
        last[e["store_id"]] = e
    stores = sorted(last)[:4]  # s-000 ... s-003
    t_end = datetime.fromisoformat(events[-1]["timestamp"].replace("Z", "+00:00"))
    window = {"start": (t_end - timedelta(minutes=1)).isoformat(), "end": (t_end + timedelta(days=1)).isoformat()}

    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        group,
        alerts={
            "control_topic": control_topic,
            "feedback_topic": feedback_topic,
            "windows": [{"name": "closed-for-stocktake", "action": "suppress", "scope": {"store_id": [stores[1]]}, **window}],
        },
    )
    # A promotion announced on the control topic before the daemon starts: annotate only.
    produce_all(
        kafka_bootstrap,
        control_topic,
        [(b"promo", orjson.dumps({"name": "promo", "action": "annotate", "scope": {"store_id": [stores[2]]}, "note": "doorbusters", **window}))],
    )
    produce_all(kafka_bootstrap, control_topic, [(b"junk", b"{not json")])

    at = lambda seconds: t_end + timedelta(seconds=seconds)  # noqa: E731
    first = [
        _probe(last[stores[0]], "probe-marked", at(1)),
        _probe(last[stores[1]], "probe-in-window", at(2)),
        _probe(last[stores[2]], "probe-annotated", at(3)),
    ]
    produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in [*events, *first]))

    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(_scored(N_WARMUP + 3), timeout=120, what="warm-up and first probes scored")
        out = {r["event_id"]: r for r in (orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=2.0))}
        assert "probe-marked" in out, "a decimal error out of every window is published"
        assert "probe-in-window" not in out, "suppressed by the configured window"
        assert out["probe-annotated"]["annotations"] == [{"window": "promo", "action": "annotate", "note": "doorbusters"}]
        assert out["probe-marked"]["warm"] is True

        produce_all(
            kafka_bootstrap, feedback_topic, [(b"probe-marked", orjson.dumps({"event_id": "probe-marked", "label": "false_positive", "note": "bulk order"}))]
        )
        produce_all(kafka_bootstrap, feedback_topic, [(b"x", orjson.dumps({"label": "false_positive"}))])  # no event_id
        # Both records, which the daemon may read in different polls: wait for the two outcomes.
        m = daemon.wait_for(
            lambda m: (
                metric(m, 'stream_detector_feedback_total{label="false_positive",outcome="applied"}') == 1
                and metric(m, 'stream_detector_feedback_total{label="unknown",outcome="invalid"}') >= 1
            ),
            timeout=30,
            what="feedback applied and the invalid record counted",
        )
        assert metric(m, 'stream_detector_feedback_total{label="unknown",outcome="invalid"}') == 1
        assert metric(m, 'stream_detector_control_records_total{outcome="added"}') == 1
        assert metric(m, 'stream_detector_control_records_total{outcome="not_json"}') == 1
        assert metric(m, 'stream_detector_alert_windows{state="known"}') == 2
        assert metric(m, "stream_detector_feedback_rules") == 1

        second = [_probe(last[stores[0]], "probe-same-pattern", at(20)), _probe(last[stores[3]], "probe-other-store", at(21))]
        produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in second))
        m = daemon.wait_for(_scored(N_WARMUP + 5), timeout=30, what="second probes scored")
        assert metric(m, 'stream_detector_alerts_suppressed_total{reason="window"}') >= 1
        assert metric(m, 'stream_detector_alerts_suppressed_total{reason="feedback"}') >= 1
        assert metric(m, "stream_detector_alerts_annotated_total") >= 1
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()

    # The rule survives a restart (partition state snapshot; the feedback topic is re-read too).
    produce_all(kafka_bootstrap, input_topic, [(stores[0].encode(), orjson.dumps(_probe(last[stores[0]], "probe-after-restart", at(40))))])
    daemon = DaemonProcess(config, tmp_path / "daemon2.log").start()
    try:
        m = daemon.wait_for(_scored(1), timeout=60, what="the probe after the restart scored")
        assert metric(m, 'stream_detector_alerts_suppressed_total{reason="feedback"}') == 1
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()

    out = {r["event_id"]: r for r in (orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=2.0))}
    assert "probe-other-store" in out, "feedback is per key: another store still alerts"
    assert "probe-same-pattern" not in out and "probe-after-restart" not in out
    assert "probe-in-window" not in out
