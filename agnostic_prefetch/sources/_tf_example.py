"""``tf.train.Example`` messages parsed from their protobuf wire format, without TensorFlow.

The schema (tensorflow/core/example/{example,feature}.proto)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }   // entries: key = 1, value = 2
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

Parsed as the protobuf runtime merges: repeated values may come packed or one by one (and
both, concatenated); a repeated ``features`` or ``value`` message merges into the earlier
one; a later map entry with the same key replaces the earlier; a later oneof member
replaces another member; unknown fields are skipped. Every length is checked against the
bytes that remain before anything is sliced, so a corrupt length never allocates more
than the input holds.

Example:
    >>> data = bytes.fromhex("0a170a150a017812101a0e0a0c0102ffffffffffffffffff01")
    >>> parse_example(data)
    {'x': array([ 1,  2, -1])}
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ExampleParseError", "parse_example"]


class ExampleParseError(ValueError):
    """Bytes that are not a valid ``tf.train.Example``; ``offset`` is where in them it failed."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"not a valid tf.train.Example at byte {offset}: {message}")
        self.offset = offset


_BYTES, _FLOAT, _INT64 = 1, 2, 3


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (at most 10 bytes, kept to 64 bits) and the position after it."""
    value = shift = 0
    start = pos
    while pos < end and pos - start < 10:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    if pos >= end:
        raise ExampleParseError("a varint runs past the end of its message", start)
    raise ExampleParseError("a varint longer than 10 bytes", start)


def _fields(data: bytes, pos: int, end: int):
    """(field number, wire type, value, offset) of each field in ``data[pos:end]``: a LEN field's
    value is its (start, stop), a varint's its int, a fixed32's its 4 bytes' position."""
    while pos < end:
        at = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ExampleParseError("a field number 0", at)
        if wire == 0:
            value, pos = _varint(data, pos, end)
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise ExampleParseError(f"a field says it holds {length} bytes, {end - pos} remain", at)
            value, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if size > end - pos:
                raise ExampleParseError(f"a {size}-byte field with {end - pos} bytes left", at)
            value, pos = pos, pos + size
        else:
            raise ExampleParseError(f"wire type {wire} (field {number}), which Example never uses", at)
        yield number, wire, value, at


def _packed_varints(data: bytes, start: int, stop: int) -> np.ndarray:
    """The int64 values of a packed varint run (two's complement, as protobuf's int64)."""
    if stop - start < 32:
        values = []
        pos = start
        while pos < stop:
            value, pos = _varint(data, pos, stop)
            values.append(value)
        return np.array(values, np.uint64).view(np.int64)
    raw = np.frombuffer(data, np.uint8, stop - start, start)
    ends = np.flatnonzero(raw < 0x80)
    if not len(ends) or ends[-1] != len(raw) - 1:
        raise ExampleParseError("a packed varint runs past the end of its list", start)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if int((ends - starts).max()) >= 10:
        bad = int(starts[np.argmax(ends - starts)])
        raise ExampleParseError("a varint longer than 10 bytes", start + bad)
    within = np.arange(len(raw)) - np.repeat(starts, ends - starts + 1)
    # 7-bit groups never overlap, so their sum is their bitwise or; bits past 64 wrap away
    groups = (raw & 0x7F).astype(np.uint64) << (within * 7).astype(np.uint64)
    return np.add.reduceat(groups, starts).view(np.int64)


class _Feature:
    """One feature's value as it is merged: its kind and the parts of its list."""

    __slots__ = ("kind", "parts")

    def __init__(self) -> None:
        self.kind, self.parts = 0, []

    def merge(self, data: bytes, start: int, stop: int) -> None:
        for number, wire, value, at in _fields(data, start, stop):
            if number not in (_BYTES, _FLOAT, _INT64):
                continue
            if wire != 2:
                raise ExampleParseError(f"Feature field {number} has wire type {wire}, not a message", at)
            if number != self.kind:
                self.kind, self.parts = number, []
            self.parts += _list_values(data, number, *value)

    def value(self) -> Any:
        if self.kind == _BYTES:
            return self.parts
        if self.kind == 0:
            return []
        dtype = np.float32 if self.kind == _FLOAT else np.int64
        if len(self.parts) == 1 and isinstance(self.parts[0], np.ndarray):
            return self.parts[0]
        return np.concatenate([np.asarray(p, dtype).reshape(-1) for p in self.parts] or [np.empty(0, dtype)])


