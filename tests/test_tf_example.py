"""tf.train.Example parsed by our wire reader equals the protobuf runtime; CRC-32C equals a
third-party implementation."""

from __future__ import annotations

import crc32c as reference_crc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tf_example_messages import assert_items_equal, build_example, example_classes, reference_items

from agnostic_prefetch.sources._crc32c import crc32c, masked_crc32c
from agnostic_prefetch.sources._tf_example import ExampleParseError, parse_example

values = st.one_of(
    st.tuples(st.just("int64"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)),
    st.tuples(st.just("float"), st.lists(st.floats(width=32, allow_nan=True), max_size=20)),
    st.tuples(st.just("bytes"), st.lists(st.binary(max_size=12), max_size=5)),
)
features = st.dictionaries(st.text(max_size=6), values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(features=features, packed=st.booleans())
def test_parsed_example_equals_the_protobuf_runtimes_packed_or_not(features, packed):
    data = build_example(features, packed=packed)
    assert_items_equal(parse_example(data), reference_items(data))


@settings(max_examples=100, deadline=None)
@given(first=features, second=features)
def test_concatenated_examples_merge_as_the_protobuf_runtime_merges(first, second):
    # a repeated message field merges: same keys are replaced, lists of one kind concatenate
    data = build_example(first) + build_example(second, packed=False)
    assert_items_equal(parse_example(data), reference_items(data))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_parse_or_raise_example_parse_error(data):
    try:
        parse_example(data)
    except ExampleParseError as exc:
        assert isinstance(exc, ValueError) and 0 <= exc.offset <= len(data)


@settings(max_examples=100, deadline=None)
@given(features=features.filter(bool), cut=st.integers(1, 1000))
def test_a_truncated_example_raises_naming_an_offset(features, cut):
    data = build_example(features)
    short = data[: max(0, len(data) - cut)]
    try:
        got = parse_example(short)
    except ExampleParseError as exc:
        assert "at byte" in str(exc)
    else:  # a cut at a field boundary is a shorter valid message, as for protobuf
        assert_items_equal(got, reference_items(short))


def test_a_huge_length_is_refused_without_allocating_it():
    # features field saying 2**62 bytes follow
    data = b"\x0a" + bytes([0x80] * 8 + [0x40]) + b"\x00" * 4
    with pytest.raises(ExampleParseError, match=r"at byte 0: a field says it holds 4611686018427387904 bytes, 4 remain"):
        parse_example(data)


def test_an_eleven_byte_varint_is_malformed():
    with pytest.raises(ExampleParseError, match="longer than 10 bytes"):
        parse_example(b"\x08" + b"\xff" * 11 + b"\x01")


def test_a_long_packed_int64_list_decodes_negatives_as_ten_byte_varints():
    values = [-1, 0, 2**63 - 1, -(2**63), 127, 128, 300] * 20
    data = build_example({"x": ("int64", values)})
    np.testing.assert_array_equal(parse_example(data)["x"], np.array(values, np.int64))
    assert example_classes()["Example"].FromString(data).features.feature["x"].int64_list.value == values


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000), st.integers(0, 70_000).map(lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256))))
def test_crc32c_equals_the_crc32c_package(data):
    assert crc32c(data) == reference_crc.crc32c(data)


def test_masked_crc_of_the_tfrecord_spec():
    crc = reference_crc.crc32c(b"abc")
    assert masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
