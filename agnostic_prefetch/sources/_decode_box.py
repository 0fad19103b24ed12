"""Decoding one box of an image, at a DCT scale: what a crop keeps, and as little else as the library allows.

Which library does what (measured in benchmarks/bench_decode_box.py, figures in
docs/benchmarks.md):

* scale 1, a JPEG: the CPU backend of ``nvidia-nvimgcodec-cu12`` (a wheel bundling
  libjpeg-turbo; no GPU needed) decodes the region alone, with libjpeg-turbo's
  ``jpeg_skip_scanlines`` and ``jpeg_crop_scanline``: rows below the box are not read, rows
  above are entropy-decoded only, columns outside are not transformed. Where it is not
  installed the whole JPEG is decoded (simplejpeg) and cut, the same pixels, with one
  warning per process. No other wheel found here exposes those two calls.
* scale 2, 4 or 8, a JPEG: libjpeg-turbo's DCT scaling through simplejpeg (Pillow's
  ``draft`` where simplejpeg is missing: the same pixels), the whole image at 1/scale,
  then cut. nvimgcodec does not scale.
* anything else (PNG, CMYK JPEGs, ...): :func:`decode_image` whole, cut (and at scale > 1
  shrunk by Pillow's ``reduce``: the mean of each scale×scale block).

Either way the result is the box cut from the same library's whole decode at that scale,
pixel for pixel (tests/test_decode_box.py).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from agnostic_prefetch.sources import images as _images
from agnostic_prefetch.sources.images import ImageDecodeError, decode_image

__all__ = ["EncodedImage", "ImageHeader", "box_decoder", "box_pixels", "decode_box", "decode_box_of", "read_header"]

log = logging.getLogger("agnostic_prefetch")

SCALES = (1, 2, 4, 8)


@dataclass(frozen=True)
class ImageHeader:
    """What a box decode needs to know before decoding: the size as decoded (turned when
    EXIF orientation applies), the EXIF orientation to apply (1: none), and whether
    libjpeg-turbo decodes it here (``fast``: regions and DCT scales apply)."""

    height: int
    width: int
    orientation: int = 1
    fast: bool = False
    colorspace: str = ""
    jpeg: bool = False


def read_header(data: bytes | memoryview, *, name: str = "image", orient: bool = False) -> ImageHeader:
    """The image's :class:`ImageHeader`, from its header (and EXIF segment), not decoded."""
    is_jpeg = bytes(data[:3]) == b"\xff\xd8\xff"
    orientation = 1
    if orient and is_jpeg and _images._has_exif(data):
        orientation = int(_images._open(data, name).getexif().get(_images._ORIENTATION, 1))
        orientation = orientation if 1 <= orientation <= 8 else 1
    fast, colorspace = False, ""
    if is_jpeg and _images._simplejpeg is not None:
        try:
            h, w, colorspace, _ = _images._simplejpeg.decode_jpeg_header(data)
            limit = Image.MAX_IMAGE_PIXELS
            fast = colorspace in _images._FAST_COLORSPACES and (limit is None or h * w <= limit)
        except (ValueError, TypeError, OSError):
            fast = False
    if not fast:
        img = _images._open(data, name)
        h, w = img.height, img.width
    if orientation >= 5:
        h, w = w, h
    return ImageHeader(int(h), int(w), orientation, fast, colorspace, is_jpeg)


# -- the region decoder (nvimgcodec), one per thread -------------------------------------------

_lock = threading.Lock()
_module: Any = None
_tried = False
_local = threading.local()


