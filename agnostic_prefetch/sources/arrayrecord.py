"""ArrayRecordSource: records of ArrayRecord files (Grain's format), read in batches per file."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources._files_index import place
from agnostic_prefetch.sources._local_copy import local_copy
from agnostic_prefetch.sources._open_files import DEFAULT_MAX_OPEN, OpenFiles
from agnostic_prefetch.sources._tf_example import ExampleParseError, parse_example

__all__ = ["ArrayRecordSource"]

# Grain's reader settings for random access: no readahead, a small file buffer.
_READER_OPTIONS = "readahead_buffer_size:0"
_FILE_BUFFER = 32768
_CORRUPT = ("Remedy: write the file again (or copy it again), or pass on_error='skip' to the "
            "Loader to leave the record out.")


def _thread_ended(key: tuple[threading.Thread, int]) -> bool:
    return not key[0].is_alive()


def _module() -> Any:
    try:
        from array_record.python import array_record_module
    except ImportError:
        raise ImportError("ArrayRecordSource needs the array-record package: "
                          "pip install 'agnostic_prefetch[arrayrecord]'") from None
    return array_record_module


class ArrayRecordSource:
    """Records of ArrayRecord files, several files as one index space (in the order given).

    An item is ``{"bytes": record}`` by default; ``decode="tf.train.Example"`` parses each
    record as :class:`TFRecordSource` does (feature name → 1-D array or list of bytes), and
    ``decode=`` a callable is applied to the record's bytes. Records are never unpickled.

    Random access is ArrayRecord's own: each file's footer holds its chunk index, so a record
    costs one chunk read and decompression (one record per chunk when written with
    ``group_size:1``, as Grain asks). :meth:`__getitems__` reads each file's records in file
    order, one by one (the loader's workers are the parallelism). Readers open lazily, one per file per
    thread, at most ``max_open_files`` in each process (the least recently used closed
    first, and those of threads that ended).

    The reader opens local paths only: a URL (``s3://``, ``gs://``, ...) is copied once,
    whole, into ``cache_dir`` (``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``agnostic_prefetch/arrayrecord``) and read from there, again after the object changed.

    Args:
        paths: a file, a glob, or a list of them; local paths or fsspec URLs.
        decode: ``None``, ``"tf.train.Example"``, or a function of the record's bytes.
        storage_options: fsspec options for URLs (credentials, endpoint).
        cache_dir: where copies of URLs go.
        max_open_files: readers kept open per process.

    Raises:
        FileNotFoundError: a path or glob that names nothing.
        ValueError: a file that is not a readable ArrayRecord file (truncated or other).
        ImportError: array-record is not installed.

    Example:
        >>> source = ArrayRecordSource("train.array_record-*", decode="tf.train.Example")  # doctest: +SKIP
        >>> source[0]                                                                  # doctest: +SKIP
        {'label': array([3]), 'tokens': array([101, 2023, 102])}
    """

    thread_safe = True  # each thread reads through its own readers

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        decode: str | Callable[[bytes], Any] | None = None,
        storage_options: _storage.StorageOptions = None,
        cache_dir: str | os.PathLike[str] | None = None,
        max_open_files: int = DEFAULT_MAX_OPEN,
    ) -> None:
        if not (decode is None or decode == "tf.train.Example" or callable(decode)):
            raise ValueError(f"decode must be None, 'tf.train.Example' or a function of the record's "
                             f"bytes, got {decode!r}")
        self.decode = decode
        self.storage_options = dict(storage_options) if storage_options else None
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.paths = _storage.expand_paths(paths, self.storage_options, what="ArrayRecord files")
        counts = []
        for f in range(len(self.paths)):
            reader = self._open(f)
            try:
                counts.append(int(reader.num_records()))
            finally:
                reader.close()
        self._starts = np.cumsum([0] + counts, dtype=np.int64)  # first index of each file
        self.max_open_files = int(max_open_files)
        # this process's readers, by (thread, file): a reader is read by one thread at a time
        self._readers = OpenFiles(self.max_open_files, drop=_thread_ended)
        self._pid = os.getpid()

    # -- readers ---------------------------------------------------------------------------

    def _open(self, f: int) -> Any:
        path = self.paths[f]
        local = local_copy(path, self.storage_options, self.cache_dir, "arrayrecord") if _storage.is_url(path) else path
        reader = _module().ArrayRecordReader(local, _READER_OPTIONS, file_reader_buffer_size=_FILE_BUFFER)
        if not reader.ok():
            try:
                reader.close()
            except RuntimeError:  # closing a failed reader raises its failure, without a message
                pass
            with open(local, "rb"):  # an OSError (no file, no permission, no descriptor left) is no corruption
                pass
            raise ValueError(
                f"{path} cannot be read as an ArrayRecord file ({_storage.file_size(local)} bytes): it "
                "is truncated (its footer holds the index) or not ArrayRecord. Remedy: copy or write "
                "the file again; pass only ArrayRecord files.")
        return reader

    def _opened(self) -> OpenFiles:
        if self._pid != os.getpid():  # a forked copy: the parent's readers are not ours
            self._readers, self._pid = OpenFiles(self.max_open_files, drop=_thread_ended), os.getpid()
        return self._readers

    def release(self) -> None:
        """Close every reader this process opened (reads reopen them)."""
        if self._pid == os.getpid():
            self._readers.close_all()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_readers=None, _pid=-1)
        return state

    # -- where a record is -----------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _place(self, index: int) -> tuple[int, int]:
        """(file number, position in that file) of ``index``."""
        return place(self._starts, index, self)

    def locate(self, index: int) -> str:
        """Where record ``index`` is: its file and position in it."""
        f, k = self._place(int(index))
        return f"record {k} of {self.paths[f]}"

    # -- reading ---------------------------------------------------------------------------

    def _item(self, index: int, record: bytes) -> Any:
        if self.decode is None:
            return {"bytes": record}
        if self.decode == "tf.train.Example":
            try:
                return parse_example(record)
            except ExampleParseError as exc:
                raise ValueError(f"{self.locate(index)}: {exc}. Remedy: decode='tf.train.Example' "
                                 "reads Example records; pass decode= your own function for "
                                 "others.") from exc
        return self.decode(record)

    def _read(self, f: int, positions: list[int], indices: list[int]) -> list[bytes]:
        with self._opened().lease((threading.current_thread(), f), lambda key: self._open(key[1])) as reader:
            try:  # (array_record's batched read(positions) runs a thread pool per call: beside the
                # loader's workers, which already use the cores, it read 100 KB records 1.7x slower)
                return [reader.read([k])[0] for k in positions]
            except RuntimeError as exc:
                what = self.locate(indices[0]) if len(indices) == 1 else (
                    f"one of records {sorted(set(positions))[:8]}{'...' if len(set(positions)) > 8 else ''} "
                    f"of {self.paths[f]}")
                raise ValueError(f"{what} cannot be read: {exc}. {_CORRUPT}") from exc

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        f, k = self._place(index)
        return self._item(index, self._read(f, [k], [index])[0])

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """The items at ``indices``, in that order: each file's records read in file order."""
        indices = [int(i) for i in indices]
        by_file: dict[int, list[tuple[int, int]]] = {}
        for j, index in enumerate(indices):
            f, k = self._place(index)
            by_file.setdefault(f, []).append((k, j))
        out: list[Any] = [None] * len(indices)
        for f, wanted in by_file.items():
            wanted.sort()
            records = self._read(f, [k for k, _ in wanted], [indices[j] for _, j in wanted])
            for (_, j), record in zip(wanted, records, strict=True):
                out[j] = self._item(indices[j], record)
        return out

    def __repr__(self) -> str:
        files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files: {self.paths[0]}, ..."
        decode = "bytes" if self.decode is None else self.decode if isinstance(self.decode, str) else (
            getattr(self.decode, "__name__", repr(self.decode)))
        return f"ArrayRecordSource({files}, records={len(self)}, decode={decode!r})"
