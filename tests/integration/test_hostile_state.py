"""Hostile or unreadable state in the changelog topic, against the real daemon and broker.

Anyone who can write ``<group>-state`` chooses the bytes the daemon restores. Nothing in it may
run code (pickle is never read), and nothing in it may stop the daemon: a record or snapshot
that cannot be restored is counted (``stream_detector_state_restore_failures_total{reason}``),
logged with its partition, and what it held starts fresh while the rest keeps its state
(``state.on_unreadable: reset``, the default). A changed detector setting resets that detector.

One warm-up run (module fixture) leaves a snapshot at input offset ``WARM`` in a changelog
topic. Each test copies that changelog into a topic of its own, appends what it tries, and
starts the daemon as a new group on it: at-least-once restores the newest complete snapshot
whatever the group's offsets, so every test starts from the same learned state.
"""

from __future__ import annotations

import pickle
import signal
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from stream_detector.generator import GeneratorConfig, SalesGenerator
from stream_detector.runtime.topics import ensure_topics
from stream_detector.state.snapshot import Snapshot, SnapshotHeader, decode_snapshot, encode_snapshot, split_record
from tests.daemon_helpers import DaemonProcess, child_env, metric, write_config
from tests.kafka_helpers import produce_all, read_all, unique_name

WARM = 2_000  # events learned before the snapshot
MORE = 500  # events each test adds, to see the daemon score after its restore
SECTIONS = {
    "processing": {"batch_size": 500, "commit_interval_ms": 500},
    "scoring": {"calibration_window": 500, "calibration_min_events": 200, "calibration_refresh": 100},
    "river": {"params": {"n_trees": 25, "height": 8, "window_size": 100}},
    "autoencoder": {"enabled": False},  # no torch import: faster starts
}
SCORED = 'stream_detector_events_total{outcome="scored"}'


def failures(metrics: dict[str, float], reason: str) -> float:
    return metric(metrics, f'stream_detector_state_restore_failures_total{{reason="{reason}"}}')


def calibrated(metrics: dict[str, float], detector: str) -> float:
    return metric(metrics, f'stream_detector_detector_calibrated{{detector="{detector}"}}')


def _events(count: int, seed: int) -> list[tuple[bytes, bytes]]:
    return [(e["store_id"].encode(), orjson.dumps(e)) for e, _ in SalesGenerator(GeneratorConfig(seed=seed)).generate(count)]


@dataclass
class Warm:
    bootstrap: str
    input_topic: str
    output_topic: str
    dlq_topic: str
    records: list[tuple[bytes, bytes]]  # the warm changelog, in order
    latest: list[bytes]  # the chunks of its newest snapshot
    position: int
    tmp: Path
    added: int = 0  # events produced after the snapshot, by the tests so far

    def header(self, fmt: int) -> bytes:
        fields = {"format": fmt, "snapshot_id": uuid.uuid4().hex, "index": 0, "count": 1, "topic": self.input_topic, "partition": 0, "position": self.position}
        return orjson.dumps(fields) + b"\n"

    def restart(self, appended: list[bytes], name: str, env: dict[str, str] | None = None, **changes: dict) -> tuple[DaemonProcess, str]:
        """A daemon (new group) restoring from a copy of the warm changelog plus ``appended``."""
        changelog = unique_name(f"state-{name}")
        ensure_topics(self.bootstrap, {changelog: 1}, config={"cleanup.policy": "compact"})
        key = f"{self.input_topic}/0/0".encode()
        produce_all(self.bootstrap, changelog, [*self.records, *((key, value) for value in appended)])
        sections = {section: dict(values) for section, values in SECTIONS.items()}
        for section, values in changes.items():
            sections.setdefault(section, {}).update(values)
        sections.setdefault("state", {})["changelog_topic"] = changelog
        group = unique_name(f"g-{name}")
        config = write_config(self.tmp / f"{name}.yaml", self.bootstrap, self.input_topic, self.output_topic, self.dlq_topic, group, **sections)
        return DaemonProcess(config, self.tmp / f"{name}.log", env={**child_env(), **(env or {})}).start(), changelog


