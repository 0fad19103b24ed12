"""Regenerate the real-Caffe reference outputs that tests/test_caffe_reference.py compares with.

Needs a built BVLC Caffe (../shared/caffe/build.sh; CI never builds it). The inputs are
committed here (inputs/); this script makes them only when missing, from the scikit-image
photographs, so that the references always match the committed inputs.

    python tests/caffe_reference/generate.py [--caffe /tmp/caffe]

What it runs, each on the committed inputs:
  convert_imageset   raw (resized 40x50, and as they are), gray (resized), encoded (files as
                     they are), encoded and resized (Caffe re-encodes each file in its own
                     format), and the large JPEGs (list227.txt) encoded
  compute_image_mean on the resized database
  extract_features   a one-layer TEST net per case in nets/, dumping its data and label tops
                     (a net whose header says "# stored: uint8" has whole values in 0..255:
                     they are stored as uint8, compressed, after checking that nothing is lost)
Outputs (about 1.5 MB): expected/*.npz, expected/*.binaryproto.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INPUTS, NETS, EXPECTED = (os.path.join(HERE, d) for d in ("inputs", "nets", "expected"))
DATABASES = {  # name: convert_imageset flags, and the list (list16.txt: 16-bit files, which
    # Caffe's layers refuse in encoded Datums, so only the converter reads them)
    "raw_resized": (["--resize_height=40", "--resize_width=50"], "list.txt"),
    "gray_resized": (["--resize_height=40", "--resize_width=50", "--gray"], "list.txt"),
    "encoded": (["--encoded"], "list.txt"),
    "encoded_resized": (["--encoded", "--resize_height=40", "--resize_width=50"], "list.txt"),  # re-encoded
    "gray16": (["--gray"], "list16.txt"),
    "colour16": ([], "list16.txt"),
    "raw_sizes": ([], "list.txt"),  # raw Datums of every size, colour
    "large_encoded": (["--encoded"], "list227.txt"),  # colour and gray JPEGs for a 227 crop
}


def make_inputs() -> None:
    """Small real photographs: colour and gray, JPEG 4:2:0 / 4:2:2 / 4:4:4 and PNG, several sizes."""
    from skimage import data

    os.makedirs(INPUTS, exist_ok=True)
    photos = [
        ("astronaut_420.jpg", data.astronaut()[40:140:2, 150:270:2], {"quality": 90, "subsampling": 2}),
        ("coffee_422.jpg", data.coffee()[100:160, 200:290], {"quality": 85, "subsampling": 1}),
        ("chelsea_444.jpg", data.chelsea()[60:105, 120:190], {"quality": 95, "subsampling": 0}),
        ("rocket.png", data.rocket()[100:148, 150:214], {}),
        ("camera_gray.jpg", data.camera()[100:150, 200:260], {"quality": 90}),
        ("moon_gray.png", data.moon()[200:243, 200:261], {}),
        # libpng converts colour to gray through gamma tables when a gAMA or sRGB chunk says so
        ("rocket_gamma.png", data.rocket()[150:195, 100:160], {"pnginfo": _chunks((b"gAMA", (45455).to_bytes(4, "big")))}),
        ("coffee_srgb_palette.png", data.coffee()[200:250, 300:360], {"pnginfo": _chunks((b"sRGB", b"\x00")),
                                                                      "palette": True}),
        ("chelsea_rgba.png", np.dstack([data.chelsea()[100:140, 200:250], data.camera()[:40, :50]]), {}),
        # imread turns a JPEG by its EXIF orientation (6: rotated 90 degrees clockwise)
        ("coffee_exif6.jpg", data.coffee()[250:290, 400:450], {"quality": 90, "exif": _exif(6)}),
        # 16 bits a sample, gAMA 1/2.2: libpng converts to gray at 16 bits with its 16-bit tables
        ("chelsea16_gamma.png", data.chelsea()[150:190, 50:110], {"sixteen_bits": True}),
    ]
    sixteen = [p for p in photos if p[2].get("sixteen_bits")]
    photos = [p for p in photos if not p[2].get("sixteen_bits")]
    large = [  # at least 227 on each side, for a 227 crop: colour, gray, colour, each a new size
        ("coffee_240x232.jpg", data.coffee()[0:240, 340:572], {"quality": 90}),
        ("moon_gray_250x260.jpg", data.moon()[0:250, 0:260], {"quality": 90}),
        ("rocket_240x300.jpg", data.rocket()[0:240, 0:300], {"quality": 90}),
    ]
    for list_name, entries in (("list.txt", photos), ("list16.txt", sixteen), ("list227.txt", large)):
        _write_inputs(list_name, entries)
    with open(os.path.join(INPUTS, "windows.txt"), "w") as f:
        # one image, one foreground and one background window: WindowData's draws are then fixed
        f.write("# 0\nastronaut_420.jpg\n3\n50\n60\n2\n3 0.8 5 4 40 33\n0 0.1 20 10 55 45\n")


def _write_inputs(list_name: str, photos: list) -> None:
    from PIL import Image

    with open(os.path.join(INPUTS, list_name), "w") as listing:
        for label, (name, pixels, options) in enumerate(photos):
            path = os.path.join(INPUTS, name)
            if not os.path.exists(path) and options.pop("sixteen_bits", False):
                _write_png16(path, pixels)
            elif not os.path.exists(path):
                image = Image.fromarray(np.ascontiguousarray(pixels))
                if options.pop("palette", False):
                    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=96)
                image.save(path, **options)
            listing.write(f"{name} {label}\n")


def _write_png16(path: str, rgb8: np.ndarray) -> None:
    """A 16-bit RGB PNG (cv2 writes one; Pillow cannot) with a gAMA chunk of 1/2.2."""
    import struct
    import zlib

    import cv2

    noise = np.random.default_rng(0).integers(0, 257, rgb8.shape)
    ok, encoded = cv2.imencode(".png", (rgb8.astype(np.uint16) * 256 + noise).astype(np.uint16)[:, :, ::-1])
    body, kind = (45455).to_bytes(4, "big"), b"gAMA"
    chunk = struct.pack(">I", 4) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = encoded.tobytes()
    with open(path, "wb") as f:
        f.write(data[:33] + chunk + data[33:])  # right after IHDR


def _exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _chunks(*chunks: tuple[bytes, bytes]) -> object:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for kind, body in chunks:
        info.add(kind, body)
    return info


def read_db(path: str) -> dict[str, np.ndarray]:
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    # bytes back to back with their end offsets: no pickled object arrays
    packed = {}
    for name, column in (("keys", [k for k, _ in items]), ("values", [v for _, v in items])):
        packed[name] = np.frombuffer(b"".join(column), np.uint8)
        packed[name + "_ends"] = np.cumsum([len(b) for b in column], dtype=np.int64)
    return packed


def unpack(arrays: dict, name: str) -> list[bytes]:
    """The byte strings ``read_db`` packed under ``name``."""
    blob, ends = arrays[name].tobytes(), arrays[name + "_ends"]
    return [blob[start:end] for start, end in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)]


def tops(path: str) -> list[np.ndarray]:
    """The float Datums extract_features wrote, one C×H×W array each."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from agnostic_prefetch.caffe._datum import decode_datum

    blobs = []
    for value in unpack(read_db(path), "values"):
        datum = decode_datum(value)
        blobs.append(np.asarray(datum.float_data, np.float32).reshape(datum.channels, datum.height, datum.width))
    return blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caffe", default="/tmp/caffe")
    args = parser.parse_args()
    tools = os.path.join(args.caffe, "build", "tools")
    make_inputs()
    os.makedirs(EXPECTED, exist_ok=True)
    work = tempfile.mkdtemp()
    try:
        env = dict(os.environ, GLOG_minloglevel="2")
        for name, (flags, list_name) in DATABASES.items():
            db = os.path.join(work, name)
            subprocess.run([os.path.join(tools, "convert_imageset"), *flags, INPUTS + "/",
                            os.path.join(INPUTS, list_name), db], check=True, env=env)
            np.savez(os.path.join(EXPECTED, f"convert_{name}.npz"), **read_db(db))
        subprocess.run([os.path.join(tools, "compute_image_mean"), os.path.join(work, "raw_resized"),
                        os.path.join(EXPECTED, "mean.binaryproto")], check=True, env=env)
        empty = os.path.join(work, "empty.caffemodel")
        open(empty, "wb").close()  # an empty NetParameter
        for net in sorted(os.listdir(NETS)):
            case = net.removesuffix(".prototxt")
            text = open(os.path.join(NETS, net)).read()
            text = text.replace("$DB", work).replace("$INPUTS", INPUTS).replace("$EXPECTED", EXPECTED)
            netfile = os.path.join(work, net)
            open(netfile, "w").write(text)
            out_data, out_label = os.path.join(work, case + "_data"), os.path.join(work, case + "_label")
            batches = int(text.split("# batches:")[1].split()[0])
            as_uint8 = "# stored: uint8" in text
            subprocess.run([os.path.join(tools, "extract_features"), empty, netfile, "data,label",
                            f"{out_data},{out_label}", str(batches), "lmdb", "CPU"], check=True, env=env)
            blobs, labels = tops(out_data), np.concatenate([b.reshape(-1) for b in tops(out_label)])
            if as_uint8:
                whole = [b.astype(np.uint8) for b in blobs]
                assert all(np.array_equal(w, b) for w, b in zip(whole, blobs, strict=True)), case
                blobs = whole
            if len({b.shape for b in blobs}) == 1:
                arrays = {"data": np.stack(blobs)}
            else:  # per-batch shapes (batch size 1): one array per item
                arrays = {f"data_{i}": b for i, b in enumerate(blobs)}
            save = np.savez_compressed if as_uint8 else np.savez
            save(os.path.join(EXPECTED, f"{case}.npz"), label=labels, **arrays)
            print(case, sorted({b.shape for b in blobs}))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
