"""The parts of caffe.proto that a prototxt's data layers need, as protobuf messages built at
run time (no generated code, no .proto file shipped): the protobuf runtime parses the text
format against them, strictly for data layers.

Field names, types and defaults are Caffe's (BVLC master ``src/caffe/proto/caffe.proto``);
numbers only matter for the binary format, which is not used here.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["messages"]

_PHASES = [("TRAIN", 0), ("TEST", 1)]
# The V1 LayerParameter's LayerType, so that a legacy `layers { type: CONVOLUTION }` parses.
_V1_TYPES = [
    ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2), ("CONCAT", 3),
    ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5), ("DECONVOLUTION", 39),
    ("DROPOUT", 6), ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7), ("ELTWISE", 25), ("EXP", 38),
    ("FLATTEN", 8), ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10), ("HINGE_LOSS", 28), ("IM2COL", 11),
    ("IMAGE_DATA", 12), ("INFOGAIN_LOSS", 13), ("INNER_PRODUCT", 14), ("LRN", 15),
    ("MEMORY_DATA", 29), ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17),
    ("POWER", 26), ("RELU", 18), ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27),
    ("SILENCE", 36), ("SOFTMAX", 20), ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33),
    ("TANH", 23), ("WINDOW_DATA", 24), ("THRESHOLD", 31),
]

# (name, number, type, label, default, type_name)
_O, _R = "optional", "repeated"
_MESSAGES: dict[str, list[tuple[str, int, str, str, str | None, str | None]]] = {
    "NetStateRule": [
        ("phase", 1, "enum", _O, None, "Phase"), ("min_level", 2, "int32", _O, None, None),
        ("max_level", 3, "int32", _O, None, None), ("stage", 4, "string", _R, None, None),
        ("not_stage", 5, "string", _R, None, None),
    ],
    "TransformationParameter": [
        ("scale", 1, "float", _O, "1", None), ("mirror", 2, "bool", _O, "false", None),
        ("crop_size", 3, "uint32", _O, "0", None), ("mean_file", 4, "string", _O, None, None),
        ("mean_value", 5, "float", _R, None, None), ("force_color", 6, "bool", _O, "false", None),
        ("force_gray", 7, "bool", _O, "false", None),
    ],
    "DataParameter": [
        ("source", 1, "string", _O, None, None), ("batch_size", 4, "uint32", _O, None, None),
        ("rand_skip", 7, "uint32", _O, "0", None), ("backend", 8, "enum", _O, "LEVELDB", "DB"),
        ("scale", 2, "float", _O, "1", None), ("mean_file", 3, "string", _O, None, None),
        ("crop_size", 5, "uint32", _O, "0", None), ("mirror", 6, "bool", _O, "false", None),
        ("force_encoded_color", 9, "bool", _O, "false", None), ("prefetch", 10, "uint32", _O, "4", None),
    ],
    "ImageDataParameter": [
        ("source", 1, "string", _O, None, None), ("batch_size", 4, "uint32", _O, "1", None),
        ("rand_skip", 7, "uint32", _O, "0", None), ("shuffle", 8, "bool", _O, "false", None),
        ("new_height", 9, "uint32", _O, "0", None), ("new_width", 10, "uint32", _O, "0", None),
        ("is_color", 11, "bool", _O, "true", None), ("scale", 2, "float", _O, "1", None),
        ("mean_file", 3, "string", _O, None, None), ("crop_size", 5, "uint32", _O, "0", None),
        ("mirror", 6, "bool", _O, "false", None), ("root_folder", 12, "string", _O, "", None),
    ],
    "WindowDataParameter": [
        ("source", 1, "string", _O, None, None), ("scale", 2, "float", _O, "1", None),
        ("mean_file", 3, "string", _O, None, None), ("batch_size", 4, "uint32", _O, None, None),
        ("crop_size", 5, "uint32", _O, "0", None), ("mirror", 6, "bool", _O, "false", None),
        ("fg_threshold", 7, "float", _O, "0.5", None), ("bg_threshold", 8, "float", _O, "0.5", None),
        ("fg_fraction", 9, "float", _O, "0.25", None), ("context_pad", 10, "uint32", _O, "0", None),
        ("crop_mode", 11, "string", _O, "warp", None), ("cache_images", 12, "bool", _O, "false", None),
        ("root_folder", 13, "string", _O, "", None),
    ],
}
_COMMON = [
    ("name", 1, "string", _O, None, None), ("bottom", 3, "string", _R, None, None),
    ("top", 4, "string", _R, None, None), ("loss_weight", 5, "float", _R, None, None),
    ("include", 8, "message", _R, None, "NetStateRule"), ("exclude", 9, "message", _R, None, "NetStateRule"),
]
_DATA_PARAMS = [
    ("transform_param", 100, "message", _O, None, "TransformationParameter"),
    ("data_param", 107, "message", _O, None, "DataParameter"),
    ("image_data_param", 115, "message", _O, None, "ImageDataParameter"),
    ("window_data_param", 129, "message", _O, None, "WindowDataParameter"),
]
_MESSAGES["LayerHeader"] = [*_COMMON, ("type", 2, "string", _O, None, None)]
_MESSAGES["DataLayer"] = [*_COMMON, ("type", 2, "string", _O, None, None),
                          ("phase", 10, "enum", _O, None, "Phase"),
                          ("propagate_down", 11, "bool", _R, None, None), *_DATA_PARAMS]
_MESSAGES["V1LayerHeader"] = [*_COMMON, ("type", 2, "enum", _O, None, "V1LayerType")]
_MESSAGES["V1DataLayer"] = [*_COMMON, ("type", 2, "enum", _O, None, "V1LayerType"), *_DATA_PARAMS]


@functools.cache
def messages() -> dict[str, Any]:
    """Message classes by name (built once; needs the ``protobuf`` package: ``[caffe]``)."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading prototxts needs protobuf: pip install 'agnostic_prefetch[caffe]'") from exc
    types = {f.name.lower().removeprefix("type_"): f.number
             for f in descriptor_pb2.FieldDescriptorProto.Type.DESCRIPTOR.values}
    labels = {"optional": descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
              "repeated": descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED}
    file = descriptor_pb2.FileDescriptorProto(name="agnostic_prefetch/caffe_subset.proto",
                                              package="agnostic_prefetch_caffe", syntax="proto2")
    for enum_name, values in (("Phase", _PHASES), ("V1LayerType", _V1_TYPES),
                              ("DB", [("LEVELDB", 0), ("LMDB", 1)])):
        enum = file.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for message_name, fields in _MESSAGES.items():
        message = file.message_type.add(name=message_name)
        for name, number, kind, label, default, type_name in fields:
            field = message.field.add(name=name, number=number, type=types[kind], label=labels[label])
            if type_name is not None:
                field.type_name = f".agnostic_prefetch_caffe.{type_name}"
            if default is not None:
                field.default_value = default
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"agnostic_prefetch_caffe.{name}"))
            for name in _MESSAGES}
