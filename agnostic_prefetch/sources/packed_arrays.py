"""Packed-array records: a dict of numeric arrays as one self-describing byte string, never pickle.

Our value format for LMDB entries that are not Caffe Datums. Not Google's ArrayRecord file
format (Grain's): that one is read by :class:`~agnostic_prefetch.ArrayRecordSource`.

Layout::

    MAGIC (8 bytes) | header length (uint32 little-endian) | header (UTF-8 JSON) | payload

The header lists each field's name, dtype (numpy ``dtype.str``, numeric kinds only), shape,
and byte span in the payload. The magic starts with a zero byte, which can never start a
protobuf message (field number 0 is invalid), so one database can be told apart from a
Caffe ``Datum`` database by its first byte.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MAGIC", "RecordError", "is_array_record", "encode_record", "decode_record"]

MAGIC = b"\x00APREC1\n"
_ALIGN = 16  # payload offsets aligned so each field can be viewed without a copy
_KINDS = set("biufc")  # bool, signed, unsigned, float, complex: fixed-size, no Python objects


class RecordError(ValueError):
    """Bytes that are not a valid array record, or a value that cannot be stored as one."""


def is_array_record(buf: bytes | memoryview) -> bool:
    return bytes(buf[: len(MAGIC)]) == MAGIC


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialize a flat dict of numeric arrays/scalars.

    Raises:
        RecordError: a non-string name or a value with a non-numeric dtype (strings, objects).
    """
    fields = []
    chunks = []
    offset = 0
    for name, value in record.items():
        if not isinstance(name, str):
            raise RecordError(f"array record field names must be strings, got {name!r}")
        arr = np.asarray(value)  # tobytes() below writes C order whatever the strides
        if arr.dtype.kind not in _KINDS or arr.dtype.fields is not None:
            raise RecordError(
                f"field {name!r} has dtype {arr.dtype}; array records hold numeric arrays only "
                "(bool, int, uint, float, complex)"
            )
        pad = -offset % _ALIGN
        chunks.append(b"\x00" * pad)
        offset += pad
        data = arr.tobytes()
        fields.append(
            {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"fields": fields}, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_record(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Parse an array record into a dict of (copied, writable) numpy arrays.

    Raises:
        RecordError: wrong magic, a corrupt header, or spans outside the payload.
    """
    view = memoryview(buf)
    if not is_array_record(view):
        raise RecordError("not an array record (missing magic)")
    start = len(MAGIC) + 4
    if len(view) < start:
        raise RecordError("array record truncated before its header")
    (header_len,) = struct.unpack_from("<I", view, len(MAGIC))
    if start + header_len > len(view):
        raise RecordError(f"array record header claims {header_len} bytes, record is {len(view)}")
    try:
        header = json.loads(bytes(view[start : start + header_len]))
        specs = header["fields"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: [[[[...
        raise RecordError(f"array record header is not valid: {exc}") from None
    payload = view[start + header_len :]
    out: dict[str, np.ndarray] = {}
    end = 0  # fields lie in the payload in order, apart: their copies hold no more than it
    for spec in specs:
        try:
            name, dtype = str(spec["name"]), np.dtype(str(spec["dtype"]))
            shape = tuple(int(d) for d in spec["shape"])
            offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: Infinity
            raise RecordError(f"array record field spec {spec!r} is not valid: {exc}") from None
        if dtype.kind not in _KINDS or dtype.fields is not None:
            raise RecordError(f"field {name!r} has dtype {dtype}; only numeric dtypes are allowed")
        # Python's products: numpy's wrap around 2**63; numpy takes at most 32 dimensions, whose
        # nonzero ones multiply to less than its index range
        if (len(shape) > 32 or any(d < 0 for d in shape) or nbytes != math.prod(shape) * dtype.itemsize
                or math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 1 << 60):
            raise RecordError(f"field {name!r}: {nbytes} bytes do not fit shape {shape} of {dtype}")
        if offset < end or offset + nbytes > len(payload):
            raise RecordError(f"field {name!r} spans bytes {offset}..{offset + nbytes} of a payload of "
                              f"{len(payload)}, overlapping the field before (ending at {end}) or past the end")
        end = offset + nbytes
        out[name] = np.frombuffer(payload[offset : offset + nbytes], dtype=dtype).reshape(shape).copy()
    return out
