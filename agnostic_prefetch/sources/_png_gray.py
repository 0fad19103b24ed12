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

A 16-bit colour PNG is converted at 16 bits (its samples decoded here: Pillow gives only 8),
with libpng's 16-bit tables, then its high byte is kept; an interlaced one is converted from
Pillow's 8-bit samples, which can differ by a level. Where libpng 1.6 releases differ
(how an iCCP profile or an out-of-range gAMA counts) the rules of 1.6.47 and later are
followed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image

__all__ = ["png16_to_gray", "png_file_gamma", "png_to_gray"]

_RC, _GC = 29900 * 32768 // 100000, 58700 * 32768 // 100000
_BC = 32768 - _RC - _GC
_SRGB = 45455  # libpng's PNG_GAMMA_sRGB_INVERSE


def png_file_gamma(data: bytes | memoryview) -> int | None:
    """The file gamma libpng takes from the chunks before the image data (fixed point,
    100000 = 1.0), or ``None``: a valid sRGB chunk gives 45455 whatever a gAMA says; else the
    first valid gAMA."""
    gamma, srgb_seen, gama_seen = None, False, False
    for kind, body in _each_chunk(data):
        if kind in (b"IDAT", b"PLTE", b"IEND"):
            break
        if kind == b"sRGB" and not srgb_seen:
            srgb_seen = True
            if len(body) == 1 and body[0] <= 3:
                gamma = _SRGB
        elif kind == b"gAMA" and not gama_seen:
            gama_seen = True
            if len(body) == 4:
                value = struct.unpack(">I", body)[0]
                if 0 < value <= 0x7FFFFFFF and gamma is None:
                    gamma = value
    return gamma


def _each_chunk(data: bytes | memoryview) -> Iterator[tuple[bytes, bytes]]:
    """(kind, body) of each chunk, in order, up to IEND."""
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        yield kind, bytes(data[at + 8 : at + 8 + length])
        if kind == b"IEND":
            return
        at += 12 + length


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
    if data[24] == 16:  # IHDR bit depth: Pillow's samples would be 8-bit
        gray = png16_to_gray(data)
        if gray is not None:
            return gray
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


# ---- 16-bit colour: libpng converts at 16 bits, then keeps the high byte --------------

def _chunks(data: bytes | memoryview) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for kind, body in _each_chunk(data):
        found.setdefault(kind, []).append(body)
    return found


