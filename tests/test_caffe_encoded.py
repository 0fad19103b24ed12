"""Caffe's sources with decode=False: CaffeTransform decodes only its crop box from an
EncodedImage and gives the same bits as decoding the whole image first; the fused crop
transforms read encoded Datums through the Loader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.caffe._datum import Datum, encode_datum
from agnostic_prefetch.caffe._lmdb_write import LMDBWriter
from agnostic_prefetch.sources.crops import EncodedImage


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, ((x // 5 + y // 3) % 2) * 180], -1)
    return np.clip(base + rng.integers(-30, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture
def datums(tmp_path):
    path = str(tmp_path / "db")
    with LMDBWriter(path) as writer:
        for i in range(12):
            data = jpeg(photo(64, 80, i), subsampling=i % 3)
            writer.put(b"%08d" % i, encode_datum(Datum(data=data, label=i, encoded=True)))
    return path


@pytest.fixture
def image_list(tmp_path):
    lines = []
    for i in range(8):
        exif = Image.Exif()
        exif[0x0112] = 1 + i % 8  # every EXIF orientation: the list turns images as imread does
        name = f"{i}.jpg"
        (tmp_path / name).write_bytes(jpeg(photo(48, 70, i), exif=exif))
        lines.append(f"{name} {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt"), str(tmp_path) + "/"


def outputs(source, transform, count: int) -> list[np.ndarray]:
    return [transform(source[i], np.random.default_rng(i))["image"] for i in range(count)]


@pytest.mark.parametrize("settings", [
    {"crop_size": 40, "mirror": True, "mean": (104, 117, 123), "scale": 0.017},
    {"crop_size": 33, "train": False, "dtype": np.uint8},
    {"crop_size": 40, "mirror": True, "channel_order": "bgr", "layout": "CHW"},
])
def test_encoded_datums_crop_decode_to_the_same_bits_as_whole_decodes(datums, settings):
    order = settings.get("channel_order", "rgb")
    decoded, encoded = (ap.LMDBSource(datums, decode=d, channel_order=order) for d in (True, False))
    assert isinstance(encoded[0]["image"], EncodedImage)
    t = ap.CaffeTransform(**settings)
    for a, b in zip(outputs(decoded, t, 12), outputs(encoded, t, 12), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_mean_image_is_cropped_with_the_box(datums):
    mean = np.random.default_rng(0).uniform(0, 255, (64, 80, 3)).astype(np.float32)
    t = ap.CaffeTransform(crop_size=32, mirror=True, mean=mean)
    decoded, encoded = (ap.LMDBSource(datums, decode=d) for d in (True, False))
    for a, b in zip(outputs(decoded, t, 12), outputs(encoded, t, 12), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("is_color", [True, False])
def test_image_lists_with_exif_orientation_crop_decode_to_the_same_bits(image_list, is_color):
    list_file, root = image_list
    decoded, encoded = (ap.ImageListSource(list_file, root_folder=root, is_color=is_color, decode=d)
                        for d in (True, False))
    t = ap.CaffeTransform(crop_size=30, mirror=True)
    for a, b in zip(outputs(decoded, t, 8), outputs(encoded, t, 8), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_image_list_cannot_resize_and_leave_decoding_to_the_transform(image_list):
    with pytest.raises(ValueError, match="cannot resize first"):
        ap.ImageListSource(image_list[0], new_height=32, new_width=32, decode=False)


def test_too_small_an_encoded_image_names_both_sizes(datums):
    with pytest.raises(ValueError, match=r"image of 64×80 is smaller than crop_size=72"):
        ap.CaffeTransform(crop_size=72)(ap.LMDBSource(datums, decode=False)[0], np.random.default_rng(0))


def test_through_the_loader_with_processes_the_batches_are_the_decoded_ones(datums):
    t = ap.CaffeTransform(crop_size=40, mirror=True, mean=(104, 117, 123))
    got = {}
    for decode in (True, False):
        with ap.Loader(ap.LMDBSource(datums, decode=decode), 4, workers=2, shuffle=True, seed=3,
                       transform=t) as loader:
            got[decode] = [np.array(b["image"]) for b in loader]
    for a, b in zip(got[True], got[False], strict=True):
        np.testing.assert_array_equal(a, b)


def test_random_resized_crop_decode_reads_encoded_datums_through_the_loader(datums):
    source = ap.LMDBSource(datums, decode=False)
    t = ap.RandomResizedCropDecode(24, dtype="float32", layout="CHW", mean=(124, 116, 104), std=58)
    runs = []
    for _ in range(2):
        with ap.Loader(source, 4, workers=2, shuffle=True, seed=9, transform=t) as loader:
            runs.append([(np.array(b["image"]), np.array(b["label"])) for b in loader])
    assert [img.shape for img, _ in runs[0]] == [(4, 3, 24, 24)] * 3
    for (a, la), (b, lb) in zip(*runs, strict=True):  # the same seed: the same batches
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
