"""Where torchvision's ImageNet crops fall: RandomResizedCrop's box rule, and Resize + CenterCrop's geometry.

The rules are torchvision's (``transforms.RandomResizedCrop.get_params``,
``functional._compute_resized_output_size``, ``functional.center_crop``), read from its
source; the random numbers come from the caller's numpy generator instead of torch's.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["centre_box", "random_resized_box", "resized_size"]


def random_resized_box(height: int, width: int, rng: np.random.Generator,
                       scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, box height, box width): torchvision's RandomResizedCrop rule.

    Ten attempts: an area fraction uniform in ``scale``, a log-uniform aspect ratio in
    ``ratio`` (float32, as torch draws it), sides rounded; the first box that fits is
    placed uniformly. Otherwise the fallback: the whole image, or its centre clipped to the
    nearest allowed aspect ratio. Draws: two per attempt, two more for the placement.
    """
    area = height * width
    log_lo, log_hi = np.log(np.asarray(ratio, dtype=np.float32))
    for _ in range(10):
        target_area = area * float(np.float32(rng.uniform(scale[0], scale[1])))
        log_aspect = np.float32(rng.uniform(float(log_lo), float(log_hi)))
        aspect = float(np.exp(log_aspect))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(shorter)``: the shorter side to
    ``shorter``, the longer scaled and truncated."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def centre_box(height: int, width: int, shorter: int, size: tuple[int, int]
               ) -> tuple[tuple[int, int], tuple[int, int]]:
    """For ``Resize(shorter)`` then ``CenterCrop(size)``: the resized (height, width) and the
    crop's (top, left) in it, rounded as torchvision rounds them."""
    new_h, new_w = resized_size(height, width, shorter)
    top = int(round((new_h - size[0]) / 2.0))
    left = int(round((new_w - size[1]) / 2.0))
    return (new_h, new_w), (top, left)
