"""Keyed tables cut into shards of slots, so a checkpoint writes only the shards that changed.

A keyed table (z-score statistics per key, silence timers per store) stores key ``k`` in a slot
and its values in row ``slot`` of a few arrays. Shard ``i`` is the slots ``i * SHARD_SLOTS ..
(i + 1) * SHARD_SLOTS - 1``: the keys there (None for a free slot) and those rows. A table
remembers which shards changed since its last checkpoint (``ChangedShards``), so a flood of new
keys, or a busy store, rewrites a few shards instead of the whole table, as Kafka Streams writes
one changelog record per changed key. Shards are cut by slot, not by a hash of the key: marking
a batch's changes is one integer division of the slots it touched.

The changelog stores each shard as its own record (``state/changelog.py``); ``join`` puts a
table back together from its shards on restore.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stream_detector.errors import StateError

# Slots per shard: a key that changes rewrites its shard. Small enough that a few scattered
# changes rewrite little (256 keys of 200 characters: about 100 KB), large enough that the
# snapshot's list of shards stays small (1,000,000 keys: 4,000 shards a table).
SHARD_SLOTS = 256
# What holding one key costs besides its characters and its rows: the str object's header,
# a dict entry (with the table's spare room) and a list slot. tracemalloc measures about 130
# bytes (100,000 keys of 200 characters, CPython 3.11); rounded up to an estimate that bounds
# state in bytes.
KEY_OVERHEAD_BYTES = 160


def shard_count(allocated: int) -> int:
    return -(-allocated // SHARD_SLOTS)


class ChangedShards:
    """Which shards of one table changed since the last checkpoint took them."""

    def __init__(self) -> None:
        self._changed: set[int] = set()
        self.everything = True  # fresh or restored: the next checkpoint writes every shard

    def mark(self, slots: np.ndarray | Sequence[int]) -> None:
        if self.everything or not len(slots):
            return
        self._changed.update(np.unique(np.asarray(slots, dtype=np.int64) // SHARD_SLOTS).tolist())

    def mark_all(self) -> None:
        self.everything = True
        self._changed.clear()

    def take(self, allocated: int, changed_only: bool) -> list[int]:
        """The shards a checkpoint writes (all of them unless ``changed_only``); they count as
        written from now on."""
        every = list(range(shard_count(allocated)))
        taken = every if self.everything or not changed_only else sorted(s for s in self._changed if s < len(every))
        self._changed.clear()
        self.everything = False
        return taken


def cut(keys: Sequence[str | None], rows: Mapping[str, np.ndarray], shard: int) -> dict[str, Any]:
    """Shard ``shard`` of a table: its slots' keys and rows."""
    lo = shard * SHARD_SLOTS
    hi = min(lo + SHARD_SLOTS, len(keys))
    return {"keys": list(keys[lo:hi]), **{name: array[lo:hi].copy() for name, array in rows.items()}}


def join(shards: Iterable[Any], names: Sequence[str], what: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """A table from its shards in order: the keys (free slots left out) and the rows of each
    array in ``names``, aligned with them. ``StateError`` if a shard is malformed."""
    keys: list[str] = []
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not isinstance(shard.get("keys"), list):
            raise StateError(f"{what}: shard {i} is not a table shard", reason="corrupt")
        slot_keys = shard["keys"]
        if len(slot_keys) > SHARD_SLOTS:
            raise StateError(f"{what}: shard {i} holds {len(slot_keys)} slots, at most {SHARD_SLOTS}", reason="corrupt")
        used = [j for j, key in enumerate(slot_keys) if key is not None]
        keys.extend(slot_keys[j] for j in used)
        for name in names:
            array = np.asarray(shard.get(name))
            if array.ndim == 0 or array.shape[0] != len(slot_keys):
                raise StateError(f"{what}: shard {i} has {name} of shape {array.shape} for {len(slot_keys)} slots", reason="corrupt")
            pieces[name].append(array[used])
    rows = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in pieces.items()}
    return keys, rows


def key_bytes(keys: Iterable[str | None]) -> int:
    """The estimated memory of holding ``keys`` (see KEY_OVERHEAD_BYTES); free slots count 8."""
    return sum(KEY_OVERHEAD_BYTES + len(k) if k is not None else 8 for k in keys)
