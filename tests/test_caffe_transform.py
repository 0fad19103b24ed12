"""CaffeTransform: Caffe DataTransformer rules, one per test, and against a plain reference computation."""

from __future__ import annotations

import numpy as np
import pytest
from test_datum import caffe_messages

from agnostic_prefetch.caffe.transform import CaffeTransform


def image(h=8, w=10, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def rng(seed=0):
    return np.random.default_rng(seed)


def reference(img, *, crop, mirror, mean, scale, train, draws):
    """Caffe's loop, written out: out[h][w] = (img[h_off+h][w_off+w'] - mean[...]) * scale, w' mirrored."""
    H, W, C = img.shape
    do_mirror = mirror and bool(draws.integers(0, 2))
    if crop:
        h_off, w_off = (int(draws.integers(0, H - crop + 1)), int(draws.integers(0, W - crop + 1))) if train else ((H - crop) // 2, (W - crop) // 2)
        oh = ow = crop
    else:
        h_off = w_off = 0
        oh, ow = H, W
    out = np.zeros((oh, ow, C), np.float32)
    for h in range(oh):
        for w in range(ow):
            for c in range(C):
                if mean is None:
                    m = 0.0
                elif np.ndim(mean) == 3:
                    m = mean[h_off + h, w_off + w, c]
                else:
                    m = np.atleast_1d(mean)[c if np.size(mean) > 1 else 0]
                tw = ow - 1 - w if do_mirror else w
                out[h, tw, c] = (np.float32(img[h_off + h, w_off + w, c]) - np.float32(m)) * np.float32(scale)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(crop=6, mirror=True, mean=(10.0, 20.0, 30.0), scale=0.5, train=True),
        dict(crop=6, mirror=False, mean=7.0, scale=1.0, train=False),
        dict(crop=0, mirror=True, mean=None, scale=2.0, train=True),
        dict(crop=5, mirror=True, mean="image", scale=0.017, train=True),
    ],
)
def test_matches_the_reference_loop(seed, kwargs):
    img = image(seed=seed)
    kwargs = dict(kwargs)
    if kwargs["mean"] == "image":
        kwargs["mean"] = np.random.default_rng(99).uniform(0, 255, img.shape).astype(np.float32)
    t = CaffeTransform(crop_size=kwargs["crop"], mirror=kwargs["mirror"], mean=kwargs["mean"], scale=kwargs["scale"], train=kwargs["train"])
    got = t({"image": img}, rng(seed))["image"]
    np.testing.assert_allclose(got, reference(img, draws=rng(seed), **kwargs), rtol=1e-6, atol=1e-5)


def test_test_phase_crop_is_centred():
    img = image(9, 12)
    out = CaffeTransform(crop_size=4, train=False)({"image": img}, rng())["image"]
    np.testing.assert_array_equal(out, img[2:6, 4:8].astype(np.float32))


def test_training_crops_cover_every_offset_and_draw_only_from_rng():
    img = np.arange(6 * 6, dtype=np.uint8).reshape(6, 6, 1)
    t = CaffeTransform(crop_size=4)
    corners = {int(t({"image": img}, rng(s))["image"][0, 0, 0]) for s in range(200)}
    assert corners == {r * 6 + c for r in range(3) for c in range(3)}
    a, b = t({"image": img}, rng(5)), t({"image": img}, rng(5))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_mirror_flips_about_half_the_time():
    img = image()
    t = CaffeTransform(mirror=True)
    flips = [not np.array_equal(t({"image": img}, rng(s))["image"], img) for s in range(400)]
    assert 150 < sum(flips) < 250


def test_chw_layout_and_other_keys_pass_through():
    out = CaffeTransform(crop_size=4, layout="CHW", train=False)({"image": image(), "label": 4, "box": [1]}, rng())
    assert out["image"].shape == (3, 4, 4) and out["image"].flags.c_contiguous
    assert out["label"] == 4 and out["box"] == [1]


