"""CaffeTransform: Caffe's DataTransformer per item — crop, mirror, mean, scale, layout — drawing only from the item's rng."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._mean import describe_mean, mean_for, resolve_mean
from agnostic_prefetch.sources.crops import EncodedImage

__all__ = ["CaffeTransform"]


def _fill(dest: np.ndarray, src: np.ndarray, mean: np.ndarray | None, row: np.ndarray | None) -> None:
    """``dest[...] = src - mean`` (or ``= src``) in ``dest``'s dtype, for H×W×C views of any strides.

    Two passes and no allocation: the pixels are cast into ``dest`` (numpy casts there
    without buffers), then the mean is subtracted in place, in float32 as Caffe does (the
    same bits as one pass). A single pass that casts and subtracts makes numpy cast through
    buffers of its own, allocated per call where the heap puts them; its speed then moved by
    15 % with nothing but the memory layout of the worker (docs/benchmarks.md, issue 16).

    When the rows of ``src`` and ``dest`` are runs of W·C values a row is one inner loop
    (numpy would otherwise loop over the 3 channels), with ``row`` the per-channel mean tiled
    along it; otherwise each channel is one strided pass with a long inner loop.
    """
    h, w, c = src.shape
    if dest.flags.c_contiguous and src.strides[1] == c * src.strides[2] and src.strides[2] == src.itemsize:
        dest2 = dest.reshape(h, w * c)
        np.copyto(dest2, src.reshape(h, w * c), casting="unsafe")
        if mean is None:
            return
        if mean.ndim == 1:
            np.subtract(dest2, row, out=dest2)
            return
        if mean.strides[1] == c * mean.strides[2] and mean.strides[2] == mean.itemsize:
            np.subtract(dest2, mean.reshape(h, w * c), out=dest2)
            return
    else:
        for k in range(c):
            np.copyto(dest[:, :, k], src[:, :, k], casting="unsafe")
        if mean is None:
            return
    for k in range(c):
        plane = dest[:, :, k]
        np.subtract(plane, mean[..., k], out=plane)


class ImageTooSmallError(ValueError):
    """An image smaller than the crop. Sources say how to resize their images as they read
    them (``remedy``): ImageListSource's ``new_height``/``new_width``, the converter's flags."""


class CaffeTransform:
    """Caffe's ``TransformationParameter`` applied to ``example["image"]`` (H×W×C); other keys pass through.

    In order, as Caffe's DataTransformer does it:

    1. Crop to ``crop_size``×``crop_size``: a random offset in training
       (``rng.integers(0, H - c + 1)`` then the same for W), the centre
       ``((H - c) // 2, (W - c) // 2)`` otherwise. ``crop_size=0`` keeps the whole image.
    2. Subtract the mean: one value, one per channel, or a mean image of the *uncropped*
       image's size, cropped with the same offsets.
    3. Multiply by ``scale``.
    4. Mirror horizontally with probability 1/2 when ``mirror`` — in training and in
       testing, as in Caffe. The mean image is subtracted at the source pixel before the
       flip (Caffe indexes the mean by the unflipped position).
    5. Lay out as ``"HWC"`` or ``"CHW"`` and cast to ``dtype``.

    Random draws, all from ``rng``: the mirror coin first (when ``mirror``), then the crop
    offsets (when training with a crop) — Caffe's order.

    Given an :class:`EncodedImage` (``LMDBSource``/``ImageListSource`` with ``decode=False``)
    it decodes the crop box alone (:func:`decode_box`): the same pixels, less work.

    Args:
        crop_size: side of the square crop; 0 for none.
        mirror: random horizontal flips.
        mean: a number, one value per channel (in ``channel_order``), or an H×W×C array.
        mean_file: a Caffe ``.binaryproto`` (BGR C×H×W, converted) or a ``.npy`` (H×W×C in
            ``channel_order``). Not together with ``mean``.
        scale: multiplier after mean subtraction (e.g. 1/255 or 0.017).
        train: random crop (True) or centre crop (False).
        layout: ``"HWC"`` or ``"CHW"``.
        dtype: output dtype. With no mean and ``scale=1`` the pixels are only cropped and
            flipped, so ``dtype=np.uint8`` keeps batches four times smaller.
        channel_order: the channel order of the images this transform receives.

    Raises:
        ValueError: bad arguments at construction; at call time, an image smaller than
            ``crop_size`` or a mean image of another size, with both sizes.

    Example:
        >>> t = CaffeTransform(crop_size=224, mirror=True, mean=(123.68, 116.78, 103.94))
        >>> out = t({"image": np.zeros((256, 256, 3), np.uint8), "label": 3}, np.random.default_rng(0))
        >>> out["image"].shape, out["image"].dtype, out["label"]
        ((224, 224, 3), dtype('float32'), 3)
    """

    def __init__(
        self,
        crop_size: int = 0,
        mirror: bool = False,
        mean: float | Sequence[float] | np.ndarray | None = None,
        mean_file: str | os.PathLike[str] | None = None,
        scale: float = 1.0,
        train: bool = True,
        layout: str = "HWC",
        dtype: Any = np.float32,
        channel_order: str = "rgb",
    ) -> None:
        if crop_size < 0:
            raise ValueError(f"crop_size must be >= 0, got {crop_size}")
        if layout not in ("HWC", "CHW"):
            raise ValueError(f"layout must be 'HWC' or 'CHW', got {layout!r}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.crop_size = int(crop_size)
        self.mirror = bool(mirror)
        self.mean = resolve_mean(mean, mean_file, channel_order)
        self.mean_file = None if mean_file is None else os.fspath(mean_file)
        self.scale = float(scale)
        self.train = bool(train)
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.channel_order = channel_order
        # Per (output width, channels): the per-channel mean tiled along a row. Filled on
        # first use; two threads filling it at once store equal arrays.
        self._tiled: dict[tuple[int, int], np.ndarray] = {}

    # The loader may pass ``out=``: this item's place in the ring slot (see Loader's
    # ``transform``). Filling it directly saves one copy of every image.
    writes_into_slot = True
    thread_safe = True  # no state changes after construction: workers="auto" may use threads

    def __call__(self, example: dict[str, Any], rng: np.random.Generator,
                 out: dict[str, Any] | None = None) -> dict[str, Any]:
        """Transform one example; with ``out``, write the image into ``out["image"]`` when it fits."""
        encoded = example["image"] if isinstance(example["image"], EncodedImage) else None
        if encoded is not None:  # a source's decode=False: only the crop box is decoded, below
            header = encoded.header()
            h, w = header.height, header.width
        else:
            image = np.asarray(example["image"])
            if image.ndim != 3:
                raise ValueError(f"CaffeTransform expects an H×W×C image, got shape {image.shape}")
            h, w, c = image.shape
        do_mirror = self.mirror and bool(rng.integers(0, 2))
        top = left = 0
        size_h, size_w = h, w
        if self.crop_size:
            size_h = size_w = self.crop_size
            if h < size_h or w < size_w:
                raise ImageTooSmallError(
                    f"image of {h}×{w} is smaller than crop_size={self.crop_size}: resize the images "
                    f"to at least {self.crop_size}×{self.crop_size} as they are read, or use a "
                    "smaller crop_size")
            if self.train:
                top = int(rng.integers(0, h - size_h + 1))
                left = int(rng.integers(0, w - size_w + 1))
            else:
                top, left = (h - size_h) // 2, (w - size_w) // 2
        # Crop and mirror are views of the input; the only pass over the pixels writes the
        # laid-out output at once, casting (and subtracting the mean) on the way.
        if encoded is not None:
            crop = encoded.pixels((top, left, size_h, size_w), header)  # a view: _fill below copies it
            c = crop.shape[2]
        else:
            crop = image[top : top + size_h, left : left + size_w]
        mean = row = None
        if self.mean is not None:
            mean = mean_for(self.mean, c, f"the {h}×{w}×{c} image")
            if mean.ndim == 3:
                if mean.shape[:2] != (h, w):
                    raise ValueError(
                        f"the mean image is {mean.shape[0]}×{mean.shape[1]} but the image is "
                        f"{h}×{w}; as in Caffe the mean must have the stored images' size "
                        "(it is cropped with them)"
                    )
                mean = mean[top : top + size_h, left : left + size_w]
                if do_mirror:
                    mean = mean[:, ::-1]  # subtracted at the source pixel, before the flip
            else:
                mean = np.broadcast_to(mean, (c,))
                row = self._tiled.get((size_w, c))
                if row is None:  # the mean along one output row; the same for every image
                    row = self._tiled[(size_w, c)] = np.tile(mean, size_w)
        if do_mirror:
            crop = crop[:, ::-1]
        arithmetic = mean is not None or self.scale != 1.0
        # float32 arithmetic, as Caffe: (x - mean) * scale, each step rounded to float32
        work = np.float32 if arithmetic else self.dtype
        shape = (c, size_h, size_w) if self.layout == "CHW" else (size_h, size_w, c)
        given = out.get("image") if isinstance(out, dict) else None
        fits = isinstance(given, np.ndarray) and given.shape == shape and given.dtype == work
        out = given if fits else np.empty(shape, work)
        _fill(out.transpose(1, 2, 0) if self.layout == "CHW" else out, crop, mean, row)
        if self.scale != 1.0:
            np.multiply(out, np.float32(self.scale), out=out)
        if out.dtype != self.dtype:
            out = out.astype(self.dtype)
        return {**example, "image": out}

    def __repr__(self) -> str:
        mean = f"mean_file={self.mean_file!r}" if self.mean_file else f"mean={describe_mean(self.mean)}"
        return (
            f"CaffeTransform(crop_size={self.crop_size}, mirror={self.mirror}, {mean}, "
            f"scale={self.scale:g}, train={self.train}, layout={self.layout!r}, "
            f"dtype={self.dtype.name}, channel_order={self.channel_order!r})"
        )