def _list_values(data: bytes, kind: int, start: int, stop: int) -> list[Any]:
    """The values of a BytesList, FloatList or Int64List message, in parts to concatenate."""
    parts: list[Any] = []
    # values written one by one (unpacked) gather here and become one array per run: an array
    # per value would cost ~100 bytes of object for each 2 to 5 bytes of input
    single: list[int] = []  # int64 values, or the positions of float values

    def end_run() -> None:
        if single and kind == _FLOAT:
            at = np.array(single, np.int64)[:, None] + np.arange(4)
            parts.append(np.frombuffer(data, np.uint8)[at].view("<f4").reshape(-1).astype(np.float32))
        elif single:
            parts.append(np.array(single, np.uint64).view(np.int64))
        single.clear()

    for number, wire, value, at in _fields(data, start, stop):
        if number != 1:
            continue
        if kind == _BYTES:
            if wire != 2:
                raise ExampleParseError(f"a bytes value with wire type {wire}", at)
            parts.append(data[value[0]:value[1]])
        elif kind == _FLOAT:
            if wire == 5:
                single.append(value)
            elif wire == 2:
                if (value[1] - value[0]) % 4:
                    raise ExampleParseError(f"a packed float list of {value[1] - value[0]} bytes, "
                                            "not a multiple of 4", at)
                end_run()
                parts.append(np.frombuffer(data, "<f4", (value[1] - value[0]) // 4, value[0]).astype(np.float32))
            else:
                raise ExampleParseError(f"a float value with wire type {wire}", at)
        elif wire == 0:
            single.append(value)
        elif wire == 2:
            end_run()
            parts.append(_packed_varints(data, *value))
        else:
            raise ExampleParseError(f"an int64 value with wire type {wire}", at)
    end_run()
    return parts


def parse_example(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The features of a serialized ``tf.train.Example``, sorted by name.

    ``int64_list`` becomes a 1-D int64 array, ``float_list`` a 1-D float32 array,
    ``bytes_list`` a list of bytes, and a feature with no list set an empty list.

    Raises:
        ExampleParseError: (a ValueError) bytes that are no valid Example, naming the offset.
    """
    data = bytes(data)
    features: dict[bytes, _Feature] = {}
    for number, wire, value, at in _fields(data, 0, len(data)):
        if number != 1:
            continue
        if wire != 2:
            raise ExampleParseError(f"Example.features with wire type {wire}", at)
        for entry_number, entry_wire, entry, entry_at in _fields(data, *value):
            if entry_number != 1:
                continue
            if entry_wire != 2:
                raise ExampleParseError(f"a feature map entry with wire type {entry_wire}", entry_at)
            key, feature = b"", _Feature()
            for part, (start, stop) in _entry_fields(data, *entry):
                if part == 1:
                    key = data[start:stop]
                else:
                    feature.merge(data, start, stop)
            features[key] = feature
    out: dict[str, Any] = {}
    for key in sorted(features):
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ExampleParseError(f"a feature name that is not UTF-8: {key!r}", 0) from None
        out[name] = features[key].value()
    return out


def _entry_fields(data: bytes, start: int, stop: int):
    """The key (1) and value (2) fields of a map entry; others are skipped."""
    for number, wire, value, at in _fields(data, start, stop):
        if number in (1, 2):
            if wire != 2:
                raise ExampleParseError(f"a feature map {'key' if number == 1 else 'value'} with "
                                        f"wire type {wire}", at)
            yield number, value
