"""The state encoding: plain data round-trips exactly; anything else is refused both ways, and
decoding hostile bytes raises ``StateError`` without running anything."""

from __future__ import annotations

import math
import os
import pickle
import struct
import zlib

import numpy as np
import orjson
import pytest

from stream_detector.errors import StateError
from stream_detector.state import codec


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _framed(manifest: object, data: bytes = b"", version: int = codec.VERSION) -> bytes:
    """Bytes in the encoding's frame, valid checksum, with any manifest: what an attacker can write."""
    body = orjson.dumps(manifest) + data
    return struct.pack("<4sBII", codec.MAGIC, version, len(body) - len(data), zlib.crc32(body)) + body


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def test_plain_data_round_trips_with_types_shapes_and_special_floats():
    state = {
        "version": 3,
        "none": None,
        "flag": True,
        "text": "caf\u00e9",
        "big": 2**64 - 1,
        "negative": -(2**63),
        "floats": [1.5, math.inf, -math.inf],
        "tuple": (1, "a", (2.0,)),
        "blob": b"\x00\x01raw",
        "int_keys": {1: "one", None: "none", "$x": "dollar"},
        "arrays": [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.array([2**64 - 1, 0], dtype=np.uint64),
            np.array([True, False]),
            np.zeros((0, 5), dtype=np.int16),
            np.arange(6, dtype=">f8")[::2],  # big-endian and not contiguous
            np.array(2.5),  # 0-d
        ],
        "nested": {"deep": [[{"x": np.int64(7), "y": np.float64(0.25), "z": np.bool_(True)}]]},
    }
    out = codec.decode(codec.encode(state))
    assert math.isnan(codec.decode(codec.encode(math.nan)))
    assert out["none"] is None and out["flag"] is True and out["text"] == "caf\u00e9"
    assert out["big"] == 2**64 - 1 and out["negative"] == -(2**63)
    assert out["floats"] == [1.5, math.inf, -math.inf]
    assert out["tuple"] == (1, "a", (2.0,)) and out["blob"] == b"\x00\x01raw"
    assert out["int_keys"] == {1: "one", None: "none", "$x": "dollar"}
    for restored, original in zip(out["arrays"], state["arrays"], strict=True):
        assert restored.dtype == original.dtype.newbyteorder("=") and restored.shape == original.shape
        np.testing.assert_array_equal(restored, original)
        assert restored.flags.writeable
    assert out["nested"] == {"deep": [[{"x": 7, "y": 0.25, "z": True}]]}
    assert type(out["nested"]["deep"][0][0]["x"]) is int


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {"a": {1, 2}},
        np.array(["text"]),
        np.array([object()], dtype=object),
        np.array([1 + 2j]),
        2**64,
        _Marker("/nonexistent"),
    ],
)
def test_anything_but_plain_data_is_refused_when_encoding(value):
    with pytest.raises(TypeError):
        codec.encode({"state": value})


def test_torch_tensors_must_be_converted_by_their_owner():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch"):
        codec.encode({"weights": torch.zeros(3)})


def test_a_pickle_is_refused_without_being_run(tmp_path):
    marker = tmp_path / "ran"
    crafted = pickle.dumps({"state": _Marker(str(marker))})
    with pytest.raises(StateError, match="magic"):
        codec.decode(crafted)
    # Even in the encoding's frame, as bytes or as a manifest, a pickle is only ever data.
    framed = _framed({"tree": {"$b": 0}, "arrays": [["|u1", [len(crafted)], 0, len(crafted)]]}, crafted)
    assert codec.decode(framed) == crafted
    assert not marker.exists()


@pytest.mark.parametrize(
    ("manifest", "data", "match"),
    [
        ({"tree": {"$a": 0}, "arrays": [["|O", [1], 0, 8]]}, b"\0" * 8, "dtype"),
        ({"tree": {"$a": 0}, "arrays": [["<f8", [3], 0, 16]]}, b"\0" * 16, "do not hold"),
        ({"tree": {"$a": 0}, "arrays": [["<f8", [4], 0, 32]]}, b"\0" * 16, "within the payload"),
        ({"tree": {"$a": 0}, "arrays": [["<f8", [-1], 0, 8]]}, b"\0" * 8, "shape"),
        ({"tree": {"$a": 0}, "arrays": [["<f8", [1], 8, 8]]}, b"\0" * 16, "offset"),
        ({"tree": {"$a": 0}, "arrays": [["<f8", [1], 0, 8]]}, b"\0" * 9, "after its arrays"),
        ({"tree": {"$a": 1}, "arrays": []}, b"", "refers to array"),
        ({"tree": {"$b": 0}, "arrays": [["<f8", [1], 0, 8]]}, b"\0" * 8, "bytes stored"),
        ({"tree": {"$class": "os.system"}, "arrays": []}, b"", "unknown tag"),
        ({"tree": {"$f": "1e999"}, "arrays": []}, b"", "unknown float"),
        ({"tree": {"a": 1, "$a": 0}, "arrays": []}, b"", "'\\$' key"),
        ({"tree": {"$d": [[[1], 2]]}, "arrays": []}, b"", "dict key"),
        ({"tree": {"$d": [[{"$t": [[1]]}, 2]]}, "arrays": []}, b"", "bad dict key"),
        ({"tree": [1], "arrays": [], "extra": 1}, b"", "'tree' and 'arrays'"),
        ({"tree": _nested(codec.MAX_DEPTH + 1), "arrays": []}, b"", "deeper"),
    ],
)
def test_hostile_manifests_are_state_errors(manifest, data, match):
    with pytest.raises(StateError, match=match):
        codec.decode(_framed(manifest, data))


def test_damaged_truncated_and_foreign_payloads_are_state_errors():
    good = codec.encode({"a": np.arange(100.0)})
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    for bad, match in [
        (bytes(flipped), "checksum"),
        (good[:-1], "checksum"),
        (good[:5], "too short"),
        (b"PK\x03\x04" + good[4:], "magic"),
        (_framed({"tree": 1, "arrays": []}, version=99), "version 99"),
        (_framed({"tree": 1, "arrays": []})[:13] + b"{not json", "checksum"),
    ]:
        with pytest.raises(StateError, match=match):
            codec.decode(bad)
    body = b"{not json"
    with pytest.raises(StateError, match="not JSON"):
        codec.decode(struct.pack("<4sBII", codec.MAGIC, codec.VERSION, len(body), zlib.crc32(body)) + body)
    body = b"[]"
    with pytest.raises(StateError, match="runs past"):
        codec.decode(struct.pack("<4sBII", codec.MAGIC, codec.VERSION, 99, zlib.crc32(body)) + body)


def test_stored_booleans_are_only_true_or_false():
    out = codec.decode(_framed({"tree": {"$a": 0}, "arrays": [["|b1", [3], 0, 3]]}, b"\x00\x07\x01"))
    assert out.dtype == bool and out.view(np.uint8).tolist() == [0, 1, 1]
