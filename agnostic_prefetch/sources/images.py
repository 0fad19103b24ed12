"""Image decoding: file or bytes in, H×W×C uint8 (RGB or gray) out, errors naming the image.

JPEGs go through ``simplejpeg`` (libjpeg-turbo, decoding straight into one numpy array)
when it is importable (faster than Pillow: S2 in docs/benchmarks.md); everything else, and any JPEG
simplejpeg declines (CMYK/YCCK, a colour change such as color JPEG to gray, above Pillow's
pixel limit, or an error), goes through Pillow, so errors and edge cases stay Pillow's.
Both use libjpeg-turbo's accurate integer DCT and fancy upsampling: on the scikit-image
photographs at qualities 75–95 (4:2:0 and 4:4:4) the two gave identical pixels. Set
``AGNOSTIC_PREFETCH_JPEG=pillow`` in the environment to force Pillow.

Pillow's decompression-bomb guard only *warns* between ``Image.MAX_IMAGE_PIXELS`` and twice
that (~89–179 megapixels by default) and raises above. A loader decoding millions of
images must not let a 150-megapixel file through with a warning nobody sees, so both
cases become :class:`ImageTooLargeError` naming the image; the limit itself stays
Pillow's (raise ``PIL.Image.MAX_IMAGE_PIXELS`` deliberately to admit bigger images).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from agnostic_prefetch.sources._png_gray import png_to_gray

try:  # optional: libjpeg-turbo straight into numpy
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None
if os.environ.get("AGNOSTIC_PREFETCH_JPEG", "").lower() == "pillow":
    _simplejpeg = None


def jpeg_decoder() -> str:
    """Which library decodes JPEGs here: ``"simplejpeg"`` (libjpeg-turbo), or ``"pillow"``
    where simplejpeg is missing or ``AGNOSTIC_PREFETCH_JPEG=pillow`` is set."""
    return "pillow" if _simplejpeg is None else "simplejpeg"

__all__ = ["ImageDecodeError", "ImageTooLargeError", "decode_image", "jpeg_decoder", "load_image", "probe_file",
           "probe_image"]

# Pillow modes whose natural decoding is one channel (OpenCV's IMREAD_ANYCOLOR keeps them gray).
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, or not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """An image above Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""


def _open(data: bytes | memoryview, name: str) -> Image.Image:
    # catch_warnings changes process-wide filters for its duration; the only warning we
    # turn into an error here is Pillow's bomb warning, raised inside Image.open.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageTooLargeError(
                f"{name} is too large to decode safely: {exc} Remedy: downscale the image, "
                "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the data."
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"cannot decode {name}: {exc}") from None


def _native_mode(img: Image.Image) -> str:
    """The mode OpenCV's ``IMREAD_UNCHANGED`` decodes an 8-bit image to: gray stays gray, an
    alpha channel (or a palette's transparency) gives RGBA, gray with alpha too (the gray
    repeated), anything else RGB."""
    if img.mode == "LA" or img.mode == "RGBA" or (img.mode in ("P", "PA") and "transparency" in img.info):
        return "RGBA"
    return "L" if img.mode in _GRAY_MODES else "RGB"


def probe_image(data: bytes | memoryview, *, name: str) -> tuple[int, int, int]:
    """(height, width, channels) that :func:`decode_image` with ``color=None`` would return, header only."""
    img = _open(data, name)
    return img.height, img.width, {"L": 1, "RGB": 3, "RGBA": 4}[_native_mode(img)]


def decode_image(data: bytes | memoryview, *, name: str, color: bool | None = None,
                 orient: bool = False) -> np.ndarray:
    """Decode encoded image bytes to an H×W×C uint8 array, channels in RGB order.

    Args:
        data: the file's bytes (JPEG, PNG, BMP, ... anything Pillow reads).
        name: how errors refer to the image (a path, or a record key).
        color: True forces 3 channels, False forces 1, None keeps the image's own, as
            OpenCV's ``IMREAD_UNCHANGED`` does for Caffe's ``DecodeDatumToCVMatNative``:
            gray stays 1 channel, an image with alpha (or a palette with transparency)
            is RGBA, anything else RGB. One channel from a colour JPEG is its Y plane as
            libjpeg decodes it, and from a colour PNG libpng's integer conversion, as
            OpenCV's ``IMREAD_GRAYSCALE`` gives (see ``_png_gray.py``).
        orient: turn a JPEG as its EXIF orientation says, as OpenCV's ``imread`` does
            (Caffe's ImageData and WindowData layers and ``convert_imageset`` read files
            so); ``imdecode`` of an encoded Datum does not.

    Raises:
        ImageDecodeError: not decodable; ImageTooLargeError: above Pillow's pixel limit.
    """
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    arr = _decode(data, name, color, is_jpeg)
    if orient and is_jpeg and _has_exif(data):
        arr = _oriented(arr, _open(data, name).getexif().get(_ORIENTATION, 1))
    return arr


_ORIENTATION = 0x0112  # the EXIF tag


