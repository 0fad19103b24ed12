"""The bilinear antialiased resize of the crop transforms: Pillow's, or the same filter by
fast_image_resize (the ``cykooz.resizer`` wheel), three times faster.

fast_image_resize computes Pillow's convolution (the same triangle kernel, support, pixel
centres and fractional source box) with SIMD over 16-bit fixed-point weights where Pillow
keeps 22 bits, so a value near a half grey level can round the other way: within one grey
level of Pillow's per pass (horizontal, then vertical: at most two), one on photographs,
where 5-19 % of the values are off by one (tests/test_crop_decode.py; docs/images.md). ``"pillow"`` is the resize torchvision's PIL path does, value for value.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Literal, cast

import numpy as np
from PIL import Image

__all__ = ["RESAMPLERS", "Resampler", "check_resampler", "resize_region"]

log = logging.getLogger("agnostic_prefetch")

Resampler = Literal["auto", "fast", "pillow"]
RESAMPLERS = ("auto", "fast", "pillow")

_lock = threading.Lock()
_module: Any = None
_tried = False
_warned = False
_local = threading.local()


def _import_fast(warn: bool) -> Any:
    """cykooz.resizer, or None (not installed or refused), warning once per process when
    ``warn`` and it is missing."""
    global _module, _tried, _warned
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _module = importlib.import_module("cykooz_resizer")
                except (ImportError, OSError):
                    _module = None
                _tried = True
    if _module is None and warn and not _warned:
        _warned = True
        log.warning(
            "cykooz.resizer is not importable: the crop transforms resize with Pillow (within a grey "
            "level per pass of the fast resizer's values, about 3x slower). Remedy: pip install "
            "'agnostic_prefetch[images]', or resampler='pillow' to choose Pillow.")
    return _module


def check_resampler(resampler: str) -> Resampler:
    """``resampler`` validated; ``"fast"`` needs its library here (the workers import it too)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    if resampler == "fast" and _import_fast(warn=False) is None:
        raise ImportError("resampler='fast' needs cykooz.resizer (fast_image_resize): "
                          "pip install 'agnostic_prefetch[images]'; or resampler='auto' to fall back to Pillow")
    return cast(Resampler, resampler)


def _fast_resizer() -> Any:
    resizer = getattr(_local, "resizer", None)
    if resizer is None:
        cz = _module
        resizer = _local.resizer = cz.Resizer()
        _local.bilinear = cz.ResizeAlg.convolution(cz.FilterType.bilinear)
    return resizer


def resize_region(pixels: np.ndarray, size: tuple[int, int],
                  box: tuple[float, float, float, float] | None, resampler: str) -> Image.Image:
    """``pixels`` (H×W×3 uint8, contiguous) resized to ``size`` (width, height) by the
    bilinear antialiased filter; with ``box`` (left, top, right, bottom, fractional) only that
    part of them, as Pillow's ``resize(box=)`` reads it."""
    img = Image.fromarray(pixels)
    fast = None if resampler == "pillow" else _import_fast(warn=True)
    if fast is None:
        return img.resize(size, Image.BILINEAR, box=box)
    resizer = _fast_resizer()
    crop = None if box is None else fast.CropBox(box[0], box[1], box[2] - box[0], box[3] - box[1])
    out = Image.new(img.mode, size)
    resizer.resize_pil(img, out, fast.ResizeOptions(resize_alg=_local.bilinear, crop_box=crop))
    return out