def test_uint8_output_without_mean_or_scale_keeps_pixels():
    img = image()
    out = CaffeTransform(crop_size=4, train=False, dtype=np.uint8)({"image": img}, rng())["image"]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img[2:6, 3:7])


def test_binaryproto_mean_is_bgr_chw_and_converted(tmp_path):
    mean_rgb = np.random.default_rng(1).uniform(0, 255, (8, 10, 3)).astype(np.float32)
    bgr_chw = mean_rgb[:, :, ::-1].transpose(2, 0, 1)
    blob = caffe_messages()["BlobProto"](num=1, channels=3, height=8, width=10, data=bgr_chw.reshape(-1).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    img = image()
    rgb_t = CaffeTransform(mean_file=tmp_path / "mean.binaryproto")
    np.testing.assert_allclose(rgb_t({"image": img}, rng())["image"], img - mean_rgb, atol=1e-4)
    bgr_t = CaffeTransform(mean_file=tmp_path / "mean.binaryproto", channel_order="bgr")
    np.testing.assert_allclose(bgr_t({"image": img[:, :, ::-1]}, rng())["image"], (img - mean_rgb)[:, :, ::-1], atol=1e-4)


def test_npy_mean_is_hwc_in_channel_order(tmp_path):
    mean = np.full((8, 10, 3), (1.0, 2.0, 3.0), np.float32)
    np.save(tmp_path / "mean.npy", mean)
    img = image()
    out = CaffeTransform(mean_file=tmp_path / "mean.npy")({"image": img}, rng())["image"]
    np.testing.assert_allclose(out, img - np.float32([1, 2, 3]))


def test_mean_image_is_cropped_with_the_same_offsets():
    img = image()
    mean = np.random.default_rng(2).uniform(0, 255, img.shape).astype(np.float32)
    out = CaffeTransform(crop_size=4, mean=mean, train=False)({"image": img}, rng())["image"]
    np.testing.assert_allclose(out, img[2:6, 3:7] - mean[2:6, 3:7], atol=1e-4)


def test_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"8×10 is smaller than crop_size=12"):
        CaffeTransform(crop_size=12)({"image": image()}, rng())
    with pytest.raises(ValueError, match=r"mean image is 4×4 but the image is 8×10"):
        CaffeTransform(mean=np.zeros((4, 4, 3)))({"image": image()}, rng())
    with pytest.raises(ValueError, match="3 channels but"):
        CaffeTransform(mean=(1, 2, 3))({"image": image(c=1)}, rng())
    with pytest.raises(ValueError, match="not both"):
        CaffeTransform(mean=1.0, mean_file="x.npy")


def test_repr_states_the_parameters():
    r = repr(CaffeTransform(crop_size=224, mirror=True, mean=(1, 2, 3)))
    assert "crop_size=224" in r and "mirror=True" in r and "(1, 2, 3)" in r


def _before_fast_path(t, example, draws):
    """CaffeTransform.__call__ as it was before the single-pass fill (numpy's whole-array ops), for bit-exact comparison."""
    from agnostic_prefetch.caffe._mean import mean_for

    image = np.asarray(example["image"])
    h, w, c = image.shape
    do_mirror = t.mirror and bool(draws.integers(0, 2))
    top = left = 0
    size_h, size_w = h, w
    if t.crop_size:
        size_h = size_w = t.crop_size
        if t.train:
            top, left = int(draws.integers(0, h - size_h + 1)), int(draws.integers(0, w - size_w + 1))
        else:
            top, left = (h - size_h) // 2, (w - size_w) // 2
    out = image[top : top + size_h, left : left + size_w]
    if t.mean is not None or t.scale != 1.0:
        out = out.astype(np.float32)
        if t.mean is not None:
            mean = mean_for(t.mean, c, "")
            if mean.ndim == 3:
                mean = mean[top : top + size_h, left : left + size_w]
            out -= mean
        if t.scale != 1.0:
            out *= np.float32(t.scale)
    if do_mirror:
        out = out[:, ::-1]
    if t.layout == "CHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out, dtype=t.dtype)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
