"""RandomResizedCropDecode and CenterCropDecode: torchvision's crops on PIL images, value for
value (train) or within one level (eval), decoding only the box; DCT scaling never upsamples;
output dtypes and layouts; through the Loader over image folders, WebDataset shards and
encoded Datums; deterministic; picklable."""

from __future__ import annotations

import io
import logging
import math
import pickle
import sys
import tarfile

import cloudpickle
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.sources import _resample
from agnostic_prefetch.sources._crop_sampling import centre_box, random_resized_box
from agnostic_prefetch.sources.crops import _scale_for
from agnostic_prefetch.sources.images import decode_image


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, ((x // 7 + y // 5) % 2) * 200], -1)
    return np.clip(base + rng.integers(-30, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, subsampling: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def torchvision_train(data: bytes, seed: int, size: int) -> tuple[np.ndarray, bool]:
    """torchvision's RandomResizedCrop on the PIL image (crop, then resize, bilinear with
    antialiasing), with the box and the coin drawn as the transform draws them."""
    rng = np.random.default_rng(seed)
    height, width = decode_image(data, name="x").shape[:2]
    top, left, h, w = random_resized_box(height, width, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    flip = bool(rng.random() < 0.5)
    img = Image.fromarray(decode_image(data, name="x", color=True))
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)), flip


def torchvision_eval(data: bytes, shorter: int, size: int) -> np.ndarray:
    """torchvision's Resize(shorter) + CenterCrop(size) on the PIL image."""
    img = Image.fromarray(decode_image(data, name="x", color=True))
    (new_h, new_w), (top, left) = centre_box(img.height, img.width, shorter, (size, size))
    return np.asarray(img.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# -- the box rule --------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 2**32 - 1))
def test_every_box_lies_inside_the_image_with_an_allowed_area_or_is_the_fallback(height, width, seed):
    top, left, h, w = random_resized_box(height, width, np.random.default_rng(seed), (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and 0 <= left and 1 <= h and 1 <= w and top + h <= height and left + w <= width


def test_the_fallback_is_torchvisions_centre_crop_clipped_to_the_ratio():
    rng = np.random.default_rng(0)
    # no area fraction above 1 fits: always the fallback
    assert random_resized_box(100, 400, rng, (2.0, 3.0), (3 / 4, 4 / 3)) == (0, 133, 100, 133)
    assert random_resized_box(400, 100, rng, (2.0, 3.0), (3 / 4, 4 / 3)) == (133, 0, 133, 100)
    assert random_resized_box(100, 120, rng, (2.0, 3.0), (3 / 4, 4 / 3)) == (0, 0, 100, 120)


def test_the_centre_geometry_is_torchvisions_resize_and_center_crop():
    assert centre_box(375, 500, 256, (224, 224)) == ((256, 341), (16, 58))
    assert centre_box(500, 333, 256, (224, 224)) == ((384, 256), (80, 16))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 512), st.integers(1, 512))
def test_the_dct_scale_never_leaves_the_box_smaller_than_the_output(box_h, box_w, out_h, out_w):
    scale = _scale_for(box_h, box_w, out_h, out_w)
    assert scale in (1, 2, 4, 8)
    assert scale == 1 or (box_h / scale >= out_h and box_w / scale >= out_w)
    assert scale == 8 or box_h / (2 * scale) < out_h or box_w / (2 * scale) < out_w  # and is the largest


# -- equality with torchvision's operations ----------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(24, 260), st.integers(24, 260), st.sampled_from([0, 1, 2]), st.integers(0, 2**32 - 1),
       st.sampled_from([16, 32, 57]))
def test_train_without_dct_scaling_equals_torchvisions_resized_crop_value_for_value(height, width, subsampling,
                                                                                   seed, size):
    data = jpeg(photo(height, width, seed % 7), subsampling)
    t = ap.RandomResizedCropDecode(size, dct_scale=False, resampler="pillow")
    got = t({"image": data}, np.random.default_rng(seed))["image"]
    want, flip = torchvision_train(data, seed, size)
    np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(24, 700), st.integers(24, 700), st.integers(0, 2**32 - 1), st.sampled_from([16, 57, 224]),
       st.booleans(), st.sampled_from(["train", "eval"]))
def test_the_fast_resampler_is_within_one_level_of_pillows_per_pass(height, width, seed, size, dct_scale, kind):
    """fast_image_resize computes Pillow's filter with 16-bit weights: each of the two passes
    rounds within one level of Pillow's, so two at most (small synthetic images reach it)."""
    pytest.importorskip("cykooz_resizer")
    data = jpeg(photo(height, width, seed % 7))
    make = ap.RandomResizedCropDecode if kind == "train" else ap.CenterCropDecode
    fast, pillow = (make(size, dct_scale=dct_scale, resampler=r)({"image": data}, np.random.default_rng(seed))["image"]
                    for r in ("fast", "pillow"))
    assert np.abs(fast.astype(int) - pillow).max() <= 2


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_on_photographs_the_fast_resampler_differs_from_pillow_at_a_minority_of_values(name):
    pytest.importorskip("cykooz_resizer")
    skimage_data = pytest.importorskip("skimage.data")
    photo_ = getattr(skimage_data, name)()[:, :, :3]
    for height, width in ((375, 500), (500, 375), (683, 1024)):
        data = jpeg(np.asarray(Image.fromarray(photo_).resize((width, height), Image.BICUBIC)))
        for make in (ap.RandomResizedCropDecode, ap.CenterCropDecode):
            fast, pillow = (make(224, resampler=r)({"image": data}, np.random.default_rng(5))["image"]
                            for r in ("fast", "pillow"))
            diff = np.abs(fast.astype(int) - pillow)
            # one level at most and 5-19 % of the values on these (docs/images.md)
            assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.25 * diff.size


def test_without_the_fast_resizer_auto_uses_pillow_warning_once_and_fast_is_refused(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cykooz_resizer", None)  # an import of it fails
    monkeypatch.setattr(_resample, "_tried", False)
    monkeypatch.setattr(_resample, "_module", None)
    monkeypatch.setattr(_resample, "_warned", False)
    with pytest.raises(ImportError, match=r"resampler='fast' needs cykooz.resizer .*agnostic_prefetch\[images\]"):
        ap.RandomResizedCropDecode(32, resampler="fast")
    data = jpeg(photo(90, 120))
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        got = [ap.CenterCropDecode(32)({"image": data}, None)["image"] for _ in range(3)]
    np.testing.assert_array_equal(got[0], ap.CenterCropDecode(32, resampler="pillow")({"image": data}, None)["image"])
    warnings = [r for r in caplog.records if "cykooz.resizer" in r.getMessage()]
    assert len(warnings) == 1 and "resize with Pillow" in warnings[0].getMessage()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(40, 400), st.integers(40, 400), st.sampled_from([0, 2]), st.sampled_from([(32, 36), (56, 64)]))
def test_eval_without_dct_scaling_is_torchvisions_within_one_level_per_resampling_pass(height, width, subsampling,
                                                                                      sizes):
    size, shorter = sizes
    data = jpeg(photo(height, width, 1), subsampling)
    t = ap.CenterCropDecode(size, resize=shorter, dct_scale=False, resampler="pillow")
    got = t({"image": data}, None)["image"].astype(int)
    # Pillow places the filter from the crop's own start, torchvision's from the image's:
    # where two taps weigh exactly the same, the rounding can differ by one level, in each
    # of the two passes (horizontal, vertical).
    assert np.abs(got - torchvision_eval(data, shorter, size)).max() <= 2


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (333, 500), (500, 400), (683, 1024)])
def test_eval_without_dct_scaling_differs_from_torchvision_at_rare_values_on_photo_sizes(height, width):
    data = jpeg(photo(height, width, 2))
    got = ap.CenterCropDecode(224, dct_scale=False, resampler="pillow")({"image": data}, None)["image"].astype(int)
    diff = np.abs(got - torchvision_eval(data, 256, 224))
    assert diff.max() <= 2 and np.count_nonzero(diff) <= 0.005 * diff.size


