"""A colour PNG to gray as OpenCV's ``IMREAD_GRAYSCALE`` gets it from libpng (for Caffe).

OpenCV asks libpng to expand a palette, strip the alpha (a tRNS is dropped too) and convert
with ``png_set_rgb_to_gray(png, 1, 0.299, 0.587)``, and never sets a gamma. libpng 1.6
then computes, per 8-bit pixel (pngrtran.c, ``png_do_rgb_to_gray``; the same in every 1.6.x):

* weights ``9797, 19234, 3737`` /32768 (0.299 and 0.587 in fixed point, truncated);
* with no file gamma that matters (no gAMA/sRGB chunk, or a gamma within 5 % of 1.0):
  ``(9797 R + 19234 G + 3737 B) >> 15``, truncated;
* with one (sRGB, which always wins, counts as 1/2.2): each sample goes through an 8-bit
  "to linear" table, the weighted sum is rounded (``+ 16384``), and an 8-bit "from linear"
  table brings it back; a pixel with ``R == G == B`` keeps ``R``. The tables are
  ``floor(255 * (v / 255) ** g + 0.5)``, built with the C library's ``pow`` as libpng does.

Where libpng 1.6 releases differ (how an iCCP profile or an out-of-range gAMA counts) the
rules of 1.6.47 and later are followed. 16-bit colour PNGs are converted from their high
bytes (Pillow's 8-bit samples), which can differ from libpng by one level.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from PIL import Image

__all__ = ["png_file_gamma", "png_to_gray"]

_RC, _GC = 29900 * 32768 // 100000, 58700 * 32768 // 100000
_BC = 32768 - _RC - _GC
_SRGB = 45455  # libpng's PNG_GAMMA_sRGB_INVERSE


def png_file_gamma(data: bytes | memoryview) -> int | None:
    """The file gamma libpng takes from the chunks before the image data (fixed point,
    100000 = 1.0), or ``None``: a valid sRGB chunk gives 45455 whatever a gAMA says; else the
    first valid gAMA."""
    at, gamma, srgb_seen, gama_seen = 8, None, False, False
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind in (b"IDAT", b"PLTE", b"IEND"):
            break
        body = bytes(data[at + 8 : at + 8 + length])
        if kind == b"sRGB" and not srgb_seen:
            srgb_seen = True
            if length == 1 and body[0] <= 3:
                gamma = _SRGB
        elif kind == b"gAMA" and not gama_seen:
            gama_seen = True
            if length == 4:
                value = struct.unpack(">I", body)[0]
                if 0 < value <= 0x7FFFFFFF and gamma is None:
                    gamma = value
        at += 12 + length
    return gamma


def _reciprocal(g: int) -> int:
    return int(math.floor(1e10 / g + 0.5))


def _significant(g: int) -> bool:
    return g < 95000 or g > 105000


def _table(g: int) -> np.ndarray:
    """libpng's 8-bit gamma table for exponent ``g`` (fixed point)."""
    if not _significant(g):
        return np.arange(256, dtype=np.int64)
    return np.array([0] + [int(math.floor(255 * math.pow(v / 255.0, g * 1e-5) + 0.5)) for v in range(1, 255)]
                    + [255], dtype=np.int64)


def png_to_gray(img: Image.Image, data: bytes | memoryview) -> np.ndarray:
    """H×W uint8 gray of the colour PNG ``img`` (opened from ``data``), as libpng converts it."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.int64)  # palette expanded, alpha dropped
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    gamma = png_file_gamma(data)
    screen = _reciprocal(gamma) if gamma else 100000
    if gamma is None or not (_significant(gamma) or _significant(screen)):
        return ((_RC * r + _GC * g + _BC * b) >> 15).astype(np.uint8)
    to_linear, from_linear = _table(_reciprocal(gamma)), _table(_reciprocal(screen))
    gray = from_linear[(_RC * to_linear[r] + _GC * to_linear[g] + _BC * to_linear[b] + 16384) >> 15]
    same = (r == g) & (g == b)
    gray[same] = r[same]
    return gray.astype(np.uint8)
