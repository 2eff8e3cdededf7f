"""A state encoding that cannot run code: plain values in a JSON manifest, arrays as raw bytes.

Snapshots are read from a Kafka topic, and anyone who can write that topic chooses the bytes,
so decoding must never build anything but data (no pickle, no ``allow_pickle``). The encoding::

    MAGIC (4 bytes) | version (u8) | manifest length (u32 LE) | CRC-32 of the rest (u32 LE)
    | manifest (JSON) | array bytes

The manifest holds the tree of values: JSON strings, integers (64-bit), booleans and null as
themselves, finite floats as JSON numbers, lists, and dicts with string keys. Everything else is
a one-key object whose key starts with ``$``: ``{"$a": i}`` the i-th array, ``{"$b": i}`` bytes
(stored like a uint8 array), ``{"$f": "nan" | "inf" | "-inf"}``, ``{"$t": [...]}`` a tuple and
``{"$d": [[key, value], ...]}`` a dict whose keys are not all plain strings (or start with
``$``). Arrays are listed as ``[dtype, shape, offset, nbytes]``, little-endian, C order, with a
dtype from ``DTYPES`` only (numbers and booleans: never ``object``), and every shape, offset
and length is checked against the bytes before anything is read. Decoding returns new,
writable numpy arrays, Python scalars, lists, tuples and dicts, or raises ``StateError``.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np
import orjson

from stream_detector.errors import StateError

MAGIC = b"SDS\x00"
VERSION = 1
_PREFIX = struct.Struct("<4sBII")  # magic, version, manifest length, crc32
# Numeric and boolean dtypes only: nothing that holds Python objects.
DTYPES = frozenset({"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"})
MAX_DEPTH = 64
MAX_NDIM = 8
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Values stored as themselves with no check (ints and floats are checked: range, finiteness).
_AS_IS = frozenset({str, bool, type(None)})
_JSON_SCALARS = frozenset({str, bool, int, float, type(None)})  # what JSON decodes to, as is


def encode(value: Any) -> bytes:
    """The bytes of ``value``: nested dicts, lists, tuples, str, int, float, bool, None, bytes
    and numpy arrays of numbers or booleans (torch tensors must be converted by their owner).
    ``TypeError`` for anything else."""
    arrays: list[np.ndarray] = []
    tree = _pack(value, arrays, 0)
    specs: list[list[Any]] = []
    offset = 0
    for a in arrays:
        specs.append([a.dtype.str, list(a.shape), offset, a.nbytes])
        offset += a.nbytes
    parts: list[bytes | memoryview] = [orjson.dumps({"tree": tree, "arrays": specs}), *(a.data for a in arrays)]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(parts[0]), crc), *parts])


def decode(data: bytes | memoryview) -> Any:
    """The value ``encode`` wrote; ``StateError`` for anything else (never runs code)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise StateError("state payload too short for its header")
    magic, version, manifest_len, crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise StateError("state payload is not in the state encoding (unknown magic bytes)")
    if version != VERSION:
        raise StateError(f"state encoding version {version}, this version reads {VERSION}")
    body = view[_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise StateError("state payload is damaged (checksum mismatch)")
    if manifest_len > len(body):
        raise StateError("state manifest runs past the payload")
    try:
        manifest = orjson.loads(body[:manifest_len])
    except orjson.JSONDecodeError as exc:
        raise StateError(f"state manifest is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or set(manifest) != {"tree", "arrays"} or not isinstance(manifest["arrays"], list):
        raise StateError("state manifest must be an object with 'tree' and 'arrays'")
    arrays = _arrays(manifest["arrays"], body[manifest_len:])
    return _unpack(manifest["tree"], arrays, 0)


# -- encoding --------------------------------------------------------------------------------


def _pack(value: Any, arrays: list[np.ndarray], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError(f"state nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        integer = int(value)
        if not _INT_MIN <= integer <= _INT_MAX:
            raise TypeError(f"integer {integer} does not fit in 64 bits")
        return integer
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number):
            return number
        return {"$f": "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")}
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        array = value if value.flags.c_contiguous else value.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype.str not in DTYPES:
            raise TypeError(f"arrays of dtype {value.dtype} cannot be stored (numbers and booleans only)")
        arrays.append(array)
        return {"$a": len(arrays) - 1}
    if isinstance(value, (bytes, bytearray, memoryview)):
        arrays.append(np.frombuffer(bytes(value), dtype=np.uint8))
        return {"$b": len(arrays) - 1}
    if isinstance(value, list):
        if set(map(type, value)) <= _AS_IS:  # e.g. a long list of keys: no walk
            return value
        return [_pack(v, arrays, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"$t": [_pack(v, arrays, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _pack(v, arrays, depth + 1) for k, v in value.items()}
        return {"$d": [[_pack(k, arrays, depth + 1), _pack(v, arrays, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} cannot be stored in state (plain data only)")


# -- decoding --------------------------------------------------------------------------------


def _arrays(specs: list[Any], data: memoryview) -> list[np.ndarray]:
    out = []
    end = 0
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 4):
            raise StateError(f"state array {i}: malformed entry")
        dtype, shape, offset, nbytes = spec
        if dtype not in DTYPES:
            raise StateError(f"state array {i}: dtype {dtype!r} is not allowed")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(n) and n >= 0 for n in shape):
            raise StateError(f"state array {i}: bad shape {shape!r}")
        if not (_is_int(offset) and _is_int(nbytes)) or offset != end:
            raise StateError(f"state array {i}: bad offset {offset!r}")
        itemsize = np.dtype(dtype).itemsize
        if nbytes != math.prod(shape) * itemsize or offset + nbytes > len(data):
            raise StateError(f"state array {i}: {nbytes!r} bytes do not hold shape {shape} of {dtype} within the payload")
        array = np.frombuffer(data[offset : offset + nbytes], dtype=np.dtype(dtype)).reshape(shape)
        # Booleans other than 0 and 1 would be bytes no numpy code ever wrote.
        out.append(array.view(np.uint8) != 0 if dtype == "|b1" else array.copy())
        end = offset + nbytes
    if end != len(data):
        raise StateError(f"state payload has {len(data) - end} bytes after its arrays")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unpack(node: Any, arrays: list[np.ndarray], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise StateError(f"state nested deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        if set(map(type, node)) <= _JSON_SCALARS:
            return node
        return [_unpack(v, arrays, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise StateError(f"state manifest holds a {type(node).__name__}")
    tag = next(iter(node), None)
    if len(node) != 1 or tag is None or not tag.startswith("$"):
        if any(k.startswith("$") for k in node):
            raise StateError("state manifest: a '$' key inside a plain object")
        return {k: _unpack(v, arrays, depth + 1) for k, v in node.items()}
    body = node[tag]
    if tag in ("$a", "$b"):
        if not _is_int(body) or not 0 <= body < len(arrays):
            raise StateError(f"state manifest refers to array {body!r} of {len(arrays)}")
        array = arrays[body]
        if tag == "$a":
            return array
        if array.dtype != np.uint8 or array.ndim != 1:
            raise StateError("state manifest: bytes stored with another dtype or shape")
        return array.tobytes()
    if tag == "$f":
        if body not in _NON_FINITE:
            raise StateError(f"state manifest: unknown float {body!r}")
        return _NON_FINITE[body]
    if tag == "$t" and isinstance(body, list):
        return tuple(_unpack(v, arrays, depth + 1) for v in body)
    if tag == "$d" and isinstance(body, list):
        out = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise StateError("state manifest: malformed dict entry")
            key = _unpack(pair[0], arrays, depth + 1)
            if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                raise StateError(f"state manifest: a dict key of type {type(key).__name__}")
            try:
                out[key] = _unpack(pair[1], arrays, depth + 1)
            except TypeError as exc:  # an unhashable tuple key
                raise StateError(f"state manifest: bad dict key: {exc}") from None
        return out
    raise StateError(f"state manifest: unknown tag {tag!r}")