@pytest.mark.parametrize("transform", ["train", "eval"])
def test_dct_scaling_stays_close_to_the_full_resolution_result(transform):
    worst = math.inf
    for k, (height, width) in enumerate([(375, 500), (600, 800), (900, 1200), (1024, 768), (480, 640)]):
        data = jpeg(photo(height, width, k))
        for seed in range(4):
            if transform == "train":
                t_on, t_off = (ap.RandomResizedCropDecode(64, dct_scale=d, flip=False) for d in (True, False))
            else:
                t_on, t_off = (ap.CenterCropDecode(64, dct_scale=d) for d in (True, False))
            on = t_on({"image": data}, np.random.default_rng(seed))["image"]
            off = t_off({"image": data}, np.random.default_rng(seed))["image"]
            worst = min(worst, psnr(on, off))
    assert worst > 28  # dB; docs/images.md gives the figures on photographs


# -- outputs -------------------------------------------------------------------------------------

def test_float_outputs_are_pixels_minus_mean_over_std_in_the_asked_layout():
    data = jpeg(photo(120, 160))
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    base = ap.CenterCropDecode(64)({"image": data}, None)["image"]
    f32 = ap.CenterCropDecode(64, dtype="float32", layout="CHW", mean=mean, std=std)({"image": data}, None)["image"]
    want = ((base.astype(np.float32) - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
    np.testing.assert_array_equal(f32, want)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ap.CenterCropDecode(64, dtype="bfloat16", mean=mean, std=std)({"image": data}, None)["image"]
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16, want.transpose(1, 2, 0).astype(ml_dtypes.bfloat16))


def test_out_is_written_in_place_and_other_leaves_pass_through():
    data = jpeg(photo(90, 120))
    t = ap.RandomResizedCropDecode(32, dtype="float32", layout="CHW")
    slot = {"image": np.zeros((3, 32, 32), np.float32), "label": None}
    result = t({"image": data, "label": 7}, np.random.default_rng(3), out=slot)
    assert result["image"] is slot["image"] and result["label"] == 7
    np.testing.assert_array_equal(result["image"], t({"image": data, "label": 7}, np.random.default_rng(3))["image"])


def test_flips_happen_about_half_the_time_and_only_when_asked():
    data = jpeg(photo(64, 64))
    t = ap.CenterCropDecode(32, resize=32, flip=True)
    plain = ap.CenterCropDecode(32, resize=32)({"image": data}, None)["image"]
    flips = [not np.array_equal(t({"image": data}, np.random.default_rng(s))["image"], plain) for s in range(200)]
    assert 70 < sum(flips) < 130


def test_encoded_bytes_and_decoded_pixels_give_the_same_crop():
    arr = photo(100, 140)
    data = jpeg(arr)
    t = ap.RandomResizedCropDecode(48, dct_scale=False)
    pixels = decode_image(data, name="x")
    for seed in range(5):
        a = t({"image": data}, np.random.default_rng(seed))["image"]
        b = t({"image": pixels}, np.random.default_rng(seed))["image"]
        c = t({"image": np.frombuffer(data, np.uint8)}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_gray_and_png_images_become_three_channels():
    gray = photo(60, 80)[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    for data in (jpeg(gray), buf.getvalue()):
        out = ap.CenterCropDecode(32)({"image": data}, None)["image"]
        assert out.shape == (32, 32, 3) and (out[:, :, 0] == out[:, :, 2]).all()


@pytest.mark.parametrize("make, message", [
    (lambda: ap.RandomResizedCropDecode(0), "size must be a positive int"),
    (lambda: ap.RandomResizedCropDecode(224, scale=(0.5, 0.1)), r"scale must satisfy 0 < low <= high, got \(0.5, 0.1\)"),
    (lambda: ap.RandomResizedCropDecode(224, ratio=(0, 1)), "ratio must satisfy"),
    (lambda: ap.RandomResizedCropDecode(224, dtype="int8"), "dtype must be one of"),
    (lambda: ap.RandomResizedCropDecode(224, layout="NHWC"), "layout must be 'HWC' or 'CHW'"),
    (lambda: ap.RandomResizedCropDecode(224, mean=(1, 2, 3)), "mean and std need dtype='float32'"),
    (lambda: ap.RandomResizedCropDecode(224, dtype="float32", std=(1, 0, 1)), "std must be positive"),
    (lambda: ap.RandomResizedCropDecode(224, dtype="float32", mean=(1, 2)), "mean must be one number or three"),
    (lambda: ap.CenterCropDecode(224, resize=200), "resize .* must be an int >= the crop size 224"),
    (lambda: ap.CenterCropDecode(224, resampler="bicubic"), r"resampler must be one of \('auto', 'fast', 'pillow'\)"),
])
def test_bad_arguments_are_refused_with_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_missing_leaf_or_a_non_image_is_named():
    with pytest.raises(KeyError, match="reads the leaf 'image'"):
        ap.CenterCropDecode(32)({"jpg": b""}, None)
    with pytest.raises(TypeError, match="must be encoded image bytes"):
        ap.CenterCropDecode(32)({"image": 3}, None)
    with pytest.raises(ValueError, match="the 'image' image has neither bytes nor a path"):
        ap.CenterCropDecode(32)({"image": {"bytes": None, "path": None}}, None)


def test_the_transforms_pickle_and_give_the_same_output_after():
    data = jpeg(photo(90, 120))
    for t in (ap.RandomResizedCropDecode(40, dtype="float32", mean=100, std=50), ap.CenterCropDecode(40)):
        for dumps in (pickle.dumps, cloudpickle.dumps):
            again = pickle.loads(dumps(t))
            assert repr(again) == repr(t)
            np.testing.assert_array_equal(again({"image": data}, np.random.default_rng(1))["image"],
                                          t({"image": data}, np.random.default_rng(1))["image"])
    assert ap.RandomResizedCropDecode.thread_safe and ap.RandomResizedCropDecode.writes_into_slot


# -- through the Loader --------------------------------------------------------------------------

def _folder(root) -> list[bytes]:
    files = []
    for k in range(10):
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        data = jpeg(photo(60 + 7 * k, 90 - 3 * k, k))
        (root / f"c{k % 2}" / f"{k:02d}.jpg").write_bytes(data)
        files.append(data)
    return files


def _batches(source, transform, **kwargs) -> list[np.ndarray]:
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=5, transform=transform, **kwargs) as loader:
        return [np.array(b[transform.key]) for b in loader]


def test_through_the_loader_over_an_image_folder_with_processes_deterministically(tmp_path):
    _folder(tmp_path)
    source = ap.ImageFolderSource(tmp_path, decode=False)
    t = ap.RandomResizedCropDecode(24, dtype="float32", layout="CHW", mean=127, std=64)
    first, second = _batches(source, t), _batches(source, t)
    assert [b.shape for b in first] == [(4, 3, 24, 24), (4, 3, 24, 24), (2, 3, 24, 24)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    with ap.Loader(source, 4, workers=0, shuffle=True, seed=5, transform=t) as loader:
        inline = [np.array(b["image"]) for b in loader]
    for a, b in zip(first, inline, strict=True):  # any worker count: the same batches
        np.testing.assert_array_equal(a, b)


def test_through_the_loader_over_a_webdataset_shard(tmp_path):
    (tmp_path / "f").mkdir()
    files = _folder(tmp_path / "f")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for k, data in enumerate(files):
            for ext, payload in (("jpg", data), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"s{k:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    source = ap.WebDatasetSource(str(tmp_path / "shard-0.tar"), decode=False)
    t = ap.CenterCropDecode(32, key="jpg")
    with ap.Loader(source, 5, workers=2, transform=t) as loader:
        got = [np.array(b["jpg"]) for b in loader]
    want = [t({"jpg": data}, None)["jpg"] for data in files]
    np.testing.assert_array_equal(np.concatenate(got), np.stack(want))


def test_through_the_loader_over_parquet_arrayrecord_and_hugging_face_image_columns(tmp_path):
    """The formats' encoded-image columns: a Parquet binary column, ArrayRecord's records,
    a Hugging Face Image(decode=False) column ({"bytes", "path"}, one of them a path only)."""
    (tmp_path / "f").mkdir()
    files = _folder(tmp_path / "f")
    t = ap.CenterCropDecode(32, key="image")
    want = np.stack([t({"image": data}, None)["image"] for data in files])

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"jpeg": files, "label": list(range(len(files)))}), tmp_path / "a.parquet")
    sources = {"parquet": (ap.ParquetSource(str(tmp_path / "a.parquet")), "jpeg")}
    array_record = pytest.importorskip("array_record.python.array_record_module")
    writer = array_record.ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
    for data in files:
        writer.write(data)
    writer.close()
    sources["arrayrecord"] = (ap.ArrayRecordSource(str(tmp_path / "a.array_record")), "bytes")
    datasets = pytest.importorskip("datasets")
    on_disk = tmp_path / "first.jpg"
    on_disk.write_bytes(files[0])
    rows = [{"bytes": None, "path": str(on_disk)}] + [{"bytes": d, "path": None} for d in files[1:]]
    features = datasets.Features({"image": datasets.Image(decode=False)})
    sources["hf"] = (ap.HuggingFaceSource(datasets.Dataset.from_dict({"image": rows}, features=features)), "image")
    for name, (source, key) in sources.items():
        with ap.Loader(source, 4, workers=2, transform=ap.CenterCropDecode(32, key=key)) as loader:
            got = np.concatenate([np.array(b[key]) for b in loader])
        np.testing.assert_array_equal(got, want, err_msg=name)