def _import_region_library() -> Any:
    """nvimgcodec, or None (not installed, refused, or turned off by
    ``AGNOSTIC_PREFETCH_JPEG_REGION=off``), warning once per process when it is missing."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        setting = os.environ.get("AGNOSTIC_PREFETCH_JPEG_REGION", "").lower()
        if setting not in ("0", "off", "no", "false") and _images._simplejpeg is not None:
            os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
            # Its GPU extensions print from C to the process's stderr, at import, when their
            # CUDA libraries are absent (always, on a CPU-only worker): stderr is pointed at
            # /dev/null for that moment so every worker does not print eight error lines.
            saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
                _module = importlib.import_module("nvidia.nvimgcodec")
            except (ImportError, OSError):
                _module = None
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(devnull)
            if _module is None:
                log.warning(
                    "nvidia-nvimgcodec-cu12 is not importable: JPEG boxes are decoded whole and "
                    "cut (the same pixels, slower). Remedy: pip install 'agnostic_prefetch[jpeg]' "
                    "(Linux), or set AGNOSTIC_PREFETCH_JPEG_REGION=off to silence this.")
        _tried = True
        return _module


def _region_decoder() -> Any:
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        nv = _import_region_library()
        if nv is None:
            return None
        # CPU only (no CUDA context in a worker), and one thread: the loader's workers are
        # the parallelism; a pool per decoder would oversubscribe the cores.
        decoder = _local.decoder = nv.Decoder(
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
            backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        _local.params = {gray: nv.DecodeParams(color_spec=nv.ColorSpec.GRAY if gray else nv.ColorSpec.SRGB,
                                               apply_exif_orientation=False) for gray in (False, True)}
    return decoder


def box_decoder() -> str:
    """Which library decodes a JPEG's box at scale 1 here: ``"nvimgcodec"`` (the region
    alone), or ``"simplejpeg"``/``"pillow"`` (the whole image, then cut)."""
    return "nvimgcodec" if _import_region_library() is not None else _images.jpeg_decoder()


def _region_pays(rows: tuple[int, int], cols: tuple[int, int], stored: tuple[int, int]) -> bool:
    """Whether nvimgcodec's region decode beats simplejpeg's whole decode (then a cut).

    Relative to the whole decode it costs about 0.56 × the fraction of rows down to the
    region's bottom (entropy decoding: every column, rows below skipped) + 0.53 × the
    fraction of the image in the region (IDCT, upsampling, colour) + a fixed 26 µs, about
    6,500 pixels' worth: a least-squares fit over torchvision's train boxes on ImageNet-sized
    JPEGs (``benchmarks/bench_decode_box.py --fit``). A crop keeping most of a small image,
    as Caffe's 224 of 256, decodes faster whole."""
    height, width = stored
    first, last = _region_columns(cols, width)
    pixels = height * width
    return 0.56 * rows[1] / height + 0.53 * (rows[1] - rows[0]) * (last - first) / pixels + 6500 / pixels < 0.9


def _region_columns(cols: tuple[int, int], width: int) -> tuple[int, int]:
    """The columns the region decode asks for: libjpeg-turbo upsamples chroma without its
    "fancy" filter when a cropped row holds two chroma samples or fewer, which changes those
    pixels; a region at least 32 columns wide from an iMCU boundary (where libjpeg starts a
    crop anyway) keeps the filter."""
    first = cols[0] - cols[0] % 16
    return first, min(width, max(cols[1], first + 32))


def _decode_region(data: bytes | memoryview, rows: tuple[int, int], cols: tuple[int, int],
                   gray: bool, width: int) -> np.ndarray | None:
    """libjpeg-turbo's region decode at scale 1, or None (no region library, or it declined)."""
    decoder = _region_decoder()
    if decoder is None:
        return None
    nv = _module
    first, last = _region_columns(cols, width)
    stream = nv.CodeStream(data if isinstance(data, bytes) else bytes(data))
    region = stream.get_sub_code_stream(region=nv.Region(start=(rows[0], first), end=(rows[1], last)))
    image = decoder.decode(region, params=_local.params[gray])
    if image is None:  # corrupt, truncated, unusual: the whole-image path decides and names it
        return None
    return np.asarray(image.cpu())[:, cols[0] - first : cols[1] - first]


# -- the box -----------------------------------------------------------------------------------

