"""decode_box: a box of an image at a DCT scale, pixel for pixel the box cut from the same
library's whole decode at that scale (subsamplings, gray, progressive, restart markers,
odd offsets, EXIF orientation), PNG decoded whole, the fallback without the region library."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.sources import _decode_box
from agnostic_prefetch.sources.images import ImageDecodeError, decode_image

cv2 = pytest.importorskip("cv2")


REGION_RULE = _decode_box._region_pays


@pytest.fixture(autouse=True)
def region_decode_always(monkeypatch):
    """The region decoder on every box, however small: the rule that picks it over the whole
    decode for speed would leave these small images to the whole decode (its own test below)."""
    monkeypatch.setattr(_decode_box, "_region_pays", lambda rows, cols, stored: True)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: JPEG-like content at any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) * 127 // max(height + width, 1)], -1)
    return np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, *, subsampling: int = 2, progressive: bool = False, restart: int = 0,
         exif: Image.Exif | None = None) -> bytes:
    if restart:  # OpenCV writes restart markers every ``restart`` MCUs
        ok, buf = cv2.imencode(".jpg", arr[:, :, ::-1] if arr.ndim == 3 else arr,
                               [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, restart])
        assert ok
        return buf.tobytes()
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(buf, "JPEG", quality=90, subsampling=subsampling, progressive=progressive, **kwargs)
    return buf.getvalue()


def reference(data: bytes, scale: int, gray: bool = False) -> np.ndarray:
    """The whole image at 1/scale, decoded by simplejpeg (libjpeg-turbo) directly."""
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    kwargs = {} if scale == 1 else {"min_height": -(-h // scale), "min_width": -(-w // scale)}
    return simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", **kwargs)


def cut(whole: np.ndarray, box: tuple[int, int, int, int], scale: int) -> np.ndarray:
    top, left, height, width = box
    return whole[top // scale : -(-(top + height) // scale), left // scale : -(-(left + width) // scale)]


@st.composite
def images_and_boxes(draw):
    height, width = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    box = (top, left, draw(st.integers(1, height - top)), draw(st.integers(1, width - left)))
    kind = draw(st.sampled_from(["420", "422", "444", "progressive", "gray", "restart"]))
    return height, width, box, kind, draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(0, 3))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images_and_boxes())
def test_a_box_is_the_same_box_cut_from_the_whole_decode_at_that_scale(case):
    height, width, box, kind, scale, seed = case
    arr = photo(height, width, seed)
    if kind == "gray":
        data = jpeg(arr[:, :, 1])
    elif kind == "restart":
        data = jpeg(arr, restart=1)
    else:
        data = jpeg(arr, subsampling={"444": 0, "422": 1}.get(kind, 2), progressive=kind == "progressive")
    got = ap.decode_box(data, box, scale=scale)
    want = cut(reference(data, scale, gray=kind == "gray"), box, scale)
    want = want if want.ndim == 3 else want[:, :, None]
    np.testing.assert_array_equal(got, want)
    if scale == 1:  # and the same pixels the plain decode gives
        np.testing.assert_array_equal(got, cut(decode_image(data, name="x"), box, 1))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("scale", [1, 2])
def test_orient_turns_as_exif_says_and_the_box_is_in_the_turned_image(orientation, scale):
    arr = photo(37, 53)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(arr, exif=exif)
    turned = decode_image(data, name="x", orient=True)
    box = (3, 5, turned.shape[0] - 9, turned.shape[1] - 7)
    if scale == 1:
        want = cut(turned, box, 1)
    else:
        want = cut(_decode_box._images._oriented(reference(data, 2), orientation), box, 2)
    np.testing.assert_array_equal(ap.decode_box(data, box, scale=scale, orient=True), want)
    # without orient the stored image is cut
    np.testing.assert_array_equal(ap.decode_box(data, (1, 2, 10, 11)), cut(reference(data, 1), (1, 2, 10, 11), 1))


def test_one_channel_from_a_colour_jpeg_is_its_y_plane():
    data = jpeg(photo(40, 60))
    np.testing.assert_array_equal(ap.decode_box(data, (5, 7, 20, 30), color=False),
                                  cut(reference(data, 1, gray=True), (5, 7, 20, 30), 1))


def test_png_is_decoded_whole_then_cut_and_reduced_at_a_scale():
    arr = photo(33, 47)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    np.testing.assert_array_equal(ap.decode_box(data, (4, 9, 20, 31)), arr[4:24, 9:40])
    reduced = np.asarray(Image.fromarray(arr).reduce(2))
    np.testing.assert_array_equal(ap.decode_box(data, (4, 9, 20, 31), scale=2), cut(reduced, (4, 9, 20, 31), 2))


def test_out_receives_the_box_and_is_returned():
    data = jpeg(photo(40, 60))
    out = np.zeros((10, 20, 3), np.uint8)
    assert ap.decode_box(data, (1, 2, 10, 20), out=out) is out
    np.testing.assert_array_equal(out, cut(reference(data, 1), (1, 2, 10, 20), 1))
    with pytest.raises(ValueError, match=r"out must be a uint8 array of shape \(10, 20, 3\)"):
        ap.decode_box(data, (1, 2, 10, 20), out=np.zeros((10, 21, 3), np.uint8))


def test_bad_boxes_and_scales_are_refused_with_the_numbers():
    data = jpeg(photo(40, 60))
    with pytest.raises(ValueError, match=r"box \(top=30, left=0, height=20, width=5\) is not inside .* 40×60"):
        ap.decode_box(data, (30, 0, 20, 5))
    with pytest.raises(ValueError, match="four integers"):
        ap.decode_box(data, (1, 2, 3))
    with pytest.raises(ValueError, match=r"scale must be one of \(1, 2, 4, 8\) .*got 3"):
        ap.decode_box(data, (0, 0, 4, 4), scale=3)


def test_restart_marker_jpegs_decode_boxes_exactly():
    data = jpeg(photo(80, 96), restart=1)
    assert b"\xff\xd0" in data and b"\xff\xd7" in data
    for box in ((0, 0, 80, 96), (17, 33, 41, 29), (63, 81, 17, 15)):
        np.testing.assert_array_equal(ap.decode_box(data, box), cut(reference(data, 1), box, 1))


def test_a_box_reaching_into_a_truncated_jpeg_raises_image_decode_error_naming_it():
    data = jpeg(photo(64, 64))[:400]
    with pytest.raises(ImageDecodeError, match="record-7"):
        ap.decode_box(data, (0, 0, 64, 64), name="record-7")


def test_the_region_library_is_used_where_installed():
    pytest.importorskip("nvidia.nvimgcodec")
    assert _decode_box.box_decoder() == "nvimgcodec"


def test_without_the_region_library_the_whole_image_is_decoded_and_it_warns_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # an import of it fails
    monkeypatch.setattr(_decode_box, "_tried", False)
    monkeypatch.setattr(_decode_box, "_module", None)
    monkeypatch.delattr(_decode_box._local, "decoder", raising=False)
    data = jpeg(photo(40, 60))
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        for _ in range(3):
            got = ap.decode_box(data, (3, 4, 20, 30))
    np.testing.assert_array_equal(got, cut(reference(data, 1), (3, 4, 20, 30), 1))
    assert _decode_box.box_decoder() == "simplejpeg"
    warnings = [r for r in caplog.records if "nvimgcodec" in r.getMessage()]
    assert len(warnings) == 1 and "decoded whole" in warnings[0].getMessage()


def test_the_region_decode_is_chosen_where_it_is_faster_than_the_whole_decode():
    # a train box in the middle of an ImageNet-sized image: region (rows below skipped)
    assert REGION_RULE((100, 300), (120, 340), (375, 500))
    # Caffe's 224 of 256: most of the image; whole
    assert not REGION_RULE((16, 240), (16, 240), (256, 256))
    # a box down to the bottom, most of the width: whole
    assert not REGION_RULE((40, 375), (0, 480), (375, 500))
    # a tiny image: the fixed cost decides; whole
    assert not REGION_RULE((0, 10), (0, 10), (60, 60))


def test_a_returned_box_never_changes_under_its_holder():
    """Every box handed out is its own (a whole-width box is a contiguous region: a decoder
    that reused one buffer would hand out the same memory twice)."""
    first_data, second_data = jpeg(photo(64, 96, 1)), jpeg(photo(64, 96, 2))
    first = ap.decode_box(first_data, (8, 0, 40, 96))
    kept = first.copy()
    encoded = _decode_box.EncodedImage(first_data)
    whole = encoded.decode((0, 0, 40, 96))
    whole_kept = whole.copy()
    for top in range(3):
        ap.decode_box(second_data, (top, 0, 40, 96))
        _decode_box.EncodedImage(second_data).decode((top, 0, 40, 96))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(whole, whole_kept)
