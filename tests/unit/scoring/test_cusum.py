"""The CUSUM tables of gradual level shifts: a slot per key with an excursion under way,
unknown keys read as 0, and idle keys dropped past the bound (scoring/cusum.py)."""

from __future__ import annotations

import numpy as np

from stream_detector.scoring import cusum
from stream_detector.scoring.cusum import CusumTable, Pending


def pending(keys: list[str], sums: list[float], lengths: list[int]) -> Pending:
    n = len(keys)
    return Pending(
        keys, np.array(sums), np.array(lengths, dtype=np.int64), np.ones(n), np.full(n, 2.0), np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64)
    )


def test_only_keys_with_an_excursion_take_a_slot_and_unknown_keys_read_as_zero():
    table = CusumTable()
    table.apply(pending(["a", "b"], [3.0, 0.0], [2, 0]))
    assert list(table.slots) == ["a"]
    sums, lengths, bases, values, began = table.gather(["b", "a", "c"])
    np.testing.assert_array_equal(sums, [0.0, 3.0, 0.0])
    np.testing.assert_array_equal(lengths, [0, 2, 0])
    np.testing.assert_array_equal(values, [0.0, 2.0, 0.0])
    assert np.isnan(began[[0, 2]]).all() and began[1] == 0.0
    table.apply(pending(["a"], [0.0], [0]))  # back at 0: the slot stays, the excursion ends
    assert table.entries() == [] and "a" in table.slots


def test_reset_ends_a_keys_excursion():
    table = CusumTable()
    table.apply(pending(["a", "b"], [3.0, 4.0], [2, 3]))
    table.reset("a")
    assert [key for key, *_ in table.entries()] == ["b"]


def test_idle_keys_are_dropped_past_the_bound(monkeypatch):
    monkeypatch.setattr(cusum, "MAX_IDLE_KEYS", 3)
    table = CusumTable()
    table.apply(pending([f"k{i}" for i in range(6)], [1.0] * 6, [1] * 6))
    table.apply(pending([f"k{i}" for i in range(3)], [0.0] * 3, [0] * 3))  # 3 idle: within the bound
    assert len(table.slots) == 6
    table.apply(pending(["k3", "new"], [0.0, 2.0], [0, 1]))  # 4 idle > 3: the idle ones go
    assert sorted(table.slots) == ["k4", "k5", "new"]
    assert [(key, s, n) for key, s, n, *_ in table.entries()] == [("k4", 1.0, 1), ("k5", 1.0, 1), ("new", 2.0, 1)]


def test_past_the_bound_the_excursions_of_keys_seen_longest_ago_end(monkeypatch):
    monkeypatch.setattr(cusum, "MAX_EXCURSIONS", 2)
    table = CusumTable()
    table.apply(pending(["a", "b", "c"], [1.0, 2.0, 3.0], [1, 1, 1]))  # seen at 0, 1, 2
    assert [key for key, *_ in table.entries()] == ["b", "c"]
