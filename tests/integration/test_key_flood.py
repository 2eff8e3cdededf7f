"""A flood of new keys (issue 19, point 4): state bounded in bytes, checkpoints that write only
what changed, and a restart that restores every key from those partial writes.

Before: 300,000 events with new 200-character store, product and customer ids took the daemon
from 392 to 1,775 MiB, and every checkpoint re-wrote the partition's whole state (1.9 s each).
Here, with ``state.max_bytes`` at 24 MiB: 2,000 ordinary sales, then 16,000 sales each with
three new 200-character ids, then 200 ordinary sales again.
"""

from __future__ import annotations

import random
import signal
import string
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.daemon_helpers import DaemonProcess, committed_offsets, generate_labelled, metric, wait_until, write_config
from tests.kafka_helpers import produce_all, unique_name

# The flood's keys would take about 35 MB: the budget is passed several times over. The fixed
# part of each snapshot (the half-space trees, the calibrators: about 0.7 MB here) is small
# next to a full write of the keys.
BUDGET = 24 * 1024 * 1024
NORMAL, FLOOD, AFTER = 2_000, 16_000, 200
SCORED = 'stream_detector_events_total{outcome="scored"}'
KEY_SETS = ("store_id", "product_id+currency", "customer_id")
SECTIONS = {
    "processing": {"commit_interval_ms": 300, "batch_size": 500},
    "state": {"max_bytes": BUDGET},
    "autoencoder": {"enabled": False},  # no torch import: faster starts
}


def _streams() -> tuple[list[bytes], list[bytes], list[bytes]]:
    events, _labels, _windows = generate_labelled(NORMAL + FLOOD + 2 * AFTER, seed=11)
    rng = random.Random(11)

    def new_id() -> str:
        return "".join(rng.choices(string.ascii_letters, k=200))

    normal = [orjson.dumps(e) for e in events[:NORMAL]]
    flood = [orjson.dumps({**e, "store_id": new_id(), "product_id": new_id(), "customer_id": new_id()}) for e in events[NORMAL : NORMAL + FLOOD]]
    after = [orjson.dumps(e) for e in events[NORMAL + FLOOD :]]
    return normal, flood, after


def _settled(daemon: DaemonProcess, scored: int, checkpointed: Callable[[], int], end: int) -> dict[str, float]:
    """Metrics once ``scored`` events are scored and the input is checkpointed up to
    ``end``, with fresh state gauges."""
    daemon.wait_for(lambda m: metric(m, SCORED) >= scored, 90, f"{scored} events scored")
    wait_until(lambda: checkpointed() >= end, 30, f"the offsets committed up to {end}")
    time.sleep(1.2)  # the state gauges are refreshed at most once a second
    return daemon.metrics()


def _keys(m: dict[str, float]) -> dict[str, float]:
    return {ks: metric(m, f'stream_detector_keys{{key_set="{ks}"}}') for ks in KEY_SETS}


def test_a_key_flood_stays_within_the_budget_and_checkpoints_write_what_changed(kafka_bootstrap, make_topics, tmp_path: Path):
    input_topic = make_topics(partitions=1, prefix="flood")[0]
    output_topic, dlq_topic = make_topics(partitions=1, n=2, prefix="out")
    group = unique_name("g")
    config = write_config(tmp_path / "detector.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, group, **SECTIONS)
    normal, flood, after = _streams()

    def checkpointed() -> int:
        return committed_offsets(kafka_bootstrap, group, input_topic, 1)[0]

    daemon = DaemonProcess(config, tmp_path / "first.log").start()
    try:
        produce_all(kafka_bootstrap, input_topic, ((None, v) for v in normal + flood))
        flooded = _settled(daemon, NORMAL + FLOOD, checkpointed, NORMAL + FLOOD)
        produce_all(kafka_bootstrap, input_topic, ((None, v) for v in after[:AFTER]))
        calm = _settled(daemon, NORMAL + FLOOD + AFTER, checkpointed, NORMAL + FLOOD + AFTER)
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()

    # Bounded in bytes: the flood's keys were forgotten, the estimate stayed within the budget.
    assert 0 < metric(flooded, "stream_detector_state_bytes") <= BUDGET
    assert metric(flooded, "stream_detector_state_keys_forgotten_total") > 0
    assert 0 < metric(calm, "stream_detector_state_bytes") <= BUDGET

    # A restart restores every key from the shards the checkpoints wrote; its first checkpoint
    # writes the whole state once (a new line of checkpoints), which sizes a full write.
    restarted = DaemonProcess(config, tmp_path / "second.log").start()
    try:
        restarted.wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") == 1, 60, "the restore")
        time.sleep(1.2)
        assert _keys(restarted.metrics()) == _keys(calm)
        produce_all(kafka_bootstrap, input_topic, ((None, v) for v in after[AFTER:]))
        full = _settled(restarted, AFTER, checkpointed, NORMAL + FLOOD + 2 * AFTER)
    finally:
        assert restarted.stop(signal.SIGTERM) == 0, restarted.log_tail()
    assert metric(full, 'stream_detector_state_restore_failures_total{reason="incomplete"}') == 0
    assert sum(metric(full, f'stream_detector_state_restore_failures_total{{reason="{r}"}}') for r in ("corrupt", "incompatible")) == 0

    # After the flood, the ordinary sales change a few keys: their checkpoints write a small
    # part of what a full write of the same state takes (before: all of it, every time).
    calm_bytes = metric(calm, "stream_detector_changelog_bytes_total") - metric(flooded, "stream_detector_changelog_bytes_total")
    calm_commits = metric(calm, 'stream_detector_commits_total{result="ok"}') - metric(flooded, 'stream_detector_commits_total{result="ok"}')
    full_write = metric(full, "stream_detector_changelog_bytes_total")  # the restarted daemon's first checkpoint(s)
    full_commits = metric(full, 'stream_detector_commits_total{result="ok"}')
    assert calm_commits >= 1 and full_commits >= 1
    per_calm, per_full = calm_bytes / calm_commits, full_write / full_commits
    assert per_calm < per_full / 4, (per_calm, per_full)
