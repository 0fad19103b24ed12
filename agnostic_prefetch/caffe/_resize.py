"""Bilinear resizing exactly as OpenCV's ``cv::resize(..., INTER_LINEAR)`` computes it for Caffe.

Caffe resizes with OpenCV everywhere (ImageData's ``new_height``/``new_width``, WindowData's
warp, ``convert_imageset --resize_*``). For 8-bit images OpenCV works in fixed point, and
these are its rules, reproduced here bit for bit (checked against ``cv2`` over random
images, sizes and scales in ``tests/test_resize.py``):

* **Geometry.** Output column ``x`` samples ``f = float32((x + 0.5) * scale - 0.5)`` with
  ``scale = 1 / (out / in)`` in double; ``s = floor(f)``, ``f -= s``. Columns left of the
  image (``s < 0``) or at its right edge (``s >= in - 1``) take the edge pixel with weight
  one. Rows use the same formula but are *not* given those weights: their indices are
  clamped to the image and keep ``f`` (so a top row can be mixed with itself).
* **Weights** are ``round(w * 2048)`` (11 bits), rounded half to even, from the float32
  weights ``1 - f`` and ``f``.
* **Horizontal pass** in int32: ``S[s] * a0 + S[s + 1] * a1``.
* **Vertical pass**, as OpenCV's SIMD and scalar code both compute it for 8 bits:
  ``(((H0 >> 4) * b0 >> 16) + ((H1 >> 4) * b1 >> 16) + 2) >> 2``.
* **Special cases.** Equal sizes copy. An exact 2× downscale on both axes takes OpenCV's
  INTER_AREA fast path: the mean of each 2×2 block, ``(sum + 2) >> 2``.

Float images (not used by Caffe's layers) follow the same geometry with float32 weights.
Written in numpy rather than calling OpenCV: cv2 in every worker would add its import time
and its own thread pool to each process, and its pip wheels are large.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_bilinear"]

_ONE = 2048  # 1 << INTER_RESIZE_COEF_BITS


def _taps(n_in: int, n_out: int, *, edge_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source index and the float32 weight of the next sample, per output index."""
    scale = 1.0 / (n_out / n_in)  # as OpenCV: the inverse of the inverse scale, in double
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    f = f - s
    s = s.astype(np.int64)
    if edge_weights:
        outside = (s < 0) | (s >= n_in - 1)
        f[outside] = 0
        s = np.clip(s, 0, n_in - 1)
    return s, np.minimum(s + 1, n_in - 1), f


def _fixed(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    one = np.float32(_ONE)
    return (np.rint((np.float32(1) - f) * one).astype(np.int32),
            np.rint(f * one).astype(np.int32))


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H×W(×C) image to ``height``×``width`` as OpenCV's INTER_LINEAR does.

    uint8 in → uint8 out (bit-exact with OpenCV); float in → float32 out.

    Example:
        >>> resize_bilinear(np.array([[0, 255]], np.uint8), 1, 4).tolist()
        [[0, 64, 191, 255]]
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}×{width}: both sizes must be positive")
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.copy()
    if image.dtype != np.uint8:
        return _resize_float(image.astype(np.float32, copy=False), height, width)
    if (h, w) == (2 * height, 2 * width):
        s = image.astype(np.int32)
        total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((total + 2) >> 2).astype(np.uint8)
    channels = 1 if image.ndim == 2 else int(np.prod(image.shape[2:]))
    x0, x1, fx = _taps(w, width, edge_weights=True)
    a0, a1 = _fixed(fx)
    y0, y1, fy = _taps(h, height, edge_weights=False)
    b0, b1 = _fixed(fy)
    y0, y1 = np.clip(y0, 0, h - 1), np.clip(y1, 0, h - 1)
    # The horizontal pass only over the source rows the output reads, on rows flattened to
    # (width x channels) so each tap is one take; in-place steps keep the temporaries few.
    rows, where = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    src = image[rows].reshape(len(rows), w * channels)
    lane = np.arange(channels)
    across = np.take(src, (x0[:, None] * channels + lane).ravel(), axis=1).astype(np.int32)
    across *= np.repeat(a0, channels)
    right = np.take(src, (x1[:, None] * channels + lane).ravel(), axis=1).astype(np.int32)
    right *= np.repeat(a1, channels)
    across += right
    across >>= 4
    out = np.take(across, where[:height], axis=0)
    out *= b0[:, None]
    out >>= 16
    bottom = np.take(across, where[height:], axis=0)
    bottom *= b1[:, None]
    bottom >>= 16
    out += bottom
    out += 2
    out >>= 2
    return out.astype(np.uint8).reshape((height, width) + image.shape[2:])


def _resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    x0, x1, fx = _taps(w, width, edge_weights=True)
    y0, y1, fy = _taps(h, height, edge_weights=False)
    y0, y1 = np.clip(y0, 0, h - 1), np.clip(y1, 0, h - 1)
    shape = (1, width) + (1,) * (image.ndim - 2)
    across = image[:, x0] * (1 - fx).reshape(shape) + image[:, x1] * fx.reshape(shape)
    shape = (height,) + (1,) * (image.ndim - 1)
    return (across[y0] * (1 - fy).reshape(shape) + across[y1] * fy.reshape(shape)).astype(np.float32)
