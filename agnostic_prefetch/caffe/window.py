"""WindowSource: foreground/background windows of a Caffe window file, warped to a square (Caffe's WindowData layer).

The window file is parsed once, in the parent. The source decides each epoch's batches
itself (:meth:`WindowSource.batch_order`): every batch draws a fixed share of foreground
windows and the rest background, with replacement, from ``(seed, epoch, batch)`` alone,
and the draw also decides each item's mirror flip. An index therefore names a window *and*
a flip (``index = window * 2 + flip``), so ``__getitem__`` stays a pure function of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._mean import describe_mean, mean_for, resolve_mean
from agnostic_prefetch.caffe._resize import resize_bilinear
from agnostic_prefetch.sources.images import load_image
from agnostic_prefetch.sources.protocol import check_seed

__all__ = ["WindowSource", "WindowFileError", "parse_window_file"]

_f32 = np.float32


class WindowFileError(ValueError):
    """A malformed window file (names the file and line)."""


def _c_round(value: Any) -> int:
    """C's ``round``: halves away from zero (Python's ``round`` sends halves to even)."""
    v = float(value)  # exact for float32 inputs, so the +0.5 below cannot round up wrongly
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def parse_window_file(text: str, *, name: str = "<window file>") -> tuple[list[tuple[str, int, int, int]], np.ndarray]:
    """Parse window-file text into images and windows.

    Format, repeated per image (whitespace-separated, as C++ ``>>`` reads it)::

        # image_index
        image_path
        channels
        height
        width
        num_windows
        class_index overlap x1 y1 x2 y2      (num_windows lines; inclusive 0-based corners)

    Returns:
        ``images``: (path, channels, height, width) per image, and ``windows``: an
        N×7 float64 array of (image, class, overlap, x1, y1, x2, y2).

    Raises:
        WindowFileError: naming the file and line: a missing or non-numeric token, image
            indices that do not count up from 0, a box with x2 < x1 or outside its image.
    """
    tokens: list[tuple[str, int]] = [
        (tok, number) for number, line in enumerate(text.splitlines(), start=1) for tok in line.split()
    ]
    pos = 0

    def take(what: str, kind: type = str) -> Any:
        nonlocal pos
        if pos >= len(tokens):
            last = tokens[-1][1] if tokens else 1
            raise WindowFileError(f"{name}, line {last}: file ends where {what} was expected")
        tok, number = tokens[pos]
        pos += 1
        if kind is str:
            return tok, number
        try:
            return kind(tok), number
        except ValueError:
            raise WindowFileError(f"{name}, line {number}: {what} must be {kind.__name__}, got {tok!r}") from None

    images: list[tuple[str, int, int, int]] = []
    windows: list[tuple[float, ...]] = []
    if not tokens:
        raise WindowFileError(f"{name}: the window file is empty")
    while pos < len(tokens):
        hashtag, number = take("'#'")
        if hashtag != "#":
            raise WindowFileError(f"{name}, line {number}: expected '# image_index', got {hashtag!r}")
        index, number = take("image_index", int)
        if index != len(images):
            raise WindowFileError(
                f"{name}, line {number}: image index {index}, expected {len(images)} (Caffe looks "
                "images up by this number, so indices must count up from 0)"
            )
        path, _ = take("image path")
        channels, _ = take("channels", int)
        height, _ = take("height", int)
        width, number = take("width", int)
        count, number = take("num_windows", int)
        if count < 0 or height < 1 or width < 1:
            raise WindowFileError(f"{name}, line {number}: image {index} has height={height}, width={width}, num_windows={count}")
        for _ in range(count):
            label, number = take("class_index", int)
            overlap, _ = take("overlap", float)
            x1, _ = take("x1", int)
            y1, _ = take("y1", int)
            x2, _ = take("x2", int)
            y2, number = take("y2", int)
            if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
                raise WindowFileError(
                    f"{name}, line {number}: box ({x1}, {y1}, {x2}, {y2}) is not inside image "
                    f"{index} ({width}×{height}); corners are inclusive, 0-based, x1 <= x2, y1 <= y2"
                )
            windows.append((index, label, overlap, x1, y1, x2, y2))
        images.append((path, channels, height, width))
    return images, np.array(windows, dtype=np.float64).reshape(-1, 7)


class WindowSource:
    """Warped object windows for R-CNN-style training, like Caffe's WindowData layer.

    Windows with ``overlap >= fg_threshold`` are foreground (label = class, which must be
    > 0); windows with ``overlap < bg_threshold`` are background (label 0, overlap 0); those
    in between are never used. ``len()`` is the number of usable windows; an epoch is
    ``ceil(len / batch_size)`` batches, each with ``int(batch_size * fg_fraction)``
    foreground windows drawn with replacement, spread evenly through the batch (row ``j``
    is foreground when ``floor((j + 1) * f) > floor(j * f)``, ``f`` the foreground share):
    every contiguous slice of a batch, so every shard's part of a global batch, holds its
    share of foreground to within one window.

    Each item is ``{"image": crop_size×crop_size×C float32, "label": int32, "overlap":
    float32, "box": int32[4]}`` (``box`` is the window as listed, x1 y1 x2 y2). The window,
    padded by ``context_pad`` pixels of context at output scale (``crop_mode="square"``
    makes it square first), is cut from the image and resized bilinearly; the part of the
    padded box outside the image stays 0, also after mean and scale. Then the mean is
    subtracted and the result multiplied by ``scale`` (``(pixel - mean) * scale``).
    Images are always read as colour (3 channels), as Caffe does.

    Args:
        window_file: the window file; image paths are ``root_folder + path``.
        fg_threshold, bg_threshold, fg_fraction: as above.
        context_pad: pixels of context around the window in the output.
        crop_mode: ``"warp"`` or ``"square"``.
        crop_size: output side.
        mirror: flip half of the drawn windows horizontally.
        mean: number, per-channel values (``channel_order``), an H×W×C mean image (its
            centre crop_size square is used), or a ``.binaryproto``/``.npy`` path.
        scale: multiplier after mean subtraction (Caffe's ``window_data_param.scale``;
            its WindowData layer never reads ``transform_param.scale``).
        channel_order: ``"rgb"`` (default) or ``"bgr"``.

    Raises:
        WindowFileError: a malformed window file, naming file and line.
        ValueError: bad arguments, or no foreground/background windows where the
            fractions need some.

    Example:
        >>> source = WindowSource("windows.txt", root_folder="images/", crop_size=227, mirror=True)  # doctest: +SKIP
        >>> batches = source.batch_order(seed=0, epoch=0, batch_size=128)  # doctest: +SKIP
        >>> source[batches[0][0]]["image"].shape  # doctest: +SKIP
        (227, 227, 3)
    """

    thread_safe = True  # each read opens its own file: workers="auto" may run it in threads

    def __init__(
        self,
        window_file: str | os.PathLike[str],
        *,
        root_folder: str = "",
        fg_threshold: float = 0.5,
        bg_threshold: float = 0.5,
        fg_fraction: float = 0.25,
        context_pad: int = 0,
        crop_mode: str = "warp",
        crop_size: int = 227,
        mirror: bool = False,
        mean: float | Sequence[float] | np.ndarray | str | os.PathLike[str] | None = None,
        scale: float = 1.0,
        channel_order: str = "rgb",
    ) -> None:
        if crop_mode not in ("warp", "square"):
            raise ValueError(f"crop_mode must be 'warp' or 'square', got {crop_mode!r}")
        if crop_size < 1 or not 0 <= 2 * context_pad < crop_size:
            raise ValueError(f"need crop_size > 2 * context_pad >= 0; got crop_size={crop_size}, context_pad={context_pad}")
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.window_file = os.fspath(window_file)
        self.root_folder = os.fspath(root_folder)
        self.fg_threshold, self.bg_threshold = float(fg_threshold), float(bg_threshold)
        self.fg_fraction = float(fg_fraction)
        self.context_pad, self.crop_mode, self.crop_size = int(context_pad), crop_mode, int(crop_size)
        self.mirror, self.scale, self.channel_order = bool(mirror), float(scale), channel_order
        if isinstance(mean, str | os.PathLike):
            self.mean = resolve_mean(None, mean, channel_order)
        else:
            self.mean = resolve_mean(mean, None, channel_order)
        if self.mean is not None:
            mean_for(self.mean, 3, "a colour window")
            if self.mean.ndim == 3:
                mean_h, mean_w = self.mean.shape[:2]
                margin = (mean_w - self.crop_size) // 2
                if mean_w < self.crop_size or mean_h < margin + self.crop_size:
                    raise ValueError(
                        f"the mean image is {mean_h}×{mean_w}: Caffe's WindowData reads its rows "
                        f"{margin}..{margin + self.crop_size - 1} (it offsets rows by the width's "
                        f"margin, (width - crop_size) / 2) and columns as many, past its end for "
                        f"crop_size={crop_size}. Give a mean at least {margin + self.crop_size} tall and "
                        f"{self.crop_size} wide (a square one, as Caffe's examples use), or mean values.")

        with open(self.window_file, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        images, windows = parse_window_file(text, name=repr(self.window_file))
        self._images = [path for path, *_ in images]
        # Thresholds compared in float32, as Caffe stores overlaps and thresholds as float.
        overlap = windows[:, 2].astype(np.float32)
        is_fg = overlap >= _f32(self.fg_threshold)
        is_bg = ~is_fg & (overlap < _f32(self.bg_threshold))
        bad = is_fg & (windows[:, 1] <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise WindowFileError(
                f"{self.window_file!r}: foreground window {i} (image {int(windows[i, 0])}, overlap "
                f"{windows[i, 2]:g}) has class {int(windows[i, 1])}; foreground classes must be > 0 "
                "(0 is background)"
            )
        usable = np.concatenate([windows[is_fg], windows[is_bg]])
        self.num_fg, self.num_bg = int(is_fg.sum()), int(is_bg.sum())
        self._image_index = usable[:, 0].astype(np.int32)
        self._label = usable[:, 1].astype(np.int32)
        self._label[self.num_fg :] = 0
        self._overlap = usable[:, 2].astype(np.float32)
        self._overlap[self.num_fg :] = 0  # Caffe forces background overlap to 0
        self._box = usable[:, 3:7].astype(np.int32)
        if len(self) == 0:
            raise ValueError(f"{self.window_file!r} has no foreground or background windows at these thresholds")

    def __len__(self) -> int:
        return len(self._label)

    @property
    def index_space(self) -> int:
        """Indices run over ``range(2 * len(self))``: window × flip (see :class:`BatchOrderSource`)."""
        return 2 * len(self)

    @property
    def order_fingerprint(self) -> dict[str, Any]:
        """What decides :meth:`batch_order` beyond the loader's settings (checked on resume)."""
        return {"windows": len(self), "foreground": self.num_fg, "background": self.num_bg,
                "fg_fraction": self.fg_fraction, "mirror": self.mirror}

    def _split(self, batch_size: int) -> tuple[int, int]:
        # Caffe: static_cast<int>(static_cast<float>(batch_size) * fg_fraction), in float32
        num_fg = int(_f32(batch_size) * _f32(self.fg_fraction))
        return num_fg, batch_size - num_fg

    def batch_order(self, *, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
        """All (global) batches of ``epoch``, each index ``window * 2 + flip``.

        A pure function of ``(seed, epoch, batch_size)``; batch ``k`` draws from
        ``numpy.random.default_rng([seed, epoch, k])`` only: the background windows, then
        the foreground ones, then the flips, placed at the rows described above.

        Raises:
            ValueError: the batch needs foreground (or background) windows and there are none;
                ``seed`` is not a non-negative integer.
        """
        seed = check_seed(seed)
        num_fg, num_bg = self._split(batch_size)
        for need, have, what in ((num_fg, self.num_fg, "foreground"), (num_bg, self.num_bg, "background")):
            if need and not have:
                raise ValueError(
                    f"each batch of {batch_size} needs {need} {what} windows but {self.window_file!r} "
                    f"has none at fg_threshold={self.fg_threshold}, bg_threshold={self.bg_threshold}; "
                    "adjust the thresholds or fg_fraction"
                )
        rows = np.arange(batch_size)
        fg_rows = (rows + 1) * num_fg // batch_size > rows * num_fg // batch_size
        batches = []
        for k in range(-(-len(self) // batch_size)):
            rng = np.random.default_rng([seed, epoch, k])
            windows = np.empty(batch_size, np.int64)
            windows[~fg_rows] = self.num_fg + rng.integers(0, max(self.num_bg, 1), num_bg)
            windows[fg_rows] = rng.integers(0, max(self.num_fg, 1), num_fg)
            flips = rng.integers(0, 2, batch_size) if self.mirror else np.zeros(batch_size, np.int64)
            batches.append(windows * 2 + flips)
        return batches

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < 2 * len(self):
            raise IndexError(f"index {index} out of range: {len(self)} windows × 2 flips")
        window, flip = divmod(index, 2)
        path = self.root_folder + self._images[self._image_index[window]]
        image = load_image(path, color=True)
        if self.channel_order == "bgr":
            image = image[:, :, ::-1]
        box = self._box[window]
        try:
            crop = self._warp(image, box, bool(flip))
        except ValueError as exc:
            raise ValueError(f"{path!r}, window {tuple(int(v) for v in box)}: {exc}") from None
        return {
            "image": crop,
            "label": self._label[window],
            "overlap": self._overlap[window],
            "box": box.copy(),
        }

    def _warp(self, image: np.ndarray, box: np.ndarray, flip: bool) -> np.ndarray:
        """Caffe's WindowDataLayer geometry for one window, in float32 like Caffe's Dtype."""
        height, width = image.shape[:2]
        crop = self.crop_size
        x1, y1, x2, y2 = (int(v) for v in box)
        out_h = out_w = crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.crop_mode == "square":
            # expand so that after warping there is exactly context_pad of context per side
            context_scale = _f32(crop) / _f32(crop - 2 * self.context_pad)
            half_h = _f32((y2 - y1 + 1) / 2.0)
            half_w = _f32((x2 - x1 + 1) / 2.0)
            center_x = _f32(x1) + half_w
            center_y = _f32(y1) + half_h
            if self.crop_mode == "square":
                half_h = half_w = max(half_h, half_w)
            x1 = _c_round(center_x - half_w * context_scale)
            x2 = _c_round(center_x + half_w * context_scale)
            y1 = _c_round(center_y - half_h * context_scale)
            y2 = _c_round(center_y + half_h * context_scale)
            # the expanded box may leave the image: clip it, and remember by how much
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - width + 1), max(0, y2 - height + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            scale_x = _f32(crop) / _f32(unclipped_w)
            scale_y = _f32(crop) / _f32(unclipped_h)
            # the clipped part is warped to this size; the clipped-off part becomes zero padding
            out_w = _c_round(_f32(x2 - x1 + 1) * scale_x)
            out_h = _c_round(_f32(y2 - y1 + 1) * scale_y)
            pad_x1 = _c_round(_f32(pad_x1) * scale_x)
            pad_x2 = _c_round(_f32(pad_x2) * scale_x)
            pad_y1 = _c_round(_f32(pad_y1) * scale_y)
            pad_h = pad_y1
            pad_w = pad_x2 if flip else pad_x1  # a mirrored window has its padding mirrored too
            # rounding may push padding + warped region past the crop: shrink the region
            out_h = max(1, min(out_h, crop - pad_h))
            out_w = max(1, min(out_w, crop - pad_w))
        elif x2 >= width or y2 >= height:
            raise ValueError(f"the box does not fit in the {width}×{height} image")
        warped = resize_bilinear(image[y1 : y2 + 1, x1 : x2 + 1], out_h, out_w)
        if flip:
            warped = warped[:, ::-1]
        region = warped.astype(np.float32)
        if self.mean is not None:
            mean = self.mean
            if mean.ndim == 3:
                # Caffe offsets the mean like the window, by one margin for rows and columns
                # alike: the width's, (mean_width - crop_size) / 2 (window_data_layer.cpp).
                margin = (mean.shape[1] - crop) // 2
                off_h, off_w = margin + pad_h, margin + pad_w
                mean = mean[off_h : off_h + out_h, off_w : off_w + out_w]
            region -= mean
        if self.scale != 1.0:
            region *= _f32(self.scale)
        out = np.zeros((crop, crop, image.shape[2]), dtype=np.float32)
        out[pad_h : pad_h + out_h, pad_w : pad_w + out_w] = region
        return out

    def locate(self, index: int) -> str:
        """Where record ``index`` comes from: the window, its image and whether it is flipped."""
        window, flip = divmod(int(index), 2)
        box = tuple(int(v) for v in self._box[window])
        return (f"window {box} of {self.root_folder + self._images[self._image_index[window]]}"
                f"{' (mirrored)' if flip else ''}, in {self.window_file}")

    def __repr__(self) -> str:
        return (
            f"WindowSource({self.window_file!r}, images={len(self._images)}, foreground={self.num_fg}, "
            f"background={self.num_bg}, crop_size={self.crop_size}, crop_mode={self.crop_mode!r}, "
            f"context_pad={self.context_pad}, mirror={self.mirror}, mean={describe_mean(self.mean)}, "
            f"scale={self.scale:g}, channel_order={self.channel_order!r})"
        )