@pytest.fixture(scope="module")
def warm(kafka_bootstrap, tmp_path_factory) -> Warm:
    tmp = tmp_path_factory.mktemp("hostile-state")
    input_topic, output_topic, dlq_topic = (unique_name(p) for p in ("sales", "out", "dlq"))
    ensure_topics(kafka_bootstrap, {input_topic: 1, output_topic: 1, dlq_topic: 1})
    produce_all(kafka_bootstrap, input_topic, _events(WARM, seed=21))
    group = unique_name("g-warm")
    config = write_config(tmp / "warm.yaml", kafka_bootstrap, input_topic, output_topic, dlq_topic, group, **SECTIONS)
    daemon = DaemonProcess(config, tmp / "warm.log").start()
    try:
        daemon.wait_for(lambda m: metric(m, SCORED) >= WARM and calibrated(m, "hst") == 1, 60, "the warm-up run")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    records = [(m.key(), m.value()) for m in read_all(kafka_bootstrap, f"{group}-state", idle=1.0)]
    by_snapshot: dict[str, list[bytes]] = {}
    for _, value in records:
        header, _ = split_record(value)
        if isinstance(header, SnapshotHeader):  # not a shard of keys
            by_snapshot.setdefault(header.snapshot_id, []).append(value)
    last, _ = split_record(records[-1][1])  # a checkpoint ends with its snapshot
    assert isinstance(last, SnapshotHeader)
    latest = by_snapshot[last.snapshot_id]
    assert decode_snapshot(latest).header.position == WARM
    return Warm(kafka_bootstrap, input_topic, output_topic, dlq_topic, records, latest, WARM, tmp)


def _scores_more(warm: Warm, daemon: DaemonProcess, seed: int, fresh: bool = False) -> dict[str, float]:
    """The daemon is alive and scores what arrives after its restore: every event after the
    snapshot (those of the earlier tests too), or every event when the partition started fresh."""
    warm.added += produce_all(warm.bootstrap, warm.input_topic, _events(MORE, seed=seed))
    expected = warm.added + (WARM if fresh else 0)
    scored = daemon.wait_for(lambda m: metric(m, SCORED) >= expected, 30, f"{expected} events scored after the restore")
    assert metric(scored, SCORED) == expected
    return scored


def _rewritten(warm: Warm, snapshot: Snapshot) -> list[bytes]:
    """The warm snapshot again, with its state as the test changed it: a newer snapshot that
    names the same shards of keys."""
    return encode_snapshot(snapshot.state, warm.input_topic, 0, snapshot.header.position, snapshot.versions)


def _restored(daemon: DaemonProcess) -> dict[str, float]:
    """Metrics once the partition is assigned and the state gauges reflect the restored state
    (the z-score calibrator was ready in the snapshot)."""
    return daemon.wait_for(lambda m: metric(m, "stream_detector_assigned_partitions") == 1 and calibrated(m, "zscore") == 1, 30, "the restore")


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (eval, (f"(open({self.path!r}, 'w').close(), {{'version': 1, 'detectors': {{}}, 'calibrators': {{}}}})[1]",))


