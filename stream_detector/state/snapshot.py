"""Versioned, chunked snapshots of one partition's pipeline state, and the shards of its keys.

A snapshot is a pipeline state in the state encoding of ``state/codec.py`` (plain data only:
decoding never runs code), cut into chunks small enough for a Kafka record. It is not
compressed here: the producer compresses its batches (lz4) in librdkafka's own threads. Every
chunk carries a small JSON header: the format version, the snapshot id, its index and the chunk
count, and the input position the state reflects.

Format 4 keeps the per-key state apart (``ScoringPipeline.changelog_state``): the snapshot holds
the base state and ``versions``, which checkpoint wrote the current copy of each shard of keys;
each shard is a record of its own (``encode_shard``), written only by the checkpoints where it
changed. A format 4 snapshot without ``versions`` holds a whole ``state_dict`` (as format 3 did).

Formats 1 (zlib-compressed pickle) and 2 (pickle) are refused, never unpickled: whoever can
write the changelog topic would choose what the unpickling runs. A partition whose snapshot is
refused starts fresh (see the daemon's restore).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from stream_detector.errors import StateError
from stream_detector.state import codec

FORMAT_VERSION = 4
# 1: zlib-compressed pickle; 2: plain pickle (both refused, see above); 3: state/codec.py,
# whole; 4: state/codec.py, the keys in shards of their own.
READABLE_FORMATS = (3, 4)
PICKLE_FORMATS = (1, 2)
CHUNK_BYTES = 512 * 1024
MAX_CHUNKS = 100_000  # 50 GB of state: any count above it is not one this program wrote
_SEPARATOR = b"\n"


# Which checkpoint wrote the current copy of each shard: part -> shard name -> checkpoint id.
Versions = dict[str, dict[str, str]]


@dataclass(frozen=True)
class SnapshotHeader:
    format: int
    snapshot_id: str
    index: int
    count: int
    topic: str  # input topic
    partition: int  # input partition
    position: int  # next input offset to process: the state reflects everything before it


@dataclass(frozen=True)
class Snapshot:
    header: SnapshotHeader
    state: dict[str, Any]  # a whole state_dict, or the base of a sharded one
    versions: Versions | None  # None: ``state`` is whole


@dataclass(frozen=True)
class ShardHeader:
    format: int
    kind: str  # "shard"
    checkpoint: str  # the id of the checkpoint (snapshot) that wrote it
    topic: str  # input topic
    partition: int  # input partition
    part: str  # pipeline part, e.g. "detector:zscore"
    name: str  # shard name within the part, e.g. "customer_id/3"


def encode_snapshot(
    state: dict[str, Any], topic: str, partition: int, position: int, versions: Versions | None = None, snapshot_id: str | None = None
) -> list[bytes]:
    """Chunks (header line + payload) for one partition's state: whole, or the base of a
    sharded state whose shards ``versions`` names."""
    payload = codec.encode({"state": state, "versions": versions})
    pieces = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    snapshot_id = snapshot_id or uuid.uuid4().hex
    out = []
    for index, piece in enumerate(pieces):
        header = SnapshotHeader(FORMAT_VERSION, snapshot_id, index, len(pieces), topic, partition, position)
        out.append(orjson.dumps(header.__dict__) + _SEPARATOR + piece)
    return out


def encode_shard(shard: dict[str, Any], checkpoint: str, topic: str, partition: int, part: str, name: str) -> bytes:
    header = ShardHeader(FORMAT_VERSION, "shard", checkpoint, topic, partition, part, name)
    return orjson.dumps(header.__dict__) + _SEPARATOR + codec.encode(shard)


def split_record(value: bytes) -> tuple[SnapshotHeader | ShardHeader, bytes]:
    """A changelog record's header (a snapshot chunk's or a shard's) and payload; ``StateError``
    (with ``reason``) if it is neither."""
    head, sep, payload = value.partition(_SEPARATOR)
    if not sep:
        raise StateError("state chunk without a header", reason="corrupt")
    try:
        fields = orjson.loads(head)
        is_shard = isinstance(fields, dict) and fields.get("kind") == "shard"
    except orjson.JSONDecodeError as exc:
        raise StateError(f"unreadable state chunk header: {exc}", reason="corrupt") from None
    if not is_shard:
        return split_chunk(value)
    try:
        shard = ShardHeader(**fields)
    except TypeError as exc:
        raise StateError(f"unreadable state shard header: {exc}", reason="corrupt") from None
    texts = (shard.checkpoint, shard.topic, shard.part, shard.name)
    if shard.format != FORMAT_VERSION or not all(isinstance(t, str) for t in texts) or not _is_int(shard.partition) or shard.partition < 0:
        raise StateError(f"state shard header out of range: {fields}", reason="corrupt")
    return shard, payload


def decode_shard(payload: bytes) -> dict[str, Any]:
    shard = codec.decode(payload)
    if not isinstance(shard, dict):
        raise StateError(f"a state shard holds a {type(shard).__name__}, not a dict", reason="corrupt")
    return shard


def split_chunk(value: bytes) -> tuple[SnapshotHeader, bytes]:
    """A chunk's header and payload piece; ``StateError`` (with ``reason``) if it is not one."""
    head, sep, payload = value.partition(_SEPARATOR)
    if not sep:
        raise StateError("state chunk without a header", reason="corrupt")
    try:
        fields = orjson.loads(head)
        header = SnapshotHeader(**fields)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise StateError(f"unreadable state chunk header: {exc}", reason="corrupt") from None
    if not _is_int(header.format):
        raise StateError(f"state chunk header has format {header.format!r}", reason="corrupt")
    if header.format in PICKLE_FORMATS:
        raise StateError(
            f"state snapshot format {header.format} is pickle, which is refused (it could run code); this version reads {READABLE_FORMATS}",
            reason="unsupported_format",
        )
    if header.format not in READABLE_FORMATS:
        raise StateError(f"state snapshot format {header.format}, this version reads {READABLE_FORMATS}", reason="unsupported_format")
    ints = (header.index, header.count, header.partition, header.position)
    if (
        not all(_is_int(n) for n in ints)
        or not isinstance(header.snapshot_id, str)
        or not isinstance(header.topic, str)
        or not 0 <= header.index < header.count <= MAX_CHUNKS
        or header.partition < 0
        or header.position < 0
    ):
        raise StateError(f"state chunk header out of range: {fields}", reason="corrupt")
    return header, payload


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_snapshot(chunks: list[bytes]) -> Snapshot:
    """Reassemble one snapshot from all its chunks (any order); ``StateError`` with a reason."""
    parts = sorted((split_chunk(c) for c in chunks), key=lambda hp: hp[0].index)
    if not parts:
        raise StateError("empty snapshot", reason="corrupt")
    first = parts[0][0]
    ids = {h.snapshot_id for h, _ in parts}
    if len(ids) != 1 or [h.index for h, _ in parts] != list(range(first.count)):
        raise StateError(f"incomplete snapshot {first.snapshot_id}: have chunks {[h.index for h, _ in parts]} of {first.count}", reason="corrupt")
    try:
        state = codec.decode(b"".join(p for _, p in parts))
    except StateError as exc:
        raise StateError(f"corrupt snapshot {first.snapshot_id}: {exc}", reason="corrupt") from None
    if first.format == 3:
        versions = None
    else:  # {"state": ..., "versions": ...}
        if not isinstance(state, dict) or set(state) != {"state", "versions"}:
            raise StateError(f"corrupt snapshot {first.snapshot_id}: not a format {first.format} payload", reason="corrupt")
        state, versions = state["state"], state["versions"]
        if versions is not None and not _is_versions(versions):
            raise StateError(f"corrupt snapshot {first.snapshot_id}: its shard versions are malformed", reason="corrupt")
    if not isinstance(state, dict):
        raise StateError(f"corrupt snapshot {first.snapshot_id}: holds a {type(state).__name__}, not a dict", reason="corrupt")
    return Snapshot(first, state, versions)


def _is_versions(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(part, dict) and all(isinstance(name, str) and isinstance(ckpt, str) for name, ckpt in part.items()) for part in value.values()
    )
