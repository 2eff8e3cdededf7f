"""Control-topic windows through the real daemon and a real broker (issue 19, point 8).

Whoever can write the control topic must not be able to silence the detector for years, nor
silently: a window longer than ``alerts.max_window_seconds`` is refused (counted as too_long,
logged), and a window that starts suppressing alerts says so in the log, once, with its scope,
span and the control record it came from.

Only the duplicate detector runs (its probability needs no calibration), so the first repeat of
a sale is an anomaly at once.
"""

from __future__ import annotations

import orjson
import pytest

from tests.daemon_helpers import DaemonProcess, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

pytestmark = pytest.mark.integration


def _sale(event_id: str, store: str, second: int) -> dict:
    return {
        "event_id": event_id,
        "timestamp": f"2026-11-27T10:00:{second:02d}.000Z",
        "store_id": store,
        "product_id": "p-0001",
        "quantity": 1,
        "unit_price": 9.99,
        "amount": 9.99,
        "currency": "EUR",
        "channel": "store",
    }


def _log_lines(daemon: DaemonProcess) -> list[dict]:
    lines = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        try:
            lines.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            lines.append({"level": "raw", "message": line})
    return lines


def test_overlong_windows_are_refused_and_suppression_is_logged(kafka_bootstrap, make_topics, tmp_path):
    input_topic, output_topic, dlq_topic, control_topic = make_topics(partitions=1, n=4, prefix="control-limits")
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        unique_name("detector"),
        zscore={"enabled": False},
        river={"enabled": False},
        autoencoder={"enabled": False},
        silence={"enabled": False},
        alerts={"control_topic": control_topic},  # alerts.max_window_seconds: the default, 31 days
    )
    forever = {"name": "forever", "action": "suppress", "start": "2026-01-01T00:00:00Z", "end": "2162-01-01T00:00:00Z"}
    stocktake = {"name": "stocktake", "action": "suppress", "scope": {"store_id": ["s-001"]}, "start": "2026-11-27T00:00:00Z", "end": "2026-11-28T00:00:00Z"}
    produce_all(kafka_bootstrap, control_topic, [(b"forever", orjson.dumps(forever)), (b"stocktake", orjson.dumps(stocktake))])

    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        read = ('stream_detector_control_records_total{outcome="added"}', 'stream_detector_control_records_total{outcome="too_long"}')
        daemon.wait_for(
            lambda m: sum(metric(m, name) for name in read) >= 2,
            timeout=60,
            what="both control records read",
        )
        sales = [
            _sale("a-1", "s-000", 1),
            {**_sale("a-1", "s-000", 1), "event_id": "a-2"},  # a repeat out of every window: published
            _sale("b-1", "s-001", 2),
            {**_sale("b-1", "s-001", 2), "event_id": "b-2"},  # repeats in the stocktake window: suppressed
            {**_sale("b-1", "s-001", 2), "event_id": "b-3"},
        ]
        produce_all(kafka_bootstrap, input_topic, [(s["store_id"].encode(), orjson.dumps(s)) for s in sales])
        metrics = daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= len(sales), timeout=60, what="sales scored")
        published = {orjson.loads(m.value())["event_id"] for m in read_all(kafka_bootstrap, output_topic, idle=2.0)}
        metrics = daemon.metrics()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()

    assert metric(metrics, 'stream_detector_control_records_total{outcome="too_long"}') == 1
    assert metric(metrics, 'stream_detector_control_records_total{outcome="added"}') == 1
    assert published == {"a-2"}, "the 136-year window was refused, the stocktake window suppresses its store only"
    assert metric(metrics, 'stream_detector_alerts_suppressed_total{reason="window"}') == 2

    lines = _log_lines(daemon)
    assert not [line for line in lines if "Traceback" in line.get("message", "") or "exception" in line]
    refused = [line for line in lines if "forever" in line["message"]]
    assert len(refused) == 1 and refused[0]["level"] == "warning", refused
    assert "too_long" in refused[0]["message"] and "alerts.max_window_seconds" in refused[0]["message"]
    added = [line for line in lines if "'stocktake' added" in line["message"]]
    assert len(added) == 1 and "store_id in [s-001]" in added[0]["message"], added
    started = [line for line in lines if "started suppressing" in line["message"]]
    assert len(started) == 1, "logged once, not per suppressed alert"
    [line] = started
    assert line["level"] == "warning" and line["window"] == "stocktake"
    assert line["window_source"] == f"{control_topic}[0]@1"
    assert "event b-2" in line["message"] and "store_id in [s-001]" in line["message"]
    assert "2026-11-27T00:00:00+00:00 to 2026-11-28T00:00:00+00:00" in line["message"]
