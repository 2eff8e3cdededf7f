"""Which state the changelog reader restores from a partition's records, without a broker:
the newest complete snapshot, with the copy of each shard of keys that it names."""

from __future__ import annotations

import logging

from stream_detector.state.changelog import _PartitionLog, _restored, checkpoint_records
from stream_detector.state.snapshot import Versions, split_record

TOPIC = "sales"
PART = "detector:zscore"


def _checkpoint(position: int, changed: dict[str, int], versions: Versions) -> list[bytes]:
    """A checkpoint at ``position`` whose changed shards hold the given values."""
    shards = {PART: {name: {"keys": [name], "value": value} for name, value in changed.items()}}
    return [value for _, value in checkpoint_records(TOPIC, 0, position, {"position": position}, shards, versions)]


def _read(records: list[bytes], wanted: int | None = None):
    log = _PartitionLog(wanted)
    for offset, value in enumerate(records):
        header, payload = split_record(value)
        log.add(header, value, payload, offset)
    return _restored(log, 0, None)


def _values(restored) -> dict[str, int]:
    return {name: shard["value"] for name, shard in restored.shards[PART].items()}


def test_each_shard_comes_from_the_checkpoint_that_last_changed_it():
    versions: Versions = {}
    a = _checkpoint(100, {"s0": 1, "s1": 1}, versions)
    b = _checkpoint(200, {"s1": 2}, versions)  # s0 did not change: B names A's copy
    restored = _read([*a, *b])
    assert restored.state == {"position": 200} and restored.header.position == 200
    assert _values(restored) == {"s0": 1, "s1": 2}


def test_a_checkpoint_that_did_not_finish_is_not_restored():
    """Its shards were written but its snapshot was not (a crash): the previous checkpoint is
    restored with the copies it names, not the unfinished one's."""
    versions: Versions = {}
    a = _checkpoint(100, {"s0": 1, "s1": 1}, versions)
    b = _checkpoint(200, {"s1": 2}, versions)
    unfinished = _checkpoint(300, {"s0": 3}, dict(versions))[:-1]  # no snapshot chunk
    restored = _read([*a, *b, *unfinished])
    assert restored.header.position == 200 and _values(restored) == {"s0": 1, "s1": 2}


def test_a_required_position_restores_that_checkpoint():
    """Exactly-once: the snapshot of the committed offset; a later one (an aborted transaction
    that this broker shows to read_committed readers) is not restored, nor are its shards."""
    versions: Versions = {}
    a = _checkpoint(100, {"s0": 1, "s1": 1}, versions)
    aborted = _checkpoint(200, {"s0": 5, "s1": 5}, dict(versions))
    restored = _read([*a, *aborted], wanted=100)
    assert restored.header.position == 100 and _values(restored) == {"s0": 1, "s1": 1}
    assert _read([*a, *aborted], wanted=150) is None


def test_a_compacted_copy_falls_back_to_the_newer_one(caplog):
    """Compaction keeps one copy per shard: when an unfinished checkpoint wrote a newer copy of
    a shard, the one the snapshot names is gone, and the newer copy is restored (at-least-once:
    a little ahead of the position), with a warning."""
    versions: Versions = {}
    a = _checkpoint(100, {"s0": 1, "s1": 1}, versions)
    unfinished = _checkpoint(200, {"s0": 2}, dict(versions))[:-1]
    compacted = [a[1], a[2], *unfinished]  # A's s0 removed
    with caplog.at_level(logging.WARNING, logger="stream_detector.state"):
        restored = _read(compacted)
    assert _values(restored) == {"s0": 2, "s1": 1}
    assert "not found" in caplog.text


def test_shards_the_snapshot_does_not_name_are_left_out():
    versions: Versions = {}
    a = _checkpoint(100, {"s0": 1}, versions)
    stray = _checkpoint(150, {"s9": 9}, {})[:-1]
    b = _checkpoint(200, {"s0": 2}, versions)
    assert _values(_read([*a, *stray, *b])) == {"s0": 2}
