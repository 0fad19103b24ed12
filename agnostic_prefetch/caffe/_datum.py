"""Caffe's records on the wire: ``Datum`` (one image + label) and ``BlobProto`` (a mean image).

Field numbers are caffe.proto's (proto2)::

    message Datum { optional int32 channels = 1; optional int32 height = 2;
                    optional int32 width = 3; optional bytes data = 4;
                    optional int32 label = 5; repeated float float_data = 6;
                    optional bool encoded = 7 [default = false]; }
    message BlobShape { repeated int64 dim = 1 [packed = true]; }
    message BlobProto { optional int32 num = 1; channels = 2; height = 3; width = 4;
                        repeated float data = 5 [packed = true]; diff = 6 [packed];
                        optional BlobShape shape = 7; repeated double double_data = 8 [packed]; }

Writing follows what Caffe's C++ serializer emits (fields in number order, ``encoded``
always present), so a database written here reads in Caffe; reading accepts anything a
protobuf encoder may legally produce (any field order, repeats, packed or unpacked floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agnostic_prefetch.caffe._protowire import (
    I32,
    LEN,
    VARINT,
    WireError,
    as_int32,
    decode_floats,
    encode_len_field,
    encode_packed_floats,
    encode_unpacked_floats,
    encode_varint_field,
    read_field,
    read_varint,
    unpacked_float_run,
)

__all__ = ["Datum", "decode_datum", "encode_datum", "decode_blobproto", "encode_blobproto"]


@dataclass
class Datum:
    """One decoded ``Datum``. ``data`` may be a view into the caller's buffer (not a copy)."""

    channels: int = 0
    height: int = 0
    width: int = 0
    data: bytes | memoryview = b""
    label: int = 0
    float_data: np.ndarray | None = None
    encoded: bool = False


def _expect(number: int, wire_type: int, want: int, message: str) -> None:
    if wire_type != want:
        raise WireError(f"{message} field {number} has wire type {wire_type}, expected {want}")


def _float_field(view: memoryview, number: int, wire_type: int, start: int, a: int, b: int,
                 pos: int, message: str) -> tuple[np.ndarray, int]:
    """A repeated float field's values (packed, or a run of unpacked ones) and the next position."""
    if wire_type == I32:
        return unpacked_float_run(view, start, number)
    _expect(number, wire_type, LEN, message)
    return decode_floats(view, wire_type, a, b).copy(), pos


def decode_datum(buf: bytes | memoryview) -> Datum:
    """Parse a serialized Caffe ``Datum``.

    Raises:
        WireError: the bytes are not a well-formed Datum.
    """
    view = memoryview(buf)
    datum = Datum()
    floats: list[np.ndarray] = []
    pos = 0
    end = len(view)
    while pos < end:
        start = pos
        number, wire_type, a, b, pos = read_field(view, pos)
        if number in (1, 2, 3, 5, 7):
            _expect(number, wire_type, VARINT, "Datum")
            if number == 1:
                datum.channels = as_int32(a)
            elif number == 2:
                datum.height = as_int32(a)
            elif number == 3:
                datum.width = as_int32(a)
            elif number == 5:
                datum.label = as_int32(a)
            else:
                datum.encoded = a != 0
        elif number == 4:
            _expect(number, wire_type, LEN, "Datum")
            datum.data = view[a:b]  # a later occurrence replaces an earlier one, as in protobuf
        elif number == 6:
            values, pos = _float_field(view, number, wire_type, start, a, b, pos, "Datum")
            floats.append(values)
        # other field numbers: unknown fields, skipped as protobuf does
    if floats:
        datum.float_data = np.concatenate(floats).astype(np.float32, copy=False)
    return datum


