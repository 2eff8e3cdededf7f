"""One event dated years ahead must not move the detectors' clocks (issue 19, point 3).

3,000 generated sales (7.5 hours of 2026-01-05) with two otherwise ordinary copies of a sale in
the middle: one dated 2100 (an ISO string) and one 2199 (epoch milliseconds). Unguarded, the
first one moved the z-score TTL clock and the silence timer to 2100: every key but the
newest was forgotten (631 product keys -> 1) and every store "stopped". With the guard
(``processing.max_future_skew``) they are dead-lettered as ``future_timestamp``, or, with
``processing.future_timestamps: clamp``, scored at the partition's watermark.
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import orjson

from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

N_EVENTS = 3_000
FUTURE_ISO = "2100-01-01T00:00:00Z"
FUTURE_EPOCH_MS = 7_239_628_800_000  # 2199-06-01, still inside decode's 1990..2200 range


def _stream() -> tuple[list[dict], list[bytes]]:
    """The generated events and the raw stream with the two far-future copies inserted."""
    events, _labels, _windows = generate_labelled(N_EVENTS, seed=3)
    values = [orjson.dumps(e) for e in events]
    values.insert(3 * N_EVENTS // 4, orjson.dumps({**events[3 * N_EVENTS // 4], "event_id": "future-2199", "timestamp": FUTURE_EPOCH_MS}))
    values.insert(N_EVENTS // 2, orjson.dumps({**events[N_EVENTS // 2], "event_id": "future-2100", "timestamp": FUTURE_ISO}))
    return events, values


def _run(kafka_bootstrap, make_topics, tmp_path, **processing) -> tuple[dict[str, float], list[dict], list, list[dict], list[dict]]:
    """Run the daemon over the stream; (final metrics, output records, DLQ messages, events, log lines)."""
    input_topic = make_topics(partitions=1, prefix="future")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    events, values = _stream()
    produce_all(kafka_bootstrap, input_topic, ((None, v) for v in values))
    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, unique_name("g"), processing=processing)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(
            lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') + metric(m, 'stream_detector_events_total{outcome="invalid"}') >= len(values),
            timeout=90,
            what="every record handled",
        )
        time.sleep(1.5)  # the key gauges are refreshed at most once a second
        final = daemon.metrics()
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log_tail()
    records = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=2.0)]
    dead = read_all(kafka_bootstrap, dlq_topic, idle=2.0)
    log = [orjson.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    return final, records, dead, events, log


def _assert_models_intact(final: dict[str, float], records: list[dict], events: list[dict]) -> None:
    # Every key of the stream is still known: the TTL (7 days of event time) evicted nothing.
    stores = len({e["store_id"] for e in events})
    products = len({(e["product_id"], e["currency"]) for e in events})
    assert metric(final, 'stream_detector_keys{key_set="store_id"}') == stores
    assert metric(final, 'stream_detector_keys{key_set="product_id+currency"}') == products
    # No store stopped in these 7.5 hours, and none is reported as stopped.
    stopped = [r for r in records if r["event_id"] is None]
    assert stopped == [], [r["reasons"] for r in stopped][:3]


def test_far_future_events_are_dead_lettered_and_leave_the_models_alone(kafka_bootstrap, make_topics, tmp_path):
    final, records, dead, events, _log = _run(kafka_bootstrap, make_topics, tmp_path)

    assert metric(final, 'stream_detector_dlq_total{reason="future_timestamp"}') == 2
    assert metric(final, 'stream_detector_events_total{outcome="invalid"}') == 2
    assert metric(final, 'stream_detector_events_total{outcome="scored"}') == N_EVENTS
    assert len(dead) == 2
    for message in dead:
        headers = dict(message.headers())
        assert headers["dlq.reason"] == b"future_timestamp"
        detail = headers["dlq.detail"].decode()
        assert "processing.max_future_skew" in detail and "limit" in detail, detail
    assert sorted(orjson.loads(m.value())["event_id"] for m in dead) == ["future-2100", "future-2199"]
    _assert_models_intact(final, records, events)


def test_clamped_far_future_events_are_scored_without_moving_the_clock(kafka_bootstrap, make_topics, tmp_path):
    final, records, dead, events, log = _run(kafka_bootstrap, make_topics, tmp_path, future_timestamps="clamp")

    assert dead == []
    assert metric(final, 'stream_detector_dlq_total{reason="future_timestamp"}') == 0
    assert metric(final, 'stream_detector_events_total{outcome="scored"}') == N_EVENTS + 2
    assert metric(final, "stream_detector_event_time_clamped_total") == 2
    _assert_models_intact(final, records, events)
    clamped = [line for line in log if line.get("message", "").startswith("clamped event time")]
    assert [(line["message"][19:43], line["offset"]) for line in clamped] == [
        ("2100-01-01T00:00:00.000Z", N_EVENTS // 2),
        ("2199-06-01T00:00:00.000Z", 3 * N_EVENTS // 4 + 1),
    ], clamped
    # Every anomaly's time is the (clamped) event time, never years ahead.
    for record in records:
        assert record["timestamp"] < "2026-01-06", record["timestamp"]


def _sale(i: int, t: float) -> bytes:
    timestamp = datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return orjson.dumps({"event_id": f"w-{i}", "timestamp": timestamp, "store_id": f"s-{i % 5}", "amount": 10.0 + i % 7, "quantity": 1, "unit_price": 10.0})


def test_the_watermark_survives_a_restart(kafka_bootstrap, make_topics, tmp_path):
    """Events running ahead of the clock (each within the skew of the one before) move the
    watermark to 2 h 10 min ahead; after a restart (state restored from the changelog) an
    event 3 hours ahead is still within the watermark's reach, while one dated 2100 is not.
    Had the watermark been lost, the clock alone would refuse both."""
    input_topic = make_topics(partitions=1, prefix="wm")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, unique_name("g"))
    now = time.time()
    first = [_sale(i, now + 1800 + 10 * i) for i in range(600)]  # now + 30 min .. now + 2 h 10 min
    produce_all(kafka_bootstrap, input_topic, ((None, v) for v in first))
    daemon = DaemonProcess(config, tmp_path / "first.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= len(first), timeout=60, what="the first run scored")
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()

    produce_all(
        kafka_bootstrap, input_topic, [(None, _sale(600, now + 3 * 3600)), (None, orjson.dumps({"event_id": "x", "timestamp": FUTURE_ISO, "amount": 1.0}))]
    )
    daemon = DaemonProcess(config, tmp_path / "second.log").start()
    try:
        final = daemon.wait_for(
            lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') + metric(m, 'stream_detector_events_total{outcome="invalid"}') >= 2,
            timeout=60,
            what="the second run handled both",
        )
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()
    assert metric(final, 'stream_detector_events_total{outcome="scored"}') == 1, daemon.log_tail()
    assert metric(final, 'stream_detector_dlq_total{reason="future_timestamp"}') == 1
