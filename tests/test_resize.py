"""The resize Caffe gets from OpenCV's INTER_LINEAR, bit for bit: checked against cv2 itself."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostic_prefetch.caffe._resize import resize_bilinear

cv2 = pytest.importorskip("cv2")
if platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("cv2's 8-bit INTER_LINEAR has other SIMD variants off x86-64 (NEON, carotene); "
                "the reference is OpenCV on x86-64", allow_module_level=True)


def reference(image, height, width):
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


@st.composite
def cases(draw):
    h, w = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    channels = draw(st.sampled_from([None, 1, 3]))
    how = draw(st.sampled_from(["any", "factor", "half", "same"]))
    if how == "factor":
        factor = draw(st.floats(0.05, 5.0))
        out = (max(1, round(h * factor)), max(1, round(w * factor)))
    elif how == "half":  # OpenCV's INTER_AREA fast path
        h, w = 2 * max(1, h // 2), 2 * max(1, w // 2)
        out = (h // 2, w // 2)
    elif how == "same":
        out = (h, w)
    else:
        out = (draw(st.integers(1, 100)), draw(st.integers(1, 100)))
    shape = (h, w) if channels is None else (h, w, channels)
    seed = draw(st.integers(0, 2**32 - 1))
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return image, out


@settings(max_examples=600, deadline=None)
@given(cases())
def test_uint8_results_equal_opencv_in_every_value(case):
    image, (height, width) = case
    got = resize_bilinear(image, height, width)
    want = reference(image, height, width)
    if image.ndim == 3 and want.ndim == 2:  # cv2 drops a single channel axis
        want = want[:, :, None]
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [(256, 256), (227, 227), (600, 800), (187, 250)])
def test_a_photograph_resized_equals_opencv(size):
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()  # 512 x 512 x 3
    np.testing.assert_array_equal(resize_bilinear(photo, *size), reference(photo, *size))
    gray = skimage_data.camera()
    np.testing.assert_array_equal(resize_bilinear(gray, *size), reference(gray, *size))


def test_edge_rows_are_clamped_with_their_weights_and_equal_sizes_copy():
    image = np.array([[0, 255], [255, 0]], np.uint8)
    got = resize_bilinear(image, 4, 4)
    np.testing.assert_array_equal(got, reference(image, 4, 4))
    same = resize_bilinear(image, 2, 2)
    assert same is not image and np.array_equal(same, image)


def test_float_images_follow_the_same_geometry():
    image = np.random.default_rng(0).random((9, 7, 3)).astype(np.float32)
    got = resize_bilinear(image, 13, 5)
    np.testing.assert_allclose(got, reference(image, 13, 5), atol=1e-5)


def test_a_size_below_one_is_refused():
    with pytest.raises(ValueError, match="both sizes must be positive"):
        resize_bilinear(np.zeros((2, 2), np.uint8), 0, 3)
