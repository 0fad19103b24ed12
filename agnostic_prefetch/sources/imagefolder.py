"""ImageFolderSource: images in one folder per class, as torchvision's ``ImageFolder`` lays them out.

The listing follows torchvision's ``datasets/folder.py`` (``find_classes`` and
``make_dataset``) rule for rule, so index ``i`` is torchvision's sample ``i`` and the labels
are its class indices; local folders and fsspec URLs (``s3://bucket/train``) alike.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from typing import Any

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources.images import ImageDecodeError, decode_image

__all__ = ["IMG_EXTENSIONS", "ImageFolderSource"]

# torchvision.datasets.folder.IMG_EXTENSIONS, in its order (its error message lists them so).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _classes_local(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())  # is_dir follows links


def _files_local(root: str, cls: str) -> list[tuple[str, str]]:
    """(directory, file name) of every file under ``root/cls``, following links as torchvision does."""
    return [(d, f) for d, _, names in os.walk(os.path.join(root, cls), followlinks=True) for f in names]


def _classes_url(fs: Any, inner: str) -> list[str]:
    entries = fs.ls(inner, detail=True)
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")


def _files_url(fs: Any, inner: str, cls: str) -> list[tuple[str, str, int]]:
    found = fs.find(f"{inner.rstrip('/')}/{cls}", detail=True)
    return [(*posixpath.split(name), int(info.get("size") or 0)) for name, info in found.items()
            if info.get("type") != "directory"]


class ImageFolderSource:
    """Images and class labels from ``root/<class>/**/<image>``, as torchvision's ``ImageFolder``.

    Classes are the sub-folders of ``root``, sorted (hidden ones included, as torchvision
    does); a class's index is its place in that order. Its images are the files anywhere
    below its folder whose lower-cased name ends with one of ``extensions``, ordered as
    torchvision's ``make_dataset`` orders them (by folder path, then by file name). An item
    is ``{"image": H×W×3 uint8 RGB, "label": int}``, decoded as torchvision's
    ``pil_loader`` (``convert("RGB")``) does, no EXIF rotation.

    Attributes:
        classes: the class names, sorted; ``class_to_idx``: name → index; ``samples``:
            ``(path, class index)`` per item; ``targets``: the class index per item.

    Args:
        root: a local folder or an fsspec URL (``s3://bucket/train``).
        extensions: file name endings to keep (torchvision's ``IMG_EXTENSIONS`` by default).
        storage_options: passed to fsspec for URLs.
        allow_empty: accept class folders without images (torchvision's ``allow_empty``).
        decode: decode each image (default), or give the file's bytes as ``"image"``, for
            a transform that decodes only what it keeps (:class:`RandomResizedCropDecode`,
            :class:`CenterCropDecode`).

    Raises:
        FileNotFoundError: no class folders, or a class without images (unless
            ``allow_empty``): torchvision's messages, with the remedy.

    Example:
        >>> source = ImageFolderSource("imagenet/train")      # doctest: +SKIP
        >>> source.classes[:2], source[0]["label"]              # doctest: +SKIP
        (['n01440764', 'n01443537'], 0)
    """

    thread_safe = True

    def __init__(self, root: str | os.PathLike[str], *, extensions: str | Iterable[str] | None = None,
                 storage_options: _storage.StorageOptions = None, allow_empty: bool = False,
                 decode: bool = True) -> None:
        self.root = os.fspath(root)
        self.decode = bool(decode)
        self.extensions = IMG_EXTENSIONS if extensions is None else (
            (extensions,) if isinstance(extensions, str) else tuple(extensions))
        self.storage_options = dict(storage_options) if storage_options else None
        self._fs: Any = None
        self._pid = -1
        self._sizes: list[int] | None = None  # for URLs: each file's size, so a read is one request
        files, self.classes = self._listing(allow_empty)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, label) for path, label, _ in files]
        self.targets = [label for _, label, _ in files]
        if _storage.is_url(self.root):
            self._sizes = [size for _, _, size in files]
        if not self.samples:
            raise FileNotFoundError(
                f"no images in the class folders of {self.root} (classes {self.classes}). "
                f"Supported extensions are: {', '.join(self.extensions)}. Remedy: put the images in "
                "root/<class>/, or pass extensions=(...) naming their endings.")

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._inner = _storage.filesystem(self.root, self.storage_options)
            self._pid = os.getpid()
        return self._fs, self._inner

    def _listing(self, allow_empty: bool) -> tuple[list[tuple[str, int, int]], list[str]]:
        url = _storage.is_url(self.root)
        if url:
            fs, inner = self._filesystem()
            if not fs.isdir(inner):
                raise FileNotFoundError(f"no folder at {self.root}: check the URL and credentials")
            classes = _classes_url(fs, inner)
        else:
            classes = _classes_local(self.root)
        if not classes:
            raise FileNotFoundError(
                f"Couldn't find any class folder in {self.root}. Remedy: put each class's images "
                "in a sub-folder named after the class (root/<class>/<image>), as torchvision's ImageFolder reads.")
        files: list[tuple[str, int, int]] = []
        empty = []
        protocol = self.root.split("://", 1)[0]
        for label, cls in enumerate(classes):
            if url:
                found = sorted(_files_url(fs, inner, cls))
                listed = [(f"{protocol}://{posixpath.join(d, f)}", s) for d, f, s in found]
            else:
                # make_dataset: sorted(os.walk(...)) orders by folder path, then sorted file names
                listed = [(os.path.join(d, f), 0) for d, f in sorted(_files_local(self.root, cls))]
            kept = [(path, label, size) for path, size in listed if path.lower().endswith(self.extensions)]
            empty += [] if kept else [cls]
            files += kept
        if empty and not allow_empty:
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(sorted(empty))}. Supported extensions "
                f"are: {', '.join(self.extensions)}. Remedy: remove those folders (a hidden folder "
                "such as .ipynb_checkpoints counts as a class, as in torchvision), add their images, "
                "or pass allow_empty=True.")
        return files, classes

    def __len__(self) -> int:
        return len(self.samples)

    def locate(self, index: int) -> str:
        """The image file of item ``index`` and its class."""
        path, label = self.samples[int(index)]
        return f"{path} (class {self.classes[label]!r}, label {label})"

    def remedy(self, index: int, exc: BaseException) -> str | None:
        """For an image that cannot be decoded: replace or remove its file."""
        if isinstance(exc, ImageDecodeError):
            return f"replace or remove {self.samples[int(index)][0]}, or pass on_error='skip' to the Loader"
        return None

    def _read(self, index: int) -> bytes:
        path = self.samples[index][0]
        if self._sizes is None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"{path} was listed but is gone: construct the source again") from None
        return _storage.read_range(path, 0, self._sizes[index], self.storage_options)

    def _item(self, index: int, data: bytes) -> dict[str, Any]:
        path, label = self.samples[index]
        if not self.decode:
            return {"image": data, "label": label}
        return {"image": decode_image(data, name=path, color=True), "label": label}

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.root}")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        return self._item(index, self._read(index))

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The items at ``indices``, in that order; for URLs the files are fetched concurrently."""
        indices = [self._check_index(i) for i in indices]
        if self._sizes is None:
            return [self._item(i, self._read(i)) for i in indices]
        fs, _ = self._filesystem()
        wanted = sorted(set(indices))
        # cat_ranges reads each path as named (fs.cat would expand "img[1].png" as a glob)
        got = dict(zip(wanted, fs.cat_ranges([self.samples[i][0].split("://", 1)[1] for i in wanted],
                                             [0] * len(wanted), [self._sizes[i] for i in wanted],
                                             on_error="return"), strict=True))
        out = []
        for i in indices:
            data = got[i]
            if isinstance(data, BaseException):
                raise FileNotFoundError(f"cannot read {self.samples[i][0]}: {data}") from data
            out.append(self._item(i, bytes(data)))
        return out

    def release(self) -> None:
        """Drop this process's filesystem object (recreated on the next read)."""
        self._fs, self._pid = None, -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _pid=-1)
        return state

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.root!r}, images={len(self)}, classes={len(self.classes)}, "
                f"extensions={self.extensions}{'' if self.decode else ', decode=False'})")
