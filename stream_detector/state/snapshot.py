"""Versioned, chunked snapshots of one partition's pipeline state.

A snapshot is the pipeline's ``state_dict()`` (numpy arrays, counters, model weights),
pickled and cut into chunks small enough for a Kafka record. It is not compressed here: the
producer compresses its batches (lz4) in librdkafka's own threads, while zlib here took tens of
milliseconds per partition on the loop's thread at every checkpoint (format 1, still read). Every chunk carries a
small JSON header: the format version, the snapshot id, its index and the chunk count, and the
input position the state reflects. The state is only ever read back by this program from its
own changelog topic (an internal, trusted topic), hence pickle.
"""

from __future__ import annotations

import pickle
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from stream_detector.errors import StateError

FORMAT_VERSION = 2
# 1: zlib-compressed pickle; 2: plain pickle.
READABLE_FORMATS = (1, 2)
CHUNK_BYTES = 512 * 1024
_SEPARATOR = b"\n"


@dataclass(frozen=True)
class SnapshotHeader:
    format: int
    snapshot_id: str
    index: int
    count: int
    topic: str  # input topic
    partition: int  # input partition
    position: int  # next input offset to process: the state reflects everything before it


def encode_snapshot(state: dict[str, Any], topic: str, partition: int, position: int) -> list[bytes]:
    """Chunks (header line + payload) for one partition's state."""
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    pieces = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    snapshot_id = uuid.uuid4().hex
    out = []
    for index, piece in enumerate(pieces):
        header = SnapshotHeader(FORMAT_VERSION, snapshot_id, index, len(pieces), topic, partition, position)
        out.append(orjson.dumps(header.__dict__) + _SEPARATOR + piece)
    return out


def split_chunk(value: bytes) -> tuple[SnapshotHeader, bytes]:
    head, sep, payload = value.partition(_SEPARATOR)
    if not sep:
        raise StateError("state chunk without a header")
    try:
        header = SnapshotHeader(**orjson.loads(head))
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise StateError(f"unreadable state chunk header: {exc}") from None
    if header.format not in READABLE_FORMATS:
        raise StateError(f"state snapshot format {header.format}, this version reads {READABLE_FORMATS}")
    return header, payload


def decode_snapshot(chunks: list[bytes]) -> tuple[SnapshotHeader, dict[str, Any]]:
    """Reassemble one snapshot from all its chunks (any order)."""
    parts = sorted((split_chunk(c) for c in chunks), key=lambda hp: hp[0].index)
    if not parts:
        raise StateError("empty snapshot")
    first = parts[0][0]
    ids = {h.snapshot_id for h, _ in parts}
    if len(ids) != 1 or [h.index for h, _ in parts] != list(range(first.count)):
        raise StateError(f"incomplete snapshot {first.snapshot_id}: have chunks {[h.index for h, _ in parts]} of {first.count}")
    try:
        payload = b"".join(p for _, p in parts)
        state = pickle.loads(zlib.decompress(payload) if first.format == 1 else payload)
    except (zlib.error, pickle.UnpicklingError, EOFError) as exc:
        raise StateError(f"corrupt snapshot {first.snapshot_id}: {exc}") from None
    return first, state
