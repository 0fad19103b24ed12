"""RandomResizedCropDecode and CenterCropDecode: torchvision's ImageNet inputs, decoding only the box they keep.

Each reads the encoded image in one leaf of an example (``bytes``, a 1-D uint8 array, or
an :class:`EncodedImage` from a source's ``decode=False``; a decoded H×W×C uint8 array
works too, without the saving), decodes the box the crop keeps
(at a DCT scale where the box is at least that many times the output, ``dct_scale``),
resizes it with the antialiased bilinear filter torchvision uses on PIL images (Pillow's,
or the same filter three times faster by fast_image_resize, ``resampler``), flips it, and
writes the output dtype and layout straight into the loader's ring slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from agnostic_prefetch.sources._crop_sampling import centre_box, random_resized_box
from agnostic_prefetch.sources._decode_box import (
    EncodedImage,
    ImageHeader,
    box_pixels,
    decode_box,
    read_header,
)
from agnostic_prefetch.sources._resample import Resampler, check_resampler, resize_region

__all__ = ["CenterCropDecode", "EncodedImage", "RandomResizedCropDecode", "decode_box"]

_DTYPES = ("uint8", "float32", "bfloat16")


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or (height, width) of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _range(value: Sequence[float], what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (low, high), two numbers; got {value!r}") from None
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"{what} must satisfy 0 < low <= high, got ({lo:g}, {hi:g})")
    return lo, hi


def _channels(value: float | Sequence[float] | None, what: str, default: float) -> np.ndarray:
    arr = np.full(3, default, np.float32) if value is None else np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be one number or three (R, G, B), got {value!r}")
    return arr


def _struct_bytes(value: dict[str, Any], key: str) -> bytes:
    """The encoded image of a Hugging Face ``Image(decode=False)`` value: its bytes, or the
    file at its path where the dataset keeps only that."""
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return data
    if path:
        with open(path, "rb") as f:
            return f.read()
    raise ValueError(f"the {key!r} image has neither bytes nor a path ({value!r})")


def _scale_for(box_h: float, box_w: float, out_h: int, out_w: int) -> int:
    """The largest DCT scale that leaves the box at least the output's size in both dimensions."""
    scale = 1
    while scale < 8 and box_h / (2 * scale) >= out_h and box_w / (2 * scale) >= out_w:
        scale *= 2
    return scale


