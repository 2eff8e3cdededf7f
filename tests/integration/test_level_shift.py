"""A lasting change through the daemon: exactly one level_shift record, then the new level."""

from __future__ import annotations

import signal

import orjson

from tests.daemon_helpers import DaemonProcess, generate_labelled, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

N_EVENTS = 8_000
CHANGE_AT = 5_000
FACTOR = 30  # the store's baskets from CHANGE_AT on: 30 times the items, at the same prices


def test_a_lasting_change_is_published_once(kafka_bootstrap, make_topics, tmp_path):
    input_topic = make_topics(partitions=1, prefix="sales")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    events, _labels, _windows = generate_labelled(N_EVENTS, seed=13, anomaly_rate=0.0)
    store = max({e["store_id"] for e in events}, key=[e["store_id"] for e in events].count)
    for event in events[CHANGE_AT:]:
        if event["store_id"] == store:
            event["quantity"] *= FACTOR
            event["amount"] = round(event["amount"] * FACTOR, 2)
    produce_all(kafka_bootstrap, input_topic, ((e["store_id"].encode(), orjson.dumps(e)) for e in events))

    # The z-score and the tracker need no calibration: the population models stay off to start fast.
    config = write_config(
        tmp_path / "detector.yaml",
        kafka_bootstrap,
        input_topic,
        output_topic,
        dlq_topic,
        unique_name("detector"),
        river={"enabled": False},
        autoencoder={"enabled": False},
        scoring={"calibration_min_events": 500},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, 'stream_detector_events_total{outcome="scored"}') >= N_EVENTS, timeout=60, what=f"{N_EVENTS} scored events")
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log_tail()

    records = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, output_topic, idle=2.0)]
    shifts = [r for r in records if r.get("kind") == "level_shift"]
    assert len(shifts) == 1, shifts
    shift = shifts[0]
    assert shift["key"] == store and shift["key_set"] == "store_id" and shift["event"] is None
    assert shift["event_id"].startswith("level_shift:store_id:") and shift["events_since"] == 8
    assert shift["new_level"] > 10 * shift["old_level"] > 0
    assert shift["began"] >= events[CHANGE_AT]["timestamp"][:19]
    # After it, the store's new baskets are its normal: almost none alerts.
    order = {e["event_id"]: i for i, e in enumerate(events)}
    changed = [e for e in events[CHANGE_AT:] if e["store_id"] == store]
    declared = order[shift["declared_at_event"]]
    later = [r for r in records if r.get("kind") is None and r["key"] == store and order[r["event_id"]] > declared]
    assert len(later) <= 0.05 * len(changed), len(later)