@pytest.mark.parametrize("mean", [None, 7.5, "channels", "image"])
@pytest.mark.parametrize("scale", [1.0, 0.017])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strided", [False, True])
def test_single_pass_fill_is_bit_identical_to_the_whole_array_ops(layout, mean, scale, dtype, channels, strided):
    # the fast path (one pass, crop and mirror as views, channel-wise or row-wise loops)
    # must give exactly the bytes the straightforward numpy expression gave
    base = image(12, 14, channels, seed=3)
    img = base[:, ::-1][::2] if strided else base  # a non-contiguous input (e.g. a BGR view)
    if mean == "channels":
        mean = tuple(np.linspace(10, 130, channels))
    elif mean == "image":
        mean = np.random.default_rng(5).uniform(0, 255, img.shape).astype(np.float32)
    for train in (True, False):
        t = CaffeTransform(crop_size=4, mirror=True, mean=mean, scale=scale, train=train, layout=layout, dtype=dtype)
        for seed in range(6):
            got = t({"image": img, "label": 1}, rng(seed))
            want = _before_fast_path(t, {"image": img}, rng(seed))
            assert got["label"] == 1
            assert got["image"].dtype == want.dtype and got["image"].flags.c_contiguous
            np.testing.assert_array_equal(got["image"], want)


@pytest.mark.parametrize("in_dtype", [np.float32, np.float64, np.int32])
def test_single_pass_fill_other_input_dtypes(in_dtype):
    img = np.random.default_rng(1).uniform(-50, 300, (9, 11, 3)).astype(in_dtype)
    for mean, scale in [(None, 1.0), ((1.5, 2.5, 3.5), 1.0), (None, 0.5), ((1.0, 2.0, 3.0), 0.25)]:
        t = CaffeTransform(crop_size=5, mirror=True, mean=mean, scale=scale)
        for seed in range(4):
            np.testing.assert_array_equal(t({"image": img}, rng(seed))["image"], _before_fast_path(t, {"image": img}, rng(seed)))


def test_out_is_filled_in_place_and_gives_the_same_result():
    t = CaffeTransform(crop_size=4, mirror=True, mean=(1.0, 2.0, 3.0), scale=0.5, layout="CHW")
    example = {"image": np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3), "label": 2}
    plain = t(example, np.random.default_rng(5))
    out = {"image": np.full((3, 4, 4), np.nan, np.float32), "label": None}
    given = out["image"]
    filled = t(example, np.random.default_rng(5), out=out)
    assert filled["image"] is given  # written where it was asked to go
    np.testing.assert_array_equal(filled["image"], plain["image"])


def test_out_that_does_not_fit_is_ignored():
    t = CaffeTransform(crop_size=4)
    example = {"image": np.zeros((6, 6, 3), np.uint8)}
    wrong = {"image": np.zeros((5, 5, 3), np.float32)}
    assert t(example, np.random.default_rng(0), out=wrong)["image"].shape == (4, 4, 3)


def test_loader_batches_are_the_same_whether_or_not_the_transform_writes_into_the_slot():
    import agnostic_prefetch as ap

    class Images:
        def __len__(self):
            return 24

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            return {"image": rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "label": np.int32(i)}

    t = CaffeTransform(crop_size=8, mirror=True, mean=(100.0, 110.0, 120.0), scale=0.02)

    def copied(example, rng):  # no writes_into_slot: the loader copies its output
        return t(example, rng)

    def run(transform, workers):
        with ap.Loader(Images(), 5, workers=workers, shuffle=True, seed=3, transform=transform) as loader:
            return [(b["image"].copy(), b["label"].copy()) for b in loader]

    for workers in (0, 2):
        for (a, la), (b, lb) in zip(run(t, workers), run(copied, workers), strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