def test_a_crafted_pickle_in_the_changelog_runs_nothing(warm, tmp_path):
    """The newest records of the changelog are pickles in the old snapshot formats, which would
    return a valid (empty) state after running their code: neither is unpickled; each is counted
    and skipped, and the older, sound snapshot is restored with all its learned state."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(marker))
    appended = [warm.header(1) + zlib.compress(payload), warm.header(2) + payload]
    daemon, _ = warm.restart(appended, "pickle")
    try:
        restored = _restored(daemon)
        assert not marker.exists()
        assert failures(restored, "unsupported_format") == 2 and failures(restored, "corrupt") == 0
        assert calibrated(restored, "hst") == 1 and calibrated(restored, "duplicates") == 1
        _scores_more(warm, daemon, seed=31)
        assert not marker.exists()
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    text = daemon.log_path.read_text()
    assert f"state of {warm.input_topic}/0" in text and "pickle" in text and "Traceback" not in text


def test_a_river_model_pickle_with_a_bad_signature_runs_nothing(warm, tmp_path):
    """A River model other than HalfSpaceTrees is stored pickled and signed with
    state.signing_key (here from the environment). A snapshot whose model part is a crafted
    pickle with a made-up signature: the part is refused before unpickling, the rest restored."""
    marker = tmp_path / "pwned"
    snapshot = decode_snapshot(warm.latest)
    snapshot.state["detectors"]["river"] = {"version": 2, "model": "LODA", "pickle": pickle.dumps(_Marker(marker)), "hmac": "00" * 32}
    crafted = _rewritten(warm, snapshot)
    key = {"STREAM_DETECTOR_STATE__SIGNING_KEY": "integration-test-signing-key"}
    daemon, _ = warm.restart(crafted, "river-pickle", env=key, river={"model": "LODA", "params": {}})
    try:
        restored = _restored(daemon)
        assert failures(restored, "bad_signature") == 1 and not marker.exists()
        assert calibrated(restored, "duplicates") == 1 and calibrated(restored, "river") == 0
        _scores_more(warm, daemon, seed=35)
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert not marker.exists()
    text = daemon.log_path.read_text()
    assert "detector:river not restored (bad_signature)" in text and "integration-test-signing-key" not in text


def test_headerless_records_are_skipped_and_a_corrupt_snapshot_starts_the_partition_fresh(warm):
    damaged = bytearray(warm.latest[-1])
    damaged[-20] ^= 0xFF
    appended = [b"no header, just bytes", bytes(damaged)]
    daemon, _ = warm.restart(appended, "corrupt")
    try:
        # Fresh from the group's committed offset (none: the earliest): everything is scored again.
        scored = _scores_more(warm, daemon, seed=32, fresh=True)
        assert failures(scored, "corrupt") == 2
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    lines = [orjson.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("reason") == "corrupt"]
    assert {line.get("partition") for line in refused} == {0} and {line.get("topic") for line in refused} == {warm.input_topic}
    assert any("checksum" in line["message"] for line in refused)


def test_a_part_of_the_wrong_shape_starts_fresh_and_the_other_detectors_keep_their_state(warm):
    snapshot = decode_snapshot(warm.latest)
    engine = snapshot.state["detectors"]["hst"]["engine"]
    engine["l_leaves"] = engine["l_leaves"][:, :-1]  # a leaf short in every tree
    wrong = _rewritten(warm, snapshot)
    daemon, _ = warm.restart(wrong, "shape")
    try:
        restored = _restored(daemon)
        assert failures(restored, "incompatible") == 1
        # The half-space trees and their calibrator start fresh (the log line below; their
        # calibrated gauge is no proof: the events earlier tests added are scored at once after
        # the restore, and 200 of them make the fresh calibrator ready); the others are restored.
        assert calibrated(restored, "duplicates") == 1
        _scores_more(warm, daemon, seed=33)
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert "detector:hst not restored (incompatible)" in daemon.log_path.read_text()


def test_a_changed_detector_setting_over_a_snapshot_resets_that_detector_only(warm):
    """river.params.n_trees 25 -> 10: the issue's crash loop."""
    daemon, _ = warm.restart([], "n-trees", river={"params": {"n_trees": 10, "height": 8, "window_size": 100}})
    try:
        restored = _restored(daemon)
        assert failures(restored, "incompatible") == 1
        assert calibrated(restored, "duplicates") == 1  # hst: see the test above
        _scores_more(warm, daemon, seed=34)
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()
    text = daemon.log_path.read_text()
    assert "n_trees" in text and "detector:hst not restored (incompatible)" in text


def test_on_unreadable_fail_stops_with_one_clear_error(warm):
    daemon, _ = warm.restart([b"no header"], "fail", state={"on_unreadable": "fail"})
    assert daemon.process is not None
    code = daemon.process.wait(30)
    text = daemon.log_path.read_text()
    assert code == 1, text
    assert f"state of {warm.input_topic}/0" in text and "state.on_unreadable: fail" in text and "Traceback" not in text
