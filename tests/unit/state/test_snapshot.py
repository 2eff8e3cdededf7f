"""State snapshots: chunked round trip, the previous (zlib) format still read, damage reported."""

from __future__ import annotations

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
    header, restored = decode_snapshot(list(reversed(chunks)))
    assert (header.format, header.topic, header.partition, header.position) == (snapshot.FORMAT_VERSION, "sales", 2, 1234)
    np.testing.assert_array_equal(restored["detectors"]["zscore"]["mean"], state["detectors"]["zscore"]["mean"])
    assert restored["n"] == 7


def test_format_1_snapshots_with_zlib_payloads_still_load():
    state = big_state()
    payload = zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 1)
    header = {"format": 1, "snapshot_id": "old", "index": 0, "count": 1, "topic": "sales", "partition": 0, "position": 9}
    _, restored = decode_snapshot([orjson.dumps(header) + b"\n" + payload])
    np.testing.assert_array_equal(restored["detectors"]["zscore"]["mean"], state["detectors"]["zscore"]["mean"])


def test_missing_chunk_and_unknown_format_are_state_errors():
    chunks = encode_snapshot(big_state(), "sales", 0, 1)
    with pytest.raises(StateError, match="incomplete snapshot"):
        decode_snapshot(chunks[1:])
    head, _, payload = chunks[0].partition(b"\n")
    future = orjson.dumps({**orjson.loads(head), "format": 99}) + b"\n" + payload
    with pytest.raises(StateError, match="format 99"):
        split_chunk(future)