class _CropDecode:
    """What both transforms share: the input leaf, the output's dtype and layout, the write."""

    writes_into_slot = True  # the loader passes ``out=``: this item's place in the ring slot
    thread_safe = True  # nothing changes after construction

    def __init__(self, size: int | Sequence[int], *, flip: bool, dtype: str, layout: str,
                 mean: float | Sequence[float] | None, std: float | Sequence[float] | None,
                 dct_scale: bool, resampler: Resampler, key: str) -> None:
        self.size = _pair(size, "size")
        self.resampler = check_resampler(resampler)
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if layout not in ("HWC", "CHW"):
            raise ValueError(f"layout must be 'HWC' or 'CHW', got {layout!r}")
        if dtype == "uint8" and (mean is not None or std is not None):
            raise ValueError("mean and std need dtype='float32' or 'bfloat16'; uint8 output is the pixels")
        self.flip, self.dtype, self.layout = bool(flip), dtype, layout
        self.mean = None if mean is None else _channels(mean, "mean", 0.0)
        self.std = None if std is None else _channels(std, "std", 1.0)
        if self.std is not None and not (self.std > 0).all():
            raise ValueError(f"std must be positive, got {std!r}")
        self.dct_scale, self.key = bool(dct_scale), str(key)

    def _np_dtype(self) -> np.dtype:
        if self.dtype == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                raise ImportError("dtype='bfloat16' needs ml_dtypes: pip install 'agnostic_prefetch[jax]'") from None
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.dtype)

    def _source(self, example: dict[str, Any]) -> tuple[Any, ImageHeader]:
        """The leaf's encoded bytes (or pixels) and its header."""
        try:
            value = example[self.key]
        except (KeyError, TypeError):
            raise KeyError(f"{type(self).__name__} reads the leaf {self.key!r}, but the example has "
                           f"{list(example) if isinstance(example, dict) else type(example).__name__}; "
                           "remedy: key='<the image leaf>'") from None
        if isinstance(value, EncodedImage):  # a source's decode=False: its bytes, decoded as RGB here
            return value.data, value.header()
        if isinstance(value, dict) and "bytes" in value:  # a Hugging Face Image(decode=False) value
            value = _struct_bytes(value, self.key)
        if isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype == np.uint8:
            pixels = value if value.ndim == 3 else value[:, :, None]
            return pixels, ImageHeader(pixels.shape[0], pixels.shape[1])
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == np.uint8:
            value = memoryview(value)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"the {self.key!r} leaf must be encoded image bytes (bytes, a 1-D uint8 "
                            f"array or a Hugging Face image's {{'bytes', 'path'}}) or H×W×C uint8 pixels, "
                            f"got {type(value).__name__}")
        return value, read_header(value, name=f"the {self.key!r} image")

    def _region(self, data: Any, header: ImageHeader, rows: tuple[int, int], cols: tuple[int, int],
                scale: int) -> np.ndarray:
        """Rows × cols (in the image's pixels) at 1/scale, as RGB."""
        if isinstance(data, np.ndarray):
            region = data[rows[0]:rows[1], cols[0]:cols[1]]
            return np.repeat(region, 3, axis=2) if region.shape[2] == 1 else region[:, :, :3]
        box = (rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0])
        # Contiguous, because Pillow takes a strided array through numpy's tobytes, ten times
        # slower than this copy.
        return np.ascontiguousarray(box_pixels(data, header, box, scale=scale, color=True,
                                               name=f"the {self.key!r} image"))

    def _write(self, example: dict[str, Any], pixels: Image.Image, flip: bool,
               out: dict[str, Any] | None) -> dict[str, Any]:
        src = np.asarray(pixels)
        if flip:
            src = src[:, ::-1]
        h, w = self.size
        shape = (3, h, w) if self.layout == "CHW" else (h, w, 3)
        dtype = self._np_dtype()
        given = out.get(self.key) if isinstance(out, dict) else None
        dest = given if isinstance(given, np.ndarray) and given.shape == shape and given.dtype == dtype else None
        if dest is None:
            dest = np.empty(shape, dtype)
        view = dest.transpose(1, 2, 0) if self.layout == "CHW" else dest
        if self.dtype == "uint8":
            np.copyto(view, src)
        else:
            work = view if self.dtype == "float32" else np.empty((h, w, 3), np.float32)
            np.copyto(work, src, casting="unsafe")
            if self.mean is not None:
                np.subtract(work, self.mean, out=work)
            if self.std is not None:
                np.divide(work, self.std, out=work)
            if work is not view:
                np.copyto(view, work, casting="unsafe")
        return {**example, self.key: dest}

    def _describe(self) -> str:
        mean = "" if self.mean is None else f", mean={tuple(round(float(v), 4) for v in self.mean)}"
        std = "" if self.std is None else f", std={tuple(round(float(v), 4) for v in self.std)}"
        return (f"dtype={self.dtype!r}, layout={self.layout!r}{mean}{std}, "
                f"dct_scale={self.dct_scale}, resampler={self.resampler!r}, key={self.key!r}")


