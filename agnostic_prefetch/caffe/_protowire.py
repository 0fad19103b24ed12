"""The Protocol Buffers wire format: the few primitives Caffe's records need, no generated code.

Caffe's records (``Datum``, ``BlobProto``) are tiny proto2 messages. Reading them with a
hand-written walker keeps workers free of generated code and lets large ``bytes`` fields
stay zero-copy views into LMDB's memory map until the caller decodes them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "VARINT",
    "I64",
    "LEN",
    "I32",
    "WireError",
    "fields",
    "read_varint",
    "read_field",
    "unpacked_float_run",
    "as_int32",
    "encode_varint",
    "encode_key",
    "encode_varint_field",
    "encode_len_field",
    "encode_packed_floats",
    "encode_unpacked_floats",
    "decode_floats",
]

VARINT, I64, LEN, I32 = 0, 1, 2, 5

class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message (truncated or corrupt)."""


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def read_field(view: memoryview, pos: int) -> tuple[int, int, int, int, int]:
    """Read the field starting at ``pos``: ``(number, wire_type, a, b, next_pos)``.

    For ``VARINT`` ``a`` is the value; for ``LEN``, ``I32`` and ``I64`` ``[a, b)`` is the
    payload's byte span (length-delimited payloads are skipped, never copied).
    """
    end = len(view)
    key, pos = read_varint(view, pos)
    number, wire_type = key >> 3, key & 7
    if number == 0:
        raise WireError(f"field number 0 before byte {pos}")
    if wire_type == VARINT:
        value, pos = read_varint(view, pos)
        return number, wire_type, value, pos, pos
    if wire_type == LEN:
        length, pos = read_varint(view, pos)
        if pos + length > end:
            raise WireError(f"field {number} claims {length} bytes, only {end - pos} left")
        return number, wire_type, pos, pos + length, pos + length
    if wire_type in (I32, I64):
        size = 4 if wire_type == I32 else 8
        if pos + size > end:
            raise WireError(f"truncated fixed-width field {number}")
        return number, wire_type, pos, pos + size, pos + size
    # groups (3, 4) are not used by any Caffe record
    raise WireError(f"unsupported wire type {wire_type} for field {number}")


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """Walk a message: yield ``(field_number, wire_type, a, b)`` per field occurrence."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        number, wire_type, a, b, pos = read_field(view, pos)
        yield number, wire_type, a, b


def unpacked_float_run(view: memoryview, pos: int, number: int) -> tuple[np.ndarray, int]:
    """Read a run of unpacked ``repeated float`` fields starting at the key at ``pos``.

    proto2 writes ``repeated float`` without ``packed`` as key + 4 bytes per value (Caffe's
    ``Datum.float_data``). Walking that one value at a time in Python would cost a loop
    iteration per pixel, so the run is found with vectorised looks at 5-byte records, in
    windows that double: each look costs at most twice the run it finds, so a message of many
    short runs (hostile bytes) costs time in proportion to its length, not its square.
    Only single-byte keys (field numbers below 16) take this path.
    """
    key = (number << 3) | I32
    assert key < 0x80
    total = (len(view) - pos) // 5
    run, window = 0, 1
    while run < total:
        n = min(window, total - run)
        keys = np.frombuffer(view[pos + 5 * run : pos + 5 * (run + n)], dtype=np.uint8)[::5]
        other = keys != key
        if other.any():
            run += int(np.argmax(other))
            break
        run, window = run + n, window * 2
    records = np.frombuffer(view[pos : pos + 5 * run], dtype=np.uint8).reshape(run, 5)
    values = records[:, 1:].copy().view("<f4").reshape(-1)
    return values, pos + 5 * run


def as_int32(value: int) -> int:
    """A varint read as protobuf ``int32``: the low 32 bits, two's complement."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def encode_varint(value: int) -> bytes:
    """Encode an integer as a varint; negatives as 64-bit two's complement (10 bytes), as protobuf does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_key(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_key(number, VARINT) + encode_varint(int(value))


def encode_len_field(number: int, payload: bytes | memoryview) -> bytes:
    return encode_key(number, LEN) + encode_varint(len(payload)) + bytes(payload)


def encode_packed_floats(number: int, values: np.ndarray) -> bytes:
    return encode_len_field(number, np.asarray(values, dtype="<f4").tobytes())


def encode_unpacked_floats(number: int, values: np.ndarray) -> bytes:
    """One key + 4 bytes per value: how proto2 writes a ``repeated float`` without ``packed``."""
    key = encode_key(number, I32)
    raw = np.asarray(values, dtype="<f4").tobytes()
    return b"".join(key + raw[i : i + 4] for i in range(0, len(raw), 4))


def decode_floats(buf: memoryview, wire_type: int, a: int, b: int, dtype: str = "<f4") -> np.ndarray:
    """The values of one occurrence of a repeated float/double field (packed or single)."""
    itemsize = np.dtype(dtype).itemsize
    if wire_type == LEN and (b - a) % itemsize:
        raise WireError(f"packed field of {b - a} bytes is not a multiple of {itemsize}")
    return np.frombuffer(buf[a:b], dtype=dtype)
