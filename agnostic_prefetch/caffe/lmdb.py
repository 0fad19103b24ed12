"""LMDBSource: records from an LMDB environment (Caffe ``Datum`` or our packed-array records), read lazily per process.

The parent opens the environment once, read-only, to build the key index and check the
record sizes; workers get the source by value (the key index travels as one bytes blob)
and each opens its own environment on first read. With ``lock=False`` readers need no
lock file, so nothing is ever created next to the database.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._datum import decode_datum
from agnostic_prefetch.caffe._lmdb_env import acquire_env, release_env
from agnostic_prefetch.caffe._lmdb_write import LMDBWriter
from agnostic_prefetch.caffe._protowire import WireError
from agnostic_prefetch.sources.crops import EncodedImage
from agnostic_prefetch.sources.images import decode_image, probe_image
from agnostic_prefetch.sources.packed_arrays import (
    RecordError,
    decode_record,
    encode_record,
    is_array_record,
)

__all__ = ["LMDBSource", "write_array_records"]

_OPENING = threading.Lock()  # one source's first open in a process at a time
_SIZE_SAMPLE = 64  # records whose sizes are checked at construction, spread over the database
_CORRUPT = "The record is corrupt: write the database again (agnostic-prefetch convert)."


def _check_channel_order(channel_order: str) -> str:
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    return channel_order


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _to_hwc(chw: np.ndarray, *, reverse: bool) -> np.ndarray:
    """A new H×W×C array from C×H×W planes (channel order reversed if ``reverse``).

    One plane at a time: numpy's own ``ascontiguousarray(chw.transpose(1, 2, 0)[..., ::-1])``
    runs its inner loop over the C channels, which is several times slower (S2 in
    docs/benchmarks.md).
    """
    c, h, w = chw.shape
    out = np.empty((h, w, c), chw.dtype)
    for k in range(c):
        out[:, :, k] = chw[c - 1 - k if reverse else k]
    return out


class LMDBSource:
    """Images and labels from an LMDB written by Caffe's ``convert_imageset`` (or our ``convert``).

    Each record is a Caffe ``Datum`` — raw (``data`` = uint8 C×H×W in Caffe's BGR order),
    encoded (``data`` = JPEG/PNG file bytes), or ``float_data`` — and becomes
    ``{"image": H×W×C uint8 (float32 for float_data), "label": int32}``, channels in RGB
    order unless ``channel_order="bgr"`` (Caffe's stored order). Records written by
    :func:`write_array_records` come back as the dict of arrays they were written from.

    Records are read in key order: index ``i`` is the ``i``-th key. Reading the next index
    after the last one moves the cursor one step (sequential reads cost no lookup); any
    other index is a keyed B-tree lookup.

    Args:
        path: the database: a directory holding ``data.mdb``, or the data file itself.
        channel_order: ``"rgb"`` (default) or ``"bgr"`` for Datum images (an alpha
            channel stays last).
        force_color, force_gray: decode encoded Datums to 3 channels, or to 1 (a colour
            JPEG's Y plane), as Caffe's ``transform_param`` options do; otherwise each keeps
            its own channels as OpenCV's ``IMREAD_UNCHANGED`` decodes them (an RGBA PNG has
            4). Raw Datums are stored pixels and are never converted.
        allow_varying_sizes: accept images of different sizes (the transform must then
            crop or resize them to one size). Default: refuse them, since a batch needs one size.
        readahead: OS readahead on the memory map; default on when the database fits in
            half the RAM, off otherwise (random reads over a bigger-than-RAM file thrash).
        decode: decode encoded Datums (default), or give each as an :class:`EncodedImage`
            (its bytes and these settings) for a transform that decodes only its crop
            (``CaffeTransform``, ``RandomResizedCropDecode``). Raw Datums are arrays either way.

    Raises:
        FileNotFoundError: no database at ``path`` (nothing is created there).
        ValueError: an empty database, or images of different sizes without
            ``allow_varying_sizes=True``, naming two records and the remedy.

    Example:
        >>> source = LMDBSource("train_lmdb")                 # doctest: +SKIP
        >>> item = source[0]; item["image"].shape, item["label"]  # doctest: +SKIP
        ((256, 256, 3), 7)
    """

    # One environment per process, a read transaction and cursor per thread, and the first
    # open guarded by a lock: workers="auto" may run it in threads.
    thread_safe = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        channel_order: str = "rgb",
        force_color: bool = False,
        force_gray: bool = False,
        allow_varying_sizes: bool = False,
        readahead: bool | None = None,
        decode: bool = True,
    ) -> None:
        self.decode = bool(decode)
        self.path = os.fspath(path)
        self.channel_order = _check_channel_order(channel_order)
        if force_color and force_gray:
            raise ValueError("force_color and force_gray exclude each other; pass one of them")
        self.force_color, self.force_gray = bool(force_color), bool(force_gray)
        self._color: bool | None = True if force_color else False if force_gray else None
        self.allow_varying_sizes = bool(allow_varying_sizes)
        if not os.path.exists(self.path):
            raise FileNotFoundError(errno.ENOENT, f"no LMDB database at {self.path!r}", self.path)
        self._subdir = os.path.isdir(self.path)
        data_file = os.path.join(self.path, "data.mdb") if self._subdir else self.path
        if not os.path.isfile(data_file):
            raise FileNotFoundError(
                errno.ENOENT, f"{self.path!r} is a directory without an LMDB data.mdb", data_file
            )
        if readahead is None:
            readahead = os.path.getsize(data_file) < _physical_memory() // 2
        self.readahead = bool(readahead)
        self._env: Any = None
        self._finalizer: Any = None
        self._local: Any = threading.local()  # per thread: txn, cursor, next (the index cursor.next() reaches)
        self._pid = -1
        self._keys_blob, self._key_ends = self._index_keys()
        if len(self._key_ends) == 0:
            raise ValueError(
                f"the LMDB database at {self.path!r} holds no records; write some first "
                "(agnostic-prefetch convert, or write_array_records), or point to the database "
                "that holds them.")
        self.kind, self.item_shapes = self._check_sizes()

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> None:
        """Attach this process's shared environment and a read transaction for this thread."""
        if self._env is None or self._pid != os.getpid():
            self._env = acquire_env(self.path, subdir=self._subdir, readahead=self.readahead)
            self._pid = os.getpid()
            self._local = threading.local()
            # released when the source is closed or garbage-collected in this process
            self._finalizer = weakref.finalize(self, release_env, self.path, self._pid)
        # One long read transaction per thread: the database is read-only, so the snapshot it
        # pins never goes stale, and buffers=True hands out views instead of copies.
        txn = self._env.begin(buffers=True)
        self._local.txn, self._local.cursor, self._local.next = txn, txn.cursor(), -1

    def _ensure_open(self) -> Any:
        if self._pid != os.getpid() or getattr(self._local, "cursor", None) is None:
            # Two threads reading first at once would each attach an environment and replace
            # the other's thread-local state.
            with _OPENING:
                if self._pid != os.getpid() or getattr(self._local, "cursor", None) is None:
                    self._open()
        return self._local

    def close(self) -> None:
        """Let go of this process's environment (reopened on the next read)."""
        if self._pid == os.getpid() and self._finalizer is not None:
            txn = getattr(self._local, "txn", None)
            if txn is not None:
                txn.abort()
            self._finalizer()  # releases the environment once
        self._env = self._finalizer = None
        self._local = threading.local()
        self._pid = -1

    def release(self) -> None:
        """Let go of this process's environment, as :meth:`close`: the next read reopens it.
        The Loader calls it after reading its layout example in the parent."""
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_env=None, _local=None, _finalizer=None, _pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- index -----------------------------------------------------------------------------

    def _index_keys(self) -> tuple[bytes, np.ndarray]:
        try:
            # inside the try: the environment may be attached before the transaction fails
            local = self._ensure_open()
            keys = list(local.cursor.iternext(keys=True, values=False))
            blob = b"".join(bytes(k) for k in keys)
            ends = np.cumsum([len(k) for k in keys], dtype=np.int64)
        finally:
            self.close()
        return blob, ends

    def key(self, index: int) -> bytes:
        """The LMDB key of record ``index``."""
        start = int(self._key_ends[index - 1]) if index > 0 else 0
        return self._keys_blob[start : int(self._key_ends[index])]

    def locate(self, index: int) -> str:
        """Where record ``index`` comes from: its key in the database."""
        return f"key {self.key(int(index))!r} of {self.path}"

    def remedy(self, index: int, exc: BaseException) -> str | None:
        """What fixes ``exc`` on this source: a database converted with a resize, for a crop
        larger than the image."""
        if type(exc).__name__ == "ImageTooSmallError":
            return ("convert the images resized to at least the crop: agnostic-prefetch convert "
                    "--resize-height H --resize-width W (Caffe's convert_imageset --resize_height "
                    "--resize_width)")
        return None

    def __len__(self) -> int:
        return len(self._key_ends)

    def _describe(self, index: int) -> str:
        return f"record {index} (key {self.key(index)!r}) of {self.path!r}"

    # -- reading ---------------------------------------------------------------------------

    def _value(self, index: int) -> memoryview:
        """The raw value of record ``index``; valid until the next cursor move."""
        local = self._ensure_open()
        cursor = local.cursor
        key = self.key(index)
        if index == local.next and cursor.next() and bytes(cursor.key()) == key:
            pass  # sequential read: the cursor is already there
        elif not cursor.set_key(key):
            raise KeyError(f"{self._describe(index)} is missing: the database changed after indexing")
        local.next = index + 1
        return cursor.value()

    def _shape_of(self, index: int) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
        """(kind, {leaf: (shape, dtype)}) of one record; encoded images are probed, not decoded."""
        value = self._value(index)
        if is_array_record(value):
            arrays = decode_record(value)
            return "array", {k: (v.shape, v.dtype.str) for k, v in arrays.items()}
        datum = self._decode_datum(value, index)
        if datum.encoded:
            h, w, c = probe_image(bytes(datum.data), name=self._describe(index))
            c = {True: 3, False: 1, None: c}[self._color]
            return "datum (encoded)", {"image": ((h, w, c), "|u1"), "label": ((), "<i4")}
        image, _ = self._datum_item(value, index)  # raw pixels: cheap, and checks the lengths
        kind = "datum (float)" if image.dtype == np.float32 else "datum (raw)"
        return kind, {"image": (image.shape, image.dtype.str), "label": ((), "<i4")}

    def _check_sizes(self) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
        n = len(self)
        sample = sorted(set(np.linspace(0, n - 1, min(n, _SIZE_SAMPLE)).astype(int).tolist()))
        try:
            kind, first = self._shape_of(sample[0])
            self.sizes_vary = False  # among the sampled records
            self.largest_image = first.get("image", ((),))[0]  # each dimension's largest, sampled
            for i in sample[1:]:
                _, other = self._shape_of(i)
                if other != first:
                    if not self.allow_varying_sizes:
                        raise ValueError(self._size_message(sample[0], first, i, other))
                    self.sizes_vary = True
                    image = other.get("image", ((),))[0]
                    if len(image) == len(self.largest_image):
                        self.largest_image = tuple(map(max, self.largest_image, image))
        finally:
            self.close()
        return kind, first

    def _size_message(self, i: int, a: Any, j: int, b: Any) -> str:
        def fmt(shapes: Any) -> str:
            return ", ".join(f"{k} {'×'.join(map(str, s)) or 'scalar'} {np.dtype(d)}" for k, (s, d) in shapes.items())

        image_a, image_b = a.get("image", ((),))[0], b.get("image", ((),))[0]
        if len(image_a) == len(image_b) == 3 and image_a[:2] == image_b[:2] and not self.force_color:
            return (
                f"{self.path!r} holds encoded images with different channel counts: "
                f"{self._describe(i)} has {fmt(a)}, {self._describe(j)} has {fmt(b)}. Remedy: "
                "pass force_color=True (or force_gray=True), as Caffe's transform_param does.")
        return (
            f"{self.path!r} holds records of different sizes: {self._describe(i)} has {fmt(a)}, "
            f"{self._describe(j)} has {fmt(b)}. A batch needs one size. Remedy: convert with "
            "--resize-height/--resize-width, or pass allow_varying_sizes=True and crop to one "
            "size with CaffeTransform(crop_size=...)."
        )

    def _decode_datum(self, value: memoryview, index: int) -> Any:
        try:
            return decode_datum(value)
        except WireError as exc:
            raise ValueError(f"{self._describe(index)} is not a valid Caffe Datum: {exc}. {_CORRUPT}") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records in {self.path!r}")
        value = self._value(index)
        if is_array_record(value):
            try:
                item: dict[str, Any] = decode_record(value)
            except RecordError as exc:
                raise ValueError(f"{self._describe(index)}: {exc}. {_CORRUPT}") from None
        else:
            image, label = self._datum_item(value, index)
            item = {"image": image, "label": label}
        if not self.allow_varying_sizes and not isinstance(item.get("image"), EncodedImage):
            shapes = {k: (v.shape, v.dtype.str) for k, v in item.items()}
            if shapes != self.item_shapes:
                raise ValueError(self._size_message(0, self.item_shapes, index, shapes))
        return item

    def _datum_item(self, value: memoryview, index: int) -> tuple[np.ndarray | EncodedImage, np.int32]:
        # The datum's data is a view into the memory map, valid only until the cursor
        # moves: everything below copies before returning.
        datum = self._decode_datum(value, index)
        label = np.int32(datum.label)
        if datum.encoded and not self.decode:  # copied out of the memory map
            return EncodedImage(bytes(datum.data), name=self._describe(index), color=self._color,
                                channel_order=self.channel_order), label
        if datum.encoded:
            # the bytes are read in place from the memory map (no copy): decoding ends before the cursor moves
            image = decode_image(datum.data, name=self._describe(index), color=self._color)
            if self.channel_order == "bgr" and image.shape[2] > 1:
                image = np.ascontiguousarray(image[:, :, [2, 1, 0, 3][: image.shape[2]]])
            return image, label
        c, h, w = datum.channels, datum.height, datum.width
        if datum.float_data is not None and not len(datum.data):
            flat, what = datum.float_data, "float_data values"
        else:
            flat, what = np.frombuffer(datum.data, dtype=np.uint8), "data bytes"
        if flat.size != c * h * w or min(c, h, w) < 1:
            raise ValueError(
                f"{self._describe(index)} has {flat.size} {what} but says channels={c}, "
                f"height={h}, width={w}. {_CORRUPT}"
            )
        # Caffe stores C×H×W with channels in BGR order
        return _to_hwc(flat.reshape(c, h, w), reverse=self.channel_order == "rgb"), label

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{k}={'×'.join(map(str, s)) or 'scalar'} {np.dtype(d)}" for k, (s, d) in self.item_shapes.items()
        )
        return (
            f"LMDBSource({self.path!r}, records={len(self)}, kind={self.kind!r}, {shapes}"
            f"{', varying sizes' if self.allow_varying_sizes else ''}, channel_order={self.channel_order!r}"
            f"{', force_color' if self.force_color else ''}{', force_gray' if self.force_gray else ''})"
        )


def write_array_records(
    path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]], *, map_size: int = 1 << 28
) -> int:
    """Write dicts of numeric arrays to a new LMDB, keys ``%08d`` in order; returns the count.

    The format is self-describing (names, dtypes, shapes in a JSON header, then raw bytes;
    never pickle), and :class:`LMDBSource` reads it back as the same dicts.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory.
        ValueError: a value that is not a numeric array.

    Example:
        >>> write_array_records(tmp / "db", ({"x": np.full(3, i)} for i in range(10)))  # doctest: +SKIP
        10
    """
    with LMDBWriter(os.fspath(path), map_size=map_size) as writer:
        for i, record in enumerate(records):
            writer.put(b"%08d" % i, encode_record(record))
    return writer.puts
