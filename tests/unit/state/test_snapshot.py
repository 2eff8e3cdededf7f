"""State snapshots: chunked round trip in the state encoding; pickle formats refused unread; damage reported with a reason."""

from __future__ import annotations

import os
import pickle
import zlib

import numpy as np
import orjson
import pytest

from stream_detector.errors import StateError
from stream_detector.state import snapshot
from stream_detector.state.snapshot import decode_snapshot, encode_snapshot, split_chunk


def big_state() -> dict:
    rng = np.random.default_rng(0)
    return {"version": 1, "detectors": {"zscore": {"mean": rng.normal(size=(100_000, 2))}}, "n": 7}


def test_round_trip_over_several_chunks_in_any_order():
    state = big_state()
    chunks = encode_snapshot(state, "sales", 2, 1234)
    assert len(chunks) > 1 and all(len(c) <= snapshot.CHUNK_BYTES + 512 for c in chunks)
    found = decode_snapshot(list(reversed(chunks)))
    header, restored = found.header, found.state
    assert found.versions is None
    assert (header.format, header.topic, header.partition, header.position) == (snapshot.FORMAT_VERSION, "sales", 2, 1234)
    np.testing.assert_array_equal(restored["detectors"]["zscore"]["mean"], state["detectors"]["zscore"]["mean"])
    assert restored["n"] == 7


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("fmt", [1, 2])
def test_pickle_formats_are_refused_and_never_unpickled(fmt, tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"version": 1, "detectors": _Marker(str(marker))})
    if fmt == 1:
        payload = zlib.compress(payload)
    header = {"format": fmt, "snapshot_id": "old", "index": 0, "count": 1, "topic": "sales", "partition": 0, "position": 9}
    with pytest.raises(StateError, match="pickle") as raised:
        decode_snapshot([orjson.dumps(header) + b"\n" + payload])
    assert raised.value.reason == "unsupported_format"
    assert not marker.exists()


def test_a_pickle_under_the_current_format_is_corrupt_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    header = {"format": snapshot.FORMAT_VERSION, "snapshot_id": "x", "index": 0, "count": 1, "topic": "sales", "partition": 0, "position": 9}
    with pytest.raises(StateError) as raised:
        decode_snapshot([orjson.dumps(header) + b"\n" + pickle.dumps(_Marker(str(marker)))])
    assert raised.value.reason == "corrupt" and not marker.exists()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"no header at all", "without a header"),
        (b"{not json\n", "unreadable"),
        (b'{"format": 3}\n', "unreadable"),
        (b'{"format": 3, "snapshot_id": "x", "index": 0, "count": 1, "topic": "t", "partition": 0, "position": 0, "more": 1}\n', "unreadable"),
        (b'{"format": "3", "snapshot_id": "x", "index": 0, "count": 1, "topic": "t", "partition": 0, "position": 0}\n', "format"),
        (b'{"format": 3, "snapshot_id": "x", "index": 2, "count": 1, "topic": "t", "partition": 0, "position": 0}\n', "out of range"),
        (b'{"format": 3, "snapshot_id": "x", "index": 0, "count": 1, "topic": "t", "partition": -1, "position": 0}\n', "out of range"),
        (b'{"format": 3, "snapshot_id": 5, "index": 0, "count": 1, "topic": "t", "partition": 0, "position": 0}\n', "out of range"),
        (b'{"format": 3, "snapshot_id": "x", "index": 0, "count": 1e9, "topic": "t", "partition": 0, "position": 0}\n', "out of range"),
    ],
)
def test_chunks_without_a_sound_header_are_corrupt(value, match):
    with pytest.raises(StateError, match=match) as raised:
        split_chunk(value)
    assert raised.value.reason == "corrupt"


def test_a_damaged_payload_is_corrupt():
    chunks = encode_snapshot(big_state(), "sales", 0, 1)
    damaged = bytearray(chunks[-1])
    damaged[-10] ^= 0x55
    with pytest.raises(StateError, match="checksum") as raised:
        decode_snapshot([*chunks[:-1], bytes(damaged)])
    assert raised.value.reason == "corrupt"


def test_missing_chunk_and_unknown_format_are_state_errors():
    chunks = encode_snapshot(big_state(), "sales", 0, 1)
    with pytest.raises(StateError, match="incomplete snapshot"):
        decode_snapshot(chunks[1:])
    head, _, payload = chunks[0].partition(b"\n")
    future = orjson.dumps({**orjson.loads(head), "format": 99}) + b"\n" + payload
    with pytest.raises(StateError, match="format 99") as raised:
        split_chunk(future)
    assert raised.value.reason == "unsupported_format"
