"""ImageListSource: images named in a ``path label`` list file (Caffe's ImageData layer), decoded lazily.

The list is parsed once, in the parent; workers get the paths as one string plus offsets
(cheap to pickle) and decode images as they are asked for them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._resize import resize_bilinear
from agnostic_prefetch.sources.crops import EncodedImage
from agnostic_prefetch.sources.images import load_image, probe_file

__all__ = ["ImageListSource", "parse_image_list", "read_image_list", "ImageListError"]

_INT32 = (-(2**31), 2**31 - 1)


class ImageListError(ValueError):
    """A malformed line in an image list file (names the file and line)."""


def parse_image_list(text: str, *, name: str = "<list>") -> list[tuple[str, int]]:
    """Parse Caffe list text: one ``path label`` per line, the label after the **last** space.

    Paths may contain spaces (only the last space separates). Line endings (``\\n``,
    ``\\r\\n``) and trailing whitespace are ignored; blank lines are skipped.

    Raises:
        ImageListError: a line without a space, an empty path, or a label that is not
            an int32, naming ``name`` and the 1-based line number.
    """
    entries: list[tuple[str, int]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip(" \t\r")
        if not line.strip():
            continue
        path, sep, label_text = line.rpartition(" ")
        problem = None
        if not sep:
            problem = "no space between path and label"
        elif not path:
            problem = "empty path"
        else:
            try:
                label = int(label_text, 10)
            except ValueError:
                problem = f"label {label_text!r} is not an integer"
            else:
                if not _INT32[0] <= label <= _INT32[1]:
                    problem = f"label {label} does not fit in int32"
        if problem:
            raise ImageListError(
                f"{name}, line {number}: {problem} in {raw!r}; expected 'path label' "
                "(the label after the last space)"
            )
        entries.append((path, label))
    return entries


def read_image_list(list_file: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Read and parse a list file (UTF-8; undecodable bytes kept via ``surrogateescape``)."""
    list_file = os.fspath(list_file)
    with open(list_file, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    return parse_image_list(text, name=repr(list_file))


class ImageListSource:
    """Images and labels from a Caffe image list (``path label`` per line), like Caffe's ImageData layer.

    Each item is ``{"image": H×W×C uint8, "label": int32}``. The image path is
    ``root_folder + path`` — plain string concatenation, as Caffe does, so a
    ``root_folder`` usually ends with ``/``.

    Args:
        list_file: the list; the label follows the last space on each line.
        root_folder: prefix for every path.
        new_height, new_width: resize every image to this size (bilinear, OpenCV's
            geometry as in Caffe); both or neither.
        is_color: True gives 3 channels (gray images are expanded), False gives one (H×W×1).
        channel_order: ``"rgb"`` (default) or ``"bgr"`` (Caffe's order).
        decode: decode each image (default), or give an :class:`EncodedImage` (the file's
            bytes and these settings) for a transform that decodes only its crop
            (``CaffeTransform``, ``RandomResizedCropDecode``); not with a resize.

    Raises:
        ImageListError: a malformed line (file and line number).
        ValueError: only one of ``new_height``/``new_width``, or a bad ``channel_order``.
        FileNotFoundError / ImageDecodeError from ``__getitem__``: a missing or undecodable
            image, naming its path (the loader's ``on_error="skip"`` can skip it).

    Example:
        >>> source = ImageListSource("train.txt", root_folder="images/", new_height=256, new_width=256)  # doctest: +SKIP
        >>> source[0]["image"].shape  # doctest: +SKIP
        (256, 256, 3)
    """

    thread_safe = True  # each read opens its own file: workers="auto" may run it in threads

    def __init__(
        self,
        list_file: str | os.PathLike[str],
        *,
        root_folder: str = "",
        new_height: int = 0,
        new_width: int = 0,
        is_color: bool = True,
        channel_order: str = "rgb",
        decode: bool = True,
    ) -> None:
        if not decode and new_height > 0:
            raise ValueError(
                "decode=False leaves decoding to the transform, which crops the stored image: it "
                "cannot resize first; pass decode=True with new_height/new_width")
        self.decode = bool(decode)
        if (new_height > 0) != (new_width > 0):
            raise ValueError(
                f"set both new_height and new_width, or neither; got new_height={new_height}, "
                f"new_width={new_width}"
            )
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.list_file = os.fspath(list_file)
        self.root_folder = os.fspath(root_folder)
        self.new_height, self.new_width = int(new_height), int(new_width)
        self.is_color = bool(is_color)
        self.channel_order = channel_order
        entries = read_image_list(self.list_file)
        if not entries:
            raise ImageListError(f"{self.list_file!r} lists no images")
        # one string + offsets pickles in a blink, unlike a million small str objects
        self._paths = "".join(p for p, _ in entries)
        self._path_ends = np.cumsum([len(p) for p, _ in entries], dtype=np.int64)
        self.labels = np.array([label for _, label in entries], dtype=np.int32)

    def __len__(self) -> int:
        return len(self._path_ends)

    def path(self, index: int) -> str:
        """The full path of image ``index`` (``root_folder + listed path``)."""
        start = int(self._path_ends[index - 1]) if index > 0 else 0
        return self.root_folder + self._paths[start : int(self._path_ends[index])]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.list_file!r}")
        if not self.decode:
            path = self.path(index)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"image file not found: {path!r}") from None
            encoded = EncodedImage(data, name=repr(path), color=self.is_color, orient=True,
                                   channel_order=self.channel_order)
            return {"image": encoded, "label": self.labels[index]}
        image = load_image(self.path(index), color=self.is_color)
        if self.new_height:
            image = resize_bilinear(image, self.new_height, self.new_width)
        if self.channel_order == "bgr" and image.shape[2] == 3:
            image = np.ascontiguousarray(image[:, :, ::-1])
        return {"image": image, "label": self.labels[index]}

    def largest_size(self, sample: int = 64) -> tuple[int, int]:
        """(H, W) each the largest among up to ``sample`` images spread over the list, as
        read (resized when ``new_height`` is set); from their headers, not decoded."""
        if self.new_height:
            return self.new_height, self.new_width
        picks = sorted(set(np.linspace(0, len(self) - 1, min(len(self), sample)).astype(int).tolist()))
        sizes = [probe_file(self.path(i))[:2] for i in picks]
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def locate(self, index: int) -> str:
        """Where record ``index`` comes from: the list's line and the image's path."""
        return f"line {int(index) + 1} of {self.list_file}: {self.path(int(index))}"

    def remedy(self, index: int, exc: BaseException) -> str | None:
        """What fixes ``exc`` on this source: resizing as the list is read, for a crop
        larger than the image."""
        if type(exc).__name__ == "ImageTooSmallError":
            return ("resize the images as the list is read: ImageListSource(..., new_height=H, "
                    "new_width=W) (image_data_param.new_height/new_width in a prototxt), as "
                    "Caffe's ImageData does")
        return None

    def __repr__(self) -> str:
        size = f", resize to {self.new_height}×{self.new_width}" if self.new_height else ""
        return (
            f"ImageListSource({self.list_file!r}, images={len(self)}, root_folder={self.root_folder!r}"
            f"{size}, is_color={self.is_color}, channel_order={self.channel_order!r})"
        )