def _check_box(box: Sequence[int], header: ImageHeader, name: str) -> tuple[int, int, int, int]:
    try:
        top, left, height, width = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be (top, left, height, width), four integers; got {box!r}") from None
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > header.height or left + width > header.width:
        raise ValueError(
            f"box (top={top}, left={left}, height={height}, width={width}) is not inside {name}, "
            f"which is {header.height}×{header.width} (height×width"
            f"{', as its EXIF orientation turns it' if header.orientation != 1 else ''}); "
            "remedy: a box with height, width >= 1 within the image")
    return top, left, height, width


def _span(start: int, length: int, size: int, scale: int) -> tuple[int, int]:
    """The rows (or columns) of the 1/scale image that cover ``start:start + length``."""
    return start // scale, min(-(-(start + length) // scale), -(-size // scale))


def _stored_rect(rows: tuple[int, int], cols: tuple[int, int], orientation: int,
                 height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rect of the stored (unturned) image that EXIF ``orientation`` turns into
    ``rows`` × ``cols`` of the turned ``height`` × ``width`` image (as ``images._oriented``
    turns it: transpose for 5-8, then flips)."""
    flip_rows = orientation in (3, 4, 7, 8)
    flip_cols = orientation in (2, 3, 6, 7)
    if flip_rows:
        rows = (height - rows[1], height - rows[0])
    if flip_cols:
        cols = (width - cols[1], width - cols[0])
    return (cols, rows) if orientation >= 5 else (rows, cols)


def decode_box(data: bytes | memoryview, box: Sequence[int], *, scale: int = 1,
               out: np.ndarray | None = None, orient: bool = False, color: bool | None = None,
               name: str = "image") -> np.ndarray:
    """Decode the ``box`` of an encoded image, at 1/``scale`` of its size, as H×W×C uint8.

    The result is, pixel for pixel, the box cut from the whole image decoded at that scale
    by the same library (:func:`decode_image` at scale 1): rows ``top // scale`` to
    ``ceil((top + height) / scale)`` and the same for columns, of an image of
    ``ceil(H / scale)`` × ``ceil(W / scale)``. For a JPEG, only the box is decoded where
    nvidia-nvimgcodec is installed (scale 1), and scales 2, 4, 8 are libjpeg-turbo's DCT
    scaling; other formats are decoded whole.

    Args:
        data: the encoded image (JPEG, PNG, anything Pillow reads).
        box: ``(top, left, height, width)`` in the image's pixels (of the turned image when
            ``orient``).
        scale: 1, 2, 4 or 8.
        out: an array of the result's shape, dtype uint8, to write into (returned).
        orient: turn the image as its EXIF orientation says first (as :func:`decode_image`).
        color: True for RGB, False for one channel, None for the image's own.
        name: how errors refer to the image.

    Raises:
        ValueError: a box outside the image, a scale not in (1, 2, 4, 8), an ``out`` of
            another shape; ImageDecodeError: not decodable.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG")
        >>> decode_box(buf.getvalue(), (8, 16, 20, 30)).shape
        (20, 30, 3)
        >>> decode_box(buf.getvalue(), (8, 16, 20, 30), scale=4).shape
        (5, 8, 3)
    """
    header = read_header(data, name=name, orient=orient)
    return decode_box_of(data, header, box, scale=scale, out=out, color=color, name=name)


def decode_box_of(data: bytes | memoryview, header: ImageHeader, box: Sequence[int], *, scale: int = 1,
                  out: np.ndarray | None = None, color: bool | None = None, name: str = "image") -> np.ndarray:
    """:func:`decode_box` with the header already read (:func:`read_header`: its
    orientation is the one applied)."""
    crop = box_pixels(data, header, box, scale=scale, color=color, name=name)
    if out is None:
        return np.ascontiguousarray(crop)
    if not isinstance(out, np.ndarray) or out.shape != crop.shape or out.dtype != np.uint8:
        raise ValueError(
            f"out must be a uint8 array of shape {crop.shape} for box {tuple(box)} at scale {scale}, got "
            f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    np.copyto(out, crop)
    return out


def box_pixels(data: bytes | memoryview, header: ImageHeader, box: Sequence[int], *, scale: int = 1,
               color: bool | None = None, name: str = "image") -> np.ndarray:
    """:func:`decode_box_of` without its copy into a contiguous array: a view, of any
    strides, of the decoded region or image (for a caller that reads it once anyway)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (libjpeg's DCT scales), got {scale!r}")
    top, left, height, width = _check_box(box, header, name)
    rows, cols = _span(top, height, header.height, scale), _span(left, width, header.width, scale)
    o = header.orientation
    stored = (header.width, header.height) if o >= 5 else (header.height, header.width)
    srows, scols = _stored_rect(rows, cols, o, -(-header.height // scale), -(-header.width // scale))
    crop = _decode_stored(data, header, srows, scols, scale, color, name, stored)
    return _images._oriented(crop, o) if o != 1 else crop


def _decode_stored(data: bytes | memoryview, header: ImageHeader, rows: tuple[int, int],
                   cols: tuple[int, int], scale: int, color: bool | None, name: str,
                   stored: tuple[int, int]) -> np.ndarray:
    """Rows × cols of the stored image at 1/scale."""
    if header.fast:
        target = _images.fast_target(header.colorspace, color)
        if target is not None:
            if scale == 1 and _region_pays(rows, cols, stored):
                region = _decode_region(data, rows, cols, gray=target == "GRAY", width=stored[1])
                if region is not None:
                    return region
            whole = _images._decode_jpeg_fast(data, color, scale)
            if whole is not None:
                return whole[rows[0]:rows[1], cols[0]:cols[1]]
    elif header.jpeg and scale > 1 and _images._simplejpeg is None:
        return _drafted(data, color, scale, name, stored)[rows[0]:rows[1], cols[0]:cols[1]]
    whole = decode_image(data, name=name, color=color)
    if scale > 1:
        img = Image.fromarray(whole[:, :, 0] if whole.shape[2] == 1 else whole)
        reduced = np.asarray(img.reduce(scale))
        whole = reduced if reduced.ndim == 3 else reduced[:, :, None]
    return whole[rows[0]:rows[1], cols[0]:cols[1]]


def _drafted(data: bytes | memoryview, color: bool | None, scale: int, name: str,
             stored: tuple[int, int]) -> np.ndarray:
    """Pillow's DCT-scaled decode (``draft``), where simplejpeg is missing: the same pixels."""
    img = _images._open(data, name)
    target = "L" if (color is False or (color is None and img.mode == "L")) else "RGB"
    try:
        # draft picks the largest scale whose size is at least the one asked for, by floor division
        img.draft(target, (stored[1] // scale, stored[0] // scale))
        arr = np.asarray(img.convert(target) if img.mode != target else img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode {name}: {exc}") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes and how its source decodes them, left for the transform: a
    transform that crops (:class:`CaffeTransform`, :class:`RandomResizedCropDecode`) then
    decodes only its box. Sources give these with ``decode=False``.

    ``color``, ``orient``: as :func:`decode_image` takes them; ``channel_order``: ``"bgr"``
    reverses the colour channels after decoding (an alpha channel stays last).
    """

    data: bytes
    name: str = "image"
    color: bool | None = None
    orient: bool = False
    channel_order: str = "rgb"

    def header(self) -> ImageHeader:
        """The size as decoded, from the header."""
        return read_header(self.data, name=self.name, orient=self.orient)

    def decode(self, box: Sequence[int] | None = None, header: ImageHeader | None = None) -> np.ndarray:
        """The whole image, or its ``box`` (top, left, height, width) alone, H×W×C uint8."""
        return np.ascontiguousarray(self.pixels(box, header))

    def pixels(self, box: Sequence[int] | None = None, header: ImageHeader | None = None) -> np.ndarray:
        """:meth:`decode` without its copy into a contiguous array (:func:`box_pixels`)."""
        header = header or self.header()
        box = (0, 0, header.height, header.width) if box is None else box
        arr = box_pixels(self.data, header, box, color=self.color, name=self.name)
        if self.channel_order == "bgr" and arr.shape[2] >= 3:
            arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]
        return arr

    def __repr__(self) -> str:
        return f"EncodedImage({self.name}, {len(self.data)} bytes)"