def _has_exif(data: bytes | memoryview) -> bool:
    """Whether a JPEG has an EXIF segment among the application segments before its frame
    (a walk over a few segment headers: asking Pillow costs as much as a third of a decode)."""
    at, end = 2, len(data)
    while at + 4 <= end and data[at] == 0xFF:
        marker = data[at + 1]
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):  # past APPn and comments
            return False
        length = (data[at + 2] << 8) | data[at + 3]
        if marker == 0xE1 and bytes(data[at + 4 : at + 10]) == b"Exif\x00\x00":
            return True
        at += 2 + length
    return False


def _oriented(arr: np.ndarray, orientation: int) -> np.ndarray:
    """``arr`` turned as EXIF ``orientation`` (1-8) says, the way OpenCV applies it: for 5-8
    a transpose, then the flips."""
    steps = {2: (1, -1), 3: (-1, -1), 4: (-1, 1), 5: (1, 1), 6: (1, -1), 7: (-1, -1), 8: (-1, 1)}.get(orientation)
    if steps is None:  # 1 (as stored), or a value EXIF does not define
        return arr
    if orientation >= 5:
        arr = arr.transpose(1, 0, 2)
    return np.ascontiguousarray(arr[:: steps[0], :: steps[1]])


def _decode(data: bytes | memoryview, name: str, color: bool | None, is_jpeg: bool) -> np.ndarray:
    if _simplejpeg is not None and is_jpeg:
        arr = _decode_jpeg_fast(data, color)
        if arr is not None:
            return arr
    img = _open(data, name)
    if is_jpeg and color is False and img.mode not in _GRAY_MODES:
        img.draft("L", img.size)  # libjpeg's own gray output: the Y plane, unconverted
    try:
        img.load()
        if color is False and img.format == "PNG" and img.mode not in _GRAY_MODES:
            return png_to_gray(img, data)[:, :, None]  # libpng's own conversion, as OpenCV's
        native = _native_mode(img) if color is None else None
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit gray: keep the high byte, as OpenCV does when it reads to 8 bits
            arr16 = np.asarray(img, dtype=np.int64)
            shift = 8 if img.mode.startswith("I;16") else 0
            gray = Image.fromarray(np.clip(arr16 >> shift, 0, 255).astype(np.uint8))
            img = gray
        target = native or ("RGB" if color else "L")
        if img.mode != target:
            img = img.convert(target)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode {name}: {exc}") from None
    finally:
        img.close()
    return arr if arr.ndim == 3 else arr[:, :, None]


_FAST_COLORSPACES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}


def fast_target(colorspace: str, color: bool | None) -> str | None:
    """The libjpeg-turbo output (``"RGB"`` or ``"GRAY"``) that gives what the Pillow path
    would for a JPEG of ``colorspace``, or None where only Pillow's rules apply."""
    target = _FAST_COLORSPACES.get(colorspace)
    if target == "RGB" and color is False and colorspace == "YCbCr":
        target = "GRAY"  # libjpeg-turbo's gray output of YCbCr: the Y plane, unconverted
    if target is None or (color is not None and color != (target == "RGB")):
        return None  # CMYK/YCCK, or a colour conversion: Pillow's own conversion rules
    return target


def _decode_jpeg_fast(data: bytes | memoryview, color: bool | None, scale: int = 1) -> np.ndarray | None:
    """simplejpeg's decoding when it gives what the Pillow path would, else None (use Pillow);
    at 1/``scale`` of the size (libjpeg's DCT scaling, ``ceil(H / scale)`` rows) when ``scale > 1``."""
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        target = fast_target(colorspace, color)
        if target is None:
            return None
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and h * w > limit:
            return None  # Pillow raises ImageTooLargeError with its message
        if scale == 1:
            return _simplejpeg.decode_jpeg(data, colorspace=target, strict=True)
        return _simplejpeg.decode_jpeg(data, colorspace=target, strict=True,
                                       min_height=-(-h // scale), min_width=-(-w // scale))
    except (ValueError, TypeError, OSError):
        return None  # corrupt or unusual: Pillow decides (and names the image in its error)


def probe_file(path: str) -> tuple[int, int, int]:
    """(height, width, channels) that :func:`load_image` with ``color=None`` would return,
    from the file's header (its EXIF orientation applied), not decoded.

    Raises:
        FileNotFoundError: no file at ``path``; ImageDecodeError: not an image.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)  # headers (EXIF included) sit at the start
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path!r}") from None
    img = _open(data, repr(os.fspath(path)))
    h, w = img.height, img.width
    if img.format == "JPEG" and img.getexif().get(0x0112) in (5, 6, 7, 8):  # turned a quarter
        h, w = w, h
    return h, w, {"L": 1, "RGB": 3, "RGBA": 4}[_native_mode(img)]


def load_image(path: str, *, color: bool | None = None) -> np.ndarray:
    """Read and decode the image file at ``path`` as OpenCV's ``imread`` does: EXIF
    orientation applied (see :func:`decode_image`).

    Raises:
        FileNotFoundError: no file at ``path``; ImageDecodeError: not decodable.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path!r}") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"cannot decode {path!r}: it is a directory") from None
    return decode_image(data, name=repr(os.fspath(path)), color=color, orient=True)
