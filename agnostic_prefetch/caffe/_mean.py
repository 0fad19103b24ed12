"""Mean values and mean images: one number, one per channel, or an H×W×C image, from values or files.

A Caffe ``.binaryproto`` mean is a BlobProto holding BGR C×H×W floats; a ``.npy`` mean is
H×W×C in the caller's channel order (loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._datum import decode_blobproto
from agnostic_prefetch.caffe._protowire import WireError

__all__ = ["load_mean_file", "resolve_mean", "describe_mean"]


def load_mean_file(path: str | os.PathLike[str], *, channel_order: str = "rgb") -> np.ndarray:
    """Read a mean image as H×W×C float32 in ``channel_order``.

    Raises:
        FileNotFoundError: no file; ValueError: an unknown extension or a malformed file.
    """
    path = os.fspath(path)
    if path.endswith(".npy"):
        try:
            mean = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"mean file {path!r} is not a plain numeric .npy array: {exc}") from None
        mean = np.asarray(mean, dtype=np.float32)
        if mean.ndim == 2:
            mean = mean[:, :, None]
        if mean.ndim != 3:
            raise ValueError(f"mean file {path!r} holds shape {mean.shape}; expected H×W×C")
        return mean
    if path.endswith(".binaryproto"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            blob = decode_blobproto(raw)
        except WireError as exc:
            raise ValueError(f"mean file {path!r} is not a Caffe BlobProto: {exc}") from None
        if blob.ndim == 4 and blob.shape[0] == 1:
            blob = blob[0]
        if blob.ndim != 3:
            raise ValueError(f"mean file {path!r} holds a blob of shape {blob.shape}; expected 1×C×H×W")
        mean = blob.transpose(1, 2, 0)  # Caffe: C×H×W, channels BGR
        if channel_order == "rgb":
            mean = mean[:, :, ::-1]
        return np.ascontiguousarray(mean, dtype=np.float32)
    raise ValueError(f"mean file {path!r}: expected a .binaryproto (Caffe) or .npy file")


def resolve_mean(
    mean: float | Sequence[float] | np.ndarray | None, mean_file: str | os.PathLike[str] | None, channel_order: str
) -> np.ndarray | None:
    """One float32 array: shape (C,) per-channel values, or H×W×C image; None when there is no mean.

    Raises:
        ValueError: both ``mean`` and ``mean_file`` given (Caffe forbids it too).
    """
    if mean is not None and mean_file is not None:
        raise ValueError("give mean or mean_file, not both")
    if mean_file is not None:
        return load_mean_file(mean_file, channel_order=channel_order)
    if mean is None:
        return None
    arr = np.asarray(mean, dtype=np.float32)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim not in (1, 3):
        raise ValueError(f"mean must be a number, one value per channel, or an H×W×C image; got shape {arr.shape}")
    return arr


def mean_for(mean: np.ndarray, channels: int, what: str) -> np.ndarray:
    """Check a mean against an image's channel count (one value is used for every channel)."""
    c = mean.shape[-1]
    if c != channels and not (mean.ndim == 1 and c == 1):
        raise ValueError(f"the mean has {c} channels but {what} has {channels}")
    return mean


def describe_mean(mean: Any) -> str:
    if mean is None:
        return "None"
    if mean.ndim == 1:
        return "(" + ", ".join(f"{v:g}" for v in mean) + ")"
    return f"image {'×'.join(map(str, mean.shape))}"