class RandomResizedCropDecode(_CropDecode):
    """torchvision's ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``, decoding only the box.

    Per image, drawing from the item's ``rng`` in this order: the box by torchvision's rule
    (ten attempts at an area fraction in ``scale`` and a log-uniform aspect ratio in
    ``ratio``, then its centre fallback), then the flip coin (probability 1/2, when ``flip``).
    The box is decoded alone (at 1/2, 1/4 or 1/8 of the size by libjpeg's DCT scaling when
    ``dct_scale`` and the box is at least that many times the output in both dimensions),
    resized to ``size`` by the bilinear antialiased filter, flipped, then written as
    ``dtype`` and ``layout``: ``(pixel - mean) / std`` in float32 for the float dtypes
    (mean and std in pixel units, 0-255). With ``dct_scale=False, resampler="pillow"`` the
    pixels equal torchvision's ``resized_crop`` of the same box on the PIL image; with the
    fast resampler each is within one grey level of them per resampling pass (docs/images.md).

    Args:
        size: output side, or (height, width).
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's aspect ratio (width / height).
        flip: random horizontal flips.
        dtype: ``"uint8"``, ``"float32"`` or ``"bfloat16"`` (needs ml_dtypes).
        layout: ``"HWC"`` or ``"CHW"``.
        mean, std: per-channel (R, G, B) or one number, in pixel units; float dtypes only.
        dct_scale: decode at a reduced DCT scale where the box allows (faster; a small
            difference from the full-resolution resize, docs/images.md).
        resampler: ``"fast"``: fast_image_resize (the ``cykooz.resizer`` wheel, the
            ``images`` extra), Pillow's filter in 16-bit fixed point, within one grey level
            of Pillow's per pass (one on photographs), three times faster; ``"pillow"``: Pillow's resize, value
            for value torchvision's; ``"auto"``: fast where installed (else Pillow, warning once).
        key: the leaf holding the encoded image; other leaves pass through.

    Raises:
        ValueError: bad arguments (naming them and the allowed values); at call time, an
            undecodable image (ImageDecodeError) or a leaf that is not an image.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (320, 240), (90, 140, 200)).save(buf, "JPEG")
        >>> t = RandomResizedCropDecode(224, dtype="float32", layout="CHW")
        >>> out = t({"image": buf.getvalue(), "label": 3}, np.random.default_rng(0))
        >>> out["image"].shape, out["image"].dtype, out["label"]
        ((3, 224, 224), dtype('float32'), 3)
    """

    def __init__(self, size: int | Sequence[int], *, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, dtype: str = "uint8",
                 layout: str = "HWC", mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, dct_scale: bool = True,
                 resampler: Resampler = "auto", key: str = "image") -> None:
        super().__init__(size, flip=flip, dtype=dtype, layout=layout, mean=mean, std=std,
                         dct_scale=dct_scale, resampler=resampler, key=key)
        self.scale = _range(scale, "scale")
        self.ratio = _range(ratio, "ratio")

    def __call__(self, example: dict[str, Any], rng: np.random.Generator,
                 out: dict[str, Any] | None = None) -> dict[str, Any]:
        """Crop, resize and flip one example's image; with ``out``, write into ``out[key]``."""
        data, header = self._source(example)
        top, left, bh, bw = random_resized_box(header.height, header.width, rng, self.scale, self.ratio)
        flip = self.flip and bool(rng.random() < 0.5)
        out_h, out_w = self.size
        scale = _scale_for(bh, bw, out_h, out_w) if self.dct_scale and header.fast else 1
        region = self._region(data, header, (top, top + bh), (left, left + bw), scale)
        box = None  # scale 1: the box itself, torchvision's crop, then resize
        if scale > 1:  # the box's place in the covering 1/scale region (fractional pixels)
            r0, c0 = top // scale, left // scale
            box = (left / scale - c0, top / scale - r0, (left + bw) / scale - c0, (top + bh) / scale - r0)
        return self._write(example, resize_region(region, (out_w, out_h), box, self.resampler), flip, out)

    def __repr__(self) -> str:
        return (f"RandomResizedCropDecode(size={self.size}, scale={self.scale}, ratio=({self.ratio[0]:.4g}, "
                f"{self.ratio[1]:.4g}), flip={self.flip}, {self._describe()})")


