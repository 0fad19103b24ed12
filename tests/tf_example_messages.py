"""tf.train.Example message classes for the tests, built by the protobuf runtime from a
descriptor written here (as tensorflow/core/example/feature.proto declares them): one set
with packed repeated numbers (the proto's own), one with them unpacked (field by field on
the wire), so our parser meets both encodings."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


@functools.cache
def example_classes(packed: bool = True) -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    package = "tfex_packed" if packed else "tfex_unpacked"
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")

    def message(name: str, *fields: tuple[str, int, int, int, str | None]) -> descriptor_pb2.DescriptorProto:
        m = file.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = f".{package}.{type_name}"
            if ftype in (F.TYPE_FLOAT, F.TYPE_INT64):
                f.options.packed = packed
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, rep, None))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None))
    message("Int64List", ("value", 1, F.TYPE_INT64, rep, None))
    feature = message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, "BytesList"),
                      ("float_list", 2, F.TYPE_MESSAGE, opt, "FloatList"),
                      ("int64_list", 3, F.TYPE_MESSAGE, opt, "Int64List"))
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", ("feature", 1, F.TYPE_MESSAGE, rep, "Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=f".{package}.Feature")
    message("Example", ("features", 1, F.TYPE_MESSAGE, opt, "Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")}


def build_example(features: dict[str, tuple[str, list[Any]]], *, packed: bool = True) -> bytes:
    """A serialized Example: ``features`` maps a name to ("bytes"|"float"|"int64", values)."""
    c = example_classes(packed)
    ex = c["Example"]()
    for name, (kind, values) in features.items():
        lists = {"bytes": "bytes_list", "float": "float_list", "int64": "int64_list"}
        getattr(ex.features.feature[name], lists[kind]).value.extend(values)
    return ex.SerializeToString()


def reference_items(data: bytes) -> dict[str, Any]:
    """What the protobuf runtime reads from ``data``, in our item layout."""
    ex = example_classes(True)["Example"].FromString(bytes(data))
    out: dict[str, Any] = {}
    for name in sorted(ex.features.feature):
        feature = ex.features.feature[name]
        kind = feature.WhichOneof("kind")
        if kind == "float_list":
            out[name] = np.array(feature.float_list.value, np.float32)
        elif kind == "int64_list":
            out[name] = np.array(feature.int64_list.value, np.int64)
        else:
            out[name] = list(feature.bytes_list.value) if kind else []
    return out


def assert_items_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            assert isinstance(got[name], np.ndarray) and got[name].dtype == value.dtype and got[name].ndim == 1
            np.testing.assert_array_equal(got[name], value)
        else:
            assert got[name] == value
