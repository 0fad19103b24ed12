"""Bilinear resizing with OpenCV's ``INTER_LINEAR`` geometry, which Caffe uses everywhere.

Pillow's bilinear filter widens its support when it shrinks an image (antialiasing), so
it does not give what Caffe's ``cv::resize(..., INTER_LINEAR)`` gives. This is the plain
two-tap version: half-pixel centres, edge samples clamped, uint8 results rounded half up.
OpenCV interpolates uint8 in 11-bit fixed point, so results may differ from it by a grey
level; this has not been checked against OpenCV itself (it is not a dependency).
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_bilinear"]


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    i0 = np.clip(lo, 0, n_in - 1)
    i1 = np.clip(lo + 1, 0, n_in - 1)
    return i0, i1, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an H×W×C image to ``height``×``width``; uint8 in → uint8 out, float in → float32 out."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}×{width}: both sizes must be positive")
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    src = image.astype(np.float32, copy=False)
    r0, r1, fy = _taps(h, height)
    c0, c1, fx = _taps(w, width)
    fy = fy[:, None, None]
    rows = src[r0] * (1 - fy) + src[r1] * fy
    fx = fx[None, :, None]
    out = rows[:, c0] * (1 - fx) + rows[:, c1] * fx
    if image.dtype == np.uint8:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(np.float32, copy=False)