class CenterCropDecode(_CropDecode):
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)``, decoding only the centre box.

    The shorter side is resized to ``resize`` (default ``round(size / 0.875)``: 256 for
    224, torchvision's ImageNet evaluation), and the centre ``size`` taken, with
    torchvision's rounding. Only the part of the image that crop reads is decoded (the box
    plus the filter's reach), at a DCT scale when ``dct_scale`` and the image is at least
    twice the resized size; resized with the bilinear antialiased filter (``resampler``);
    then the dtype and layout as :class:`RandomResizedCropDecode` writes them. No randomness, no flip
    unless ``flip=True`` (then with probability 1/2).

    Args:
        size: output side, or (height, width); at most ``resize``.
        resize: the shorter side before the crop.
        flip, dtype, layout, mean, std, dct_scale, resampler, key: as in
            :class:`RandomResizedCropDecode`.

    Raises:
        ValueError: bad arguments, or ``size`` larger than ``resize``.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("RGB", (500, 375), (90, 140, 200)).save(buf, "JPEG")
        >>> CenterCropDecode(224)({"image": buf.getvalue()}, np.random.default_rng(0))["image"].shape
        (224, 224, 3)
    """

    def __init__(self, size: int | Sequence[int], *, resize: int | None = None, flip: bool = False,
                 dtype: str = "uint8", layout: str = "HWC", mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, dct_scale: bool = True,
                 resampler: Resampler = "auto", key: str = "image") -> None:
        super().__init__(size, flip=flip, dtype=dtype, layout=layout, mean=mean, std=std,
                         dct_scale=dct_scale, resampler=resampler, key=key)
        if resize is None:
            resize = int(round(max(self.size) / 0.875))
        if not isinstance(resize, (int, np.integer)) or resize < max(self.size):
            raise ValueError(f"resize (the shorter side before the crop) must be an int >= the crop size "
                             f"{max(self.size)}, got {resize!r}")
        self.resize = int(resize)

    def __call__(self, example: dict[str, Any], rng: np.random.Generator,
                 out: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resize and centre-crop one example's image; with ``out``, write into ``out[key]``."""
        data, header = self._source(example)
        height, width = header.height, header.width
        out_h, out_w = self.size
        (new_h, new_w), (top, left) = centre_box(height, width, self.resize, self.size)
        flip = self.flip and bool(rng.random() < 0.5)
        sy, sx = height / new_h, width / new_w
        scale = _scale_for(height, width, new_h, new_w) if self.dct_scale and header.fast else 1
        # The crop in the image's pixels, and the rows and columns the filter reads for it
        # (its reach is one output pixel's footprint each side, or one pixel when enlarging).
        y0, y1, x0, x1 = top * sy, (top + out_h) * sy, left * sx, (left + out_w) * sx
        rows = _reach(y0, y1, sy, height, scale)
        cols = _reach(x0, x1, sx, width, scale)
        region = self._region(data, header, rows, cols, scale)
        r0, c0 = rows[0] // scale, cols[0] // scale
        box = (x0 / scale - c0, y0 / scale - r0, x1 / scale - c0, y1 / scale - r0)
        return self._write(example, resize_region(region, (out_w, out_h), box, self.resampler), flip, out)

    def __repr__(self) -> str:
        return (f"CenterCropDecode(size={self.size}, resize={self.resize}, flip={self.flip}, "
                f"{self._describe()})")


def _reach(start: float, stop: float, step: float, size: int, scale: int) -> tuple[int, int]:
    """The image rows (or columns) a bilinear resize of ``start:stop`` reads, at ``scale``
    (in full-size pixels, aligned to ``scale``)."""
    support = max(step / scale, 1.0) + 1  # Pillow's support, plus its rounding of the window
    first = max(0, math.floor(start / scale - support))
    last = min(-(-size // scale), math.ceil(stop / scale + support))
    return first * scale, min(last * scale, size)
