"""Valid files for the parser fuzzing (tests/test_fuzz_parsers.py), made by each format's own
tools where one is at hand (the protobuf runtime, Pillow and OpenCV, ``tarfile``, the tfrecord
package) or by our encoders; and the repairs that make a mutated file pass its checksums, so
the fuzzing reaches the code behind them.

Every seed is small (well under a few KiB): a fuzzing example costs a parse of it.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tarfile
import tempfile
import zlib

import numpy as np
from tf_example_messages import build_example

from agnostic_prefetch.caffe._datum import Datum, encode_blobproto, encode_datum
from agnostic_prefetch.sources._crc32c import masked_crc32c
from agnostic_prefetch.sources.packed_arrays import encode_record


@functools.cache
def caffe_messages() -> dict[str, type]:
    """Datum, BlobShape and BlobProto classes of the protobuf runtime, from caffe.proto's numbers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="fuzz_caffe.proto", package="fuzz_caffe", syntax="proto2")
    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    layouts = {
        "Datum": [("channels", 1, F.TYPE_INT32, one), ("height", 2, F.TYPE_INT32, one),
                  ("width", 3, F.TYPE_INT32, one), ("data", 4, F.TYPE_BYTES, one),
                  ("label", 5, F.TYPE_INT32, one), ("float_data", 6, F.TYPE_FLOAT, many),
                  ("encoded", 7, F.TYPE_BOOL, one)],
        "BlobShape": [("dim", 1, F.TYPE_INT64, many)],
        "BlobProto": [("num", 1, F.TYPE_INT32, one), ("channels", 2, F.TYPE_INT32, one),
                      ("height", 3, F.TYPE_INT32, one), ("width", 4, F.TYPE_INT32, one),
                      ("data", 5, F.TYPE_FLOAT, many), ("shape", 7, F.TYPE_MESSAGE, one),
                      ("double_data", 8, F.TYPE_DOUBLE, many)],
    }
    for name, fields in layouts.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, label in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if field_name == "shape":
                field.type_name = ".fuzz_caffe.BlobShape"
            if field_name in ("dim", "data", "double_data") and name != "Datum":
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"fuzz_caffe.{name}"))
            for name in layouts}


@functools.cache
def datum_seeds() -> tuple[bytes, ...]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 4, 5), np.uint8)
    ours = [
        encode_datum(Datum(3, 4, 5, pixels.tobytes(), label=7)),
        encode_datum(Datum(data=b"\x89PNG\r\n\x1a\n....", label=-3, encoded=True)),
        encode_datum(Datum(1, 2, 3, b"", label=1, float_data=rng.random(6).astype(np.float32))),
    ]
    datum = caffe_messages()["Datum"](channels=1, height=2, width=2, data=bytes(4), label=2**31 - 1)
    datum.float_data.extend([0.5, -1.0, 3.0])
    return (*ours, datum.SerializeToString())


@functools.cache
def blobproto_seeds() -> tuple[bytes, ...]:
    rng = np.random.default_rng(1)
    blob = caffe_messages()["BlobProto"]()
    blob.shape.dim.extend([1, 2, 3])
    blob.double_data.extend(rng.random(6).tolist())
    return (encode_blobproto(rng.random((3, 2, 2)).astype(np.float32)),
            encode_blobproto(np.zeros((2, 1, 1, 3), np.float32)), blob.SerializeToString())


@functools.cache
def example_seeds() -> tuple[bytes, ...]:
    features = {"label": ("int64", [3, -1, 2**40]), "score": ("float", [0.25, -2.0]),
                "image/encoded": ("bytes", [b"\xff\xd8\xff", b"abc"]), "tokens": ("int64", list(range(40)))}
    return (build_example(features), build_example(features, packed=False),
            build_example({"e": ("bytes", [])}), build_example({"x": ("int64", [1, 2, 300])}))


def _frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked_crc32c(length)) + record + struct.pack("<I", masked_crc32c(record))


@functools.cache
def tfrecord_seeds() -> tuple[bytes, ...]:
    from tfrecord.writer import TFRecordWriter  # the tfrecord package's own framing

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "seed.tfrecord")
        writer = TFRecordWriter(path)
        for i in range(3):
            writer.write({"i": ([i, -i], "int"), "blob": ([b"k%d" % i], "byte")})
        writer.close()
        with open(path, "rb") as f:
            written = f.read()
    return written, b"".join(_frame(r) for r in example_seeds()[:3]), _frame(b"")