def encode_datum(datum: Datum) -> bytes:
    """Serialize a ``Datum`` the way Caffe's ``convert_imageset`` does.

    A raw datum carries channels/height/width; an encoded one (``encoded=True``) carries
    only the file bytes and the label, as Caffe's ``ReadFileToDatum`` writes it.
    """
    parts = []
    if not datum.encoded:
        parts += [
            encode_varint_field(1, datum.channels),
            encode_varint_field(2, datum.height),
            encode_varint_field(3, datum.width),
        ]
    if len(datum.data) or datum.float_data is None:
        parts.append(encode_len_field(4, datum.data))
    parts.append(encode_varint_field(5, datum.label))
    if datum.float_data is not None and len(datum.float_data):
        # caffe.proto declares float_data without [packed = true]: proto2 writes it unpacked
        parts.append(encode_unpacked_floats(6, datum.float_data))
    parts.append(encode_varint_field(7, int(datum.encoded)))
    return b"".join(parts)


def decode_blobproto(buf: bytes | memoryview) -> np.ndarray:
    """A ``BlobProto``'s data as float32, shaped by ``shape`` or else by (num, channels, height, width).

    Raises:
        WireError: malformed bytes, or a data length that does not match the shape.
    """
    view = memoryview(buf)
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    dims: list[int] | None = None
    data: list[np.ndarray] = []
    pos = 0
    while pos < len(view):
        start = pos
        number, wire_type, a, b, pos = read_field(view, pos)
        if number in legacy:
            _expect(number, wire_type, VARINT, "BlobProto")
            legacy[number] = as_int32(a)
        elif number == 5:
            values, pos = _float_field(view, number, wire_type, start, a, b, pos, "BlobProto")
            data.append(values)
        elif number == 8:
            _expect(number, wire_type, LEN, "BlobProto")
            with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, as Caffe's cast gives
                data.append(decode_floats(view, wire_type, a, b, "<f8").astype(np.float32))
        elif number == 7:
            _expect(number, wire_type, LEN, "BlobProto")
            dims = _blobshape_dims(view[a:b])
    values = np.concatenate(data) if data else np.zeros(0, np.float32)
    shape = tuple(dims) if dims is not None else tuple(legacy[k] for k in (1, 2, 3, 4))
    # Python's products: numpy's would wrap around 2**63 and let a corrupt shape match the
    # values; and numpy refuses a shape whose nonzero dimensions multiply past its index range
    if (min(shape, default=0) < 0 or len(shape) > 32 or math.prod(shape) != values.size
            or math.prod(max(d, 1) for d in shape) >= 1 << 60):
        raise WireError(f"BlobProto has {values.size} values but its shape is {shape} "
                        "(at most 32 dimensions, none negative, their product the number of values)")
    return values.astype(np.float32, copy=False).reshape(shape)


def _blobshape_dims(view: memoryview) -> list[int]:
    dims: list[int] = []
    pos = 0
    while pos < len(view):
        number, wire_type, a, b, pos = read_field(view, pos)
        if number != 1:
            continue
        if wire_type == VARINT:
            dims.append(a)
        else:
            _expect(number, wire_type, LEN, "BlobShape")
            inner = view[a:b]
            p = 0
            while p < len(inner):
                # packed int64 values are plain varints back to back
                value, p = read_varint(inner, p)
                dims.append(value)
    return dims


def encode_blobproto(array: np.ndarray) -> bytes:
    """Serialize a C×H×W (or N×C×H×W) float array as a Caffe ``BlobProto`` (a ``.binaryproto``).

    The bytes are those Caffe's ``compute_image_mean`` writes: ``num``, ``channels``,
    ``height``, ``width`` and the packed ``data``, in field order, and no ``shape``.
    """
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"a BlobProto mean is C×H×W or N×C×H×W, got shape {arr.shape}")
    n, c, h, w = arr.shape
    return b"".join(
        [
            encode_varint_field(1, n),
            encode_varint_field(2, c),
            encode_varint_field(3, h),
            encode_varint_field(4, w),
            encode_packed_floats(5, arr.reshape(-1)),
        ]
    )
