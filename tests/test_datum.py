"""Caffe Datum / BlobProto wire format, checked against the protobuf runtime as an independent encoder."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostic_prefetch.caffe._datum import (
    Datum,
    decode_blobproto,
    decode_datum,
    encode_blobproto,
    encode_datum,
)
from agnostic_prefetch.caffe._protowire import WireError, encode_packed_floats

F = descriptor_pb2.FieldDescriptorProto


@functools.cache
def caffe_messages() -> dict[str, type]:
    """Datum, BlobShape and BlobProto classes built from caffe.proto's published field numbers."""
    fdp = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="caffe", syntax="proto2")
    datum = fdp.message_type.add(name="Datum")
    for name, number, kind, label in [
        ("channels", 1, F.TYPE_INT32, F.LABEL_OPTIONAL),
        ("height", 2, F.TYPE_INT32, F.LABEL_OPTIONAL),
        ("width", 3, F.TYPE_INT32, F.LABEL_OPTIONAL),
        ("data", 4, F.TYPE_BYTES, F.LABEL_OPTIONAL),
        ("label", 5, F.TYPE_INT32, F.LABEL_OPTIONAL),
        ("float_data", 6, F.TYPE_FLOAT, F.LABEL_REPEATED),
        ("encoded", 7, F.TYPE_BOOL, F.LABEL_OPTIONAL),
    ]:
        datum.field.add(name=name, number=number, type=kind, label=label)
    shape = fdp.message_type.add(name="BlobShape")
    shape.field.add(name="dim", number=1, type=F.TYPE_INT64, label=F.LABEL_REPEATED).options.packed = True
    blob = fdp.message_type.add(name="BlobProto")
    blob.field.add(name="shape", number=7, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".caffe.BlobShape")
    for name, number in [("data", 5), ("diff", 6)]:
        blob.field.add(name=name, number=number, type=F.TYPE_FLOAT, label=F.LABEL_REPEATED).options.packed = True
    blob.field.add(name="double_data", number=8, type=F.TYPE_DOUBLE, label=F.LABEL_REPEATED).options.packed = True
    for name, number in [("num", 1), ("channels", 2), ("height", 3), ("width", 4)]:
        blob.field.add(name=name, number=number, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{n}")) for n in ("Datum", "BlobShape", "BlobProto")}


int32s = st.integers(min_value=-(2**31), max_value=2**31 - 1)
float32s = st.floats(width=32, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(channels=int32s, height=int32s, width=int32s, data=st.binary(max_size=300), label=int32s, encoded=st.booleans())
def test_datum_from_protobuf_decodes_to_the_same_fields(channels, height, width, data, label, encoded):
    msg = caffe_messages()["Datum"](channels=channels, height=height, width=width, data=data, label=label, encoded=encoded)
    got = decode_datum(msg.SerializeToString())
    assert (got.channels, got.height, got.width, bytes(got.data), got.label, got.encoded) == (
        channels, height, width, data, label, encoded,
    )  # fmt: skip
    assert got.float_data is None


@settings(max_examples=200, deadline=None)
@given(c=st.integers(0, 4), h=st.integers(0, 64), w=st.integers(0, 64), data=st.binary(max_size=200), label=int32s, encoded=st.booleans())
def test_our_encoding_parses_in_protobuf_to_the_same_fields(c, h, w, data, label, encoded):
    raw = encode_datum(Datum(channels=c, height=h, width=w, data=data, label=label, encoded=encoded))
    msg = caffe_messages()["Datum"].FromString(raw)
    assert (msg.data, msg.label, msg.encoded) == (data, label, encoded)
    if not encoded:
        assert (msg.channels, msg.height, msg.width) == (c, h, w)
    assert decode_datum(raw).label == label


@settings(max_examples=100, deadline=None)
@given(values=st.lists(float32s, max_size=400), label=int32s)
def test_float_data_round_trips_unpacked_and_packed(values, label):
    expected = np.array(values, dtype=np.float32)
    ours = encode_datum(Datum(channels=1, height=1, width=len(values), label=label, float_data=expected))
    theirs = caffe_messages()["Datum"].FromString(ours)
    np.testing.assert_array_equal(np.array(theirs.float_data, np.float32), expected)
    # protobuf writes proto2 repeated floats unpacked; a packed encoding must read the same
    if values:
        np.testing.assert_array_equal(decode_datum(theirs.SerializeToString()).float_data, expected)
        np.testing.assert_array_equal(decode_datum(encode_packed_floats(6, expected)).float_data, expected)


def test_float_data_split_over_several_runs_concatenates():
    msg = caffe_messages()["Datum"](float_data=[1.0, 2.0], label=3)
    raw = msg.SerializeToString() + caffe_messages()["Datum"](float_data=[4.0]).SerializeToString()
    datum = decode_datum(raw)
    np.testing.assert_array_equal(datum.float_data, [1.0, 2.0, 4.0])
    assert datum.label == 3  # concatenated messages merge: the second has no label to override it


def test_raw_datum_bytes_equal_what_protobuf_writes_with_encoded_set():
    msg = caffe_messages()["Datum"](channels=3, height=2, width=1, data=b"abcdef", label=7, encoded=False)
    assert encode_datum(Datum(3, 2, 1, b"abcdef", 7)) == msg.SerializeToString()


def test_encoded_datum_omits_dimensions_like_caffe_read_file_to_datum():
    msg = caffe_messages()["Datum"].FromString(encode_datum(Datum(data=b"\xff\xd8jpeg", label=2, encoded=True)))
    assert not msg.HasField("channels") and not msg.HasField("height") and msg.encoded


def test_unknown_fields_are_skipped():
    raw = encode_datum(Datum(1, 1, 1, b"x", 5)) + b"\x48\x01" + b"\x52\x02hi"  # fields 9 (varint), 10 (bytes)
    assert decode_datum(raw).label == 5


@pytest.mark.parametrize("raw", [b"\x08", b"\x22\x05ab", b"\x00\x01", b"\x0b", b"\x35\x00\x00"])
def test_malformed_bytes_raise_wire_error(raw):
    with pytest.raises(WireError):
        decode_datum(raw)


@settings(max_examples=50, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**31))
def test_blobproto_round_trips_through_protobuf(shape, seed):
    mean = np.random.default_rng(seed).normal(100, 30, size=shape).astype(np.float32)
    ours = encode_blobproto(mean)
    theirs = caffe_messages()["BlobProto"].FromString(ours)
    assert (theirs.num, theirs.channels, theirs.height, theirs.width) == (1, *shape)
    assert not theirs.HasField("shape")  # as compute_image_mean writes it
    as_caffe = caffe_messages()["BlobProto"](num=1, channels=shape[0], height=shape[1], width=shape[2],
                                            data=mean.reshape(-1).tolist())
    assert ours == as_caffe.SerializeToString()
    np.testing.assert_array_equal(np.array(theirs.data, np.float32).reshape(1, *shape), mean[None])
    np.testing.assert_array_equal(decode_blobproto(theirs.SerializeToString()), mean[None])


def test_blobproto_with_only_legacy_dimensions_and_double_data():
    blob = caffe_messages()["BlobProto"](num=1, channels=2, height=1, width=2, double_data=[1, 2, 3, 4])
    np.testing.assert_array_equal(decode_blobproto(blob.SerializeToString()), np.arange(1, 5, dtype=np.float32).reshape(1, 2, 1, 2))


def test_blobproto_with_wrong_count_is_an_error():
    blob = caffe_messages()["BlobProto"](num=1, channels=1, height=2, width=2, data=[1, 2, 3])
    with pytest.raises(WireError, match="3 values"):
        decode_blobproto(blob.SerializeToString())