def repair_tfrecord(data: bytes) -> bytes:
    """Each frame's two CRCs made right again, for as many frames as the lengths lead to."""
    out, pos = bytearray(data), 0
    while pos + 12 <= len(out):
        length = struct.unpack_from("<Q", out, pos)[0]
        out[pos + 8:pos + 12] = struct.pack("<I", masked_crc32c(bytes(out[pos:pos + 8])))
        end = pos + 12 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack("<I", masked_crc32c(bytes(out[pos + 12:end])))
        pos = end + 4
    return bytes(out)


@functools.cache
def png_seeds() -> tuple[bytes, ...]:
    import cv2
    from PIL import Image, PngImagePlugin

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (4, 5, 3), np.uint8)

    def save(image: Image.Image, chunks: tuple[tuple[bytes, bytes], ...] = (), **options: object) -> bytes:
        info = PngImagePlugin.PngInfo()
        for kind, body in chunks:
            info.add(kind, body)
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=info, **options)
        return out.getvalue()

    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=6)
    seeds = [save(Image.fromarray(rgb), ((b"gAMA", (80000).to_bytes(4, "big")),)),
             save(Image.fromarray(np.dstack([rgb, rgb[:, :, 0]]), "RGBA"), ((b"sRGB", b"\x00"),)),
             save(palette, transparency=2)]
    for channels, chunks in ((3, b""), (4, b"")):
        sixteen = rng.integers(0, 65536, (3, 4, channels), np.uint16)
        encoded = cv2.imencode(".png", sixteen)[1].tobytes()
        extra = [(b"sBIT", b"\x0c\x0c\x0c"), (b"gAMA", (45455).to_bytes(4, "big"))] if channels == 3 else []
        chunks = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                          for kind, body in extra)
        seeds.append(encoded[:33] + chunks + encoded[33:])  # after the signature and IHDR
    return tuple(seeds)


def repair_png(data: bytes) -> bytes:
    """Each chunk's CRC made right again, for as many chunks as the lengths lead to."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = struct.unpack_from(">I", out, pos)[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:end])))
        pos = end + 4
    return bytes(out)


@functools.cache
def tar_seeds() -> tuple[bytes, ...]:
    def tar(members: list[tuple[str, bytes]], fmt: int) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
            for name, body in members:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                archive.addfile(info, io.BytesIO(body))
            folder = tarfile.TarInfo("dir/")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
        return out.getvalue()

    long = "x" * 120 + "/sample.cls"
    return (tar([("a.jpg", b"\xff\xd8\xff" * 5), ("a.cls", b"3")], tarfile.USTAR_FORMAT),
            tar([(long, b"7"), ("b.txt", b"")], tarfile.GNU_FORMAT),
            tar([(long, b"1" * 600), ("\u00e9.npy", b"x")], tarfile.PAX_FORMAT))


def repair_tar(data: bytes) -> bytes:
    """The checksum of every 512-byte block that carries the ustar magic, made right again."""
    out = bytearray(data)
    for at in range(0, len(out) - 511, 512):
        if out[at + 257:at + 262] == b"ustar":
            out[at + 148:at + 156] = b" " * 8
            out[at + 148:at + 156] = b"%06o\0 " % (sum(out[at:at + 512]) & 0o777777)
    return bytes(out)


def packed_array_seeds() -> tuple[bytes, ...]:
    return (encode_record({"image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "label": np.int32(5)}),
            encode_record({"x": np.array([0.5, 1.5]), "empty": np.zeros((0, 3), np.int16)}),
            encode_record({}))


WINDOW_FILE = """# 0
images/a.jpg
3
20
30
2
1 0.9 0 0 9 9
0 0.1 5 5 29 19
# 1
c.png
1
8
8
1
2 0.5 1 1 7 7
"""

IMAGE_LIST = "a.jpg 0\nfolder with spaces/b.png 17\r\n\nc.jpeg -2147483648\n"


def text_seeds(text: str) -> tuple[bytes, ...]:
    return text.encode(), text.replace("\n", "\r\n").encode()


def prototxt_seeds() -> tuple[bytes, ...]:
    nets = os.path.join(os.path.dirname(__file__), "caffe_reference", "nets")
    chosen = ("data_raw_meanvalue_scale.prototxt", "imagedata_gray.prototxt", "windowdata_v1_window_scale.prototxt")
    seeds = []
    for name in chosen:
        with open(os.path.join(nets, name), "rb") as f:
            seeds.append(f.read())
    legacy = (b'name: "v1"\nlayers {\n  name: "data"\n  type: DATA\n  top: "data"\n  top: "label"\n'
              b'  data_param { source: "db" batch_size: 4 scale: 0.5 }\n'
              b'  include { phase: TRAIN }\n}\nlayers { name: "c" type: CONVOLUTION bottom: "data" '
              b'convolution_param { num_output: 3 } }\n')
    return (*seeds, legacy)