def _unfilter(stream: bytes, height: int, row_bytes: int, bpp: int) -> np.ndarray:
    """PNG's per-row filters undone: (height, row_bytes) uint8."""
    out = np.zeros((height, row_bytes), np.uint8)
    prior = np.zeros(row_bytes, np.int64)
    for y in range(height):
        start = y * (row_bytes + 1)
        kind, raw = stream[start], np.frombuffer(stream, np.uint8, row_bytes, start + 1).astype(np.int64)
        if kind == 0:
            row = raw
        elif kind == 2:
            row = (raw + prior) & 0xFF
        elif kind == 1:
            row = np.cumsum(np.pad(raw, (0, -len(raw) % bpp)).reshape(-1, bpp), axis=0).reshape(-1)[:row_bytes] & 0xFF
        else:  # average, Paeth: each byte needs the one decoded before it
            row = raw.copy()
            for x in range(row_bytes):
                left = row[x - bpp] if x >= bpp else 0
                up, corner = prior[x], (prior[x - bpp] if x >= bpp else 0)
                if kind == 3:
                    row[x] = (row[x] + ((left + up) >> 1)) & 0xFF
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    row[x] = (row[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        out[y] = row
        prior = row
    return out


def _samples16(data: bytes | memoryview) -> tuple[np.ndarray, dict[bytes, list[bytes]]] | None:
    """A 16-bit colour PNG's R, G, B samples (H×W×3 int64) and its chunks; ``None`` for an
    interlaced one (not decoded here).

    Raises:
        ValueError: no 13-byte IHDR, or image data that does not inflate to the rows IHDR
            asks for. Inflating stops there: data that inflates to more (a zlib bomb behind
            a small image that Pillow read) costs no more memory than the image.
    """
    import zlib

    chunks = _chunks(data)
    header = chunks.get(b"IHDR", [b""])[0]
    if len(header) != 13:
        raise ValueError(f"its IHDR chunk holds {len(header)} bytes, not 13")
    width, height, _, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if interlace or color_type not in (2, 6):
        return None
    channels = 3 if color_type == 2 else 4
    size = height * (width * 2 * channels + 1)
    try:
        stream = zlib.decompressobj().decompress(b"".join(chunks.get(b"IDAT", [])), max(size, 1))  # 0: no limit
    except zlib.error as exc:
        raise ValueError(f"its image data does not inflate: {exc}") from None
    if len(stream) < size:
        raise ValueError(f"its image data inflates to {len(stream)} bytes; its {width}×{height} "
                         f"rows need {size}")
    rows = _unfilter(stream, height, width * 2 * channels, 2 * channels)
    values = rows.reshape(height, width, channels, 2).astype(np.int64)
    return ((values[..., 0] << 8) | values[..., 1])[:, :, :3], chunks


def _table16(shift: int, g: int) -> np.ndarray:
    """libpng's 16-bit gamma table, indexed by ``v >> shift``."""
    top = (1 << (16 - shift)) - 1
    if not _significant(g):
        return (np.arange(top + 1, dtype=np.int64) * 65535 + (1 << (15 - shift))) // top if shift else np.arange(65536)
    step = 1.0 / top
    return np.array([int(math.floor(65535.0 * math.pow(i * step, g * 1e-5) + 0.5)) & 0xFFFF
                     for i in range(top + 1)], dtype=np.int64)


def _table16_to_8(shift: int, g: int) -> np.ndarray:
    """libpng's table from a 16-bit value (``>> shift``) to the nearest 8-bit one (×257)."""
    top = (1 << (16 - shift)) - 1
    table = np.full(1 << (16 - shift), 65535, np.int64)
    last = 0
    for i in range(255):
        value = 257 * i + 128
        bound = int(math.floor(65535 * math.pow(value / 65535.0, g * 1e-5) + 0.5))
        bound = (bound * top + 32768) // 65535 + 1
        if bound > last:
            table[last:bound] = 257 * i
            last = bound
    return table


def png16_to_gray(data: bytes | memoryview) -> np.ndarray | None:
    """H×W uint8 gray of a 16-bit colour PNG, as libpng converts it at 16 bits for OpenCV
    (``None`` for an interlaced one)."""
    decoded = _samples16(data)
    if decoded is None:
        return None
    rgb, chunks = decoded
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    gamma = png_file_gamma(data)
    screen = _reciprocal(gamma) if gamma else 100000
    if gamma is None or not (_significant(gamma) or _significant(screen)):
        return (((_RC * r + _GC * g + _BC * b + 16384) >> 15) >> 8).astype(np.uint8)
    sbit = chunks.get(b"sBIT")
    significant_bits = max(sbit[0][:3]) if sbit and len(sbit[0]) >= 3 else 0
    shift = 16 - significant_bits if 0 < significant_bits < 16 else 0
    shift = min(max(shift, 5), 8)  # libpng: at most 11 bits of table when it strips to 8
    to_linear, from_linear = _table16(shift, _reciprocal(gamma)), _table16(shift, _reciprocal(screen))
    correction = int(math.floor(1e15 / screen / gamma + 0.5))
    to_8 = _table16_to_8(shift, _reciprocal(correction))
    gray16 = ((_RC * to_linear[r >> shift] + _GC * to_linear[g >> shift] + _BC * to_linear[b >> shift]
               + 16384) >> 15) & 0xFFFF
    out = np.where((r == g) & (g == b), to_8[r >> shift], from_linear[gray16 >> shift])
    return (out >> 8).astype(np.uint8)
