"""TFRecordSource: ``tf.train.Example`` records from TFRecord files, by random access, without TensorFlow."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources._crc32c import masked_crc32c
from agnostic_prefetch.sources._files_index import place
from agnostic_prefetch.sources._own_files import expand_data_paths
from agnostic_prefetch.sources._tf_example import ExampleParseError, parse_example
from agnostic_prefetch.sources._tfrecord_index import (
    FOOTER,
    HEADER,
    INDEX_SUFFIX,
    TFRecordError,
    load_or_build,
)

__all__ = ["ExampleParseError", "TFRecordError", "TFRecordSource"]

_URL_GAP = 1 << 20  # on object storage, records this close are read in one request, gap included


class TFRecordSource:
    """Records of TFRecord files (``tf.train.Example`` messages), each a dict of numpy arrays.

    An item maps each feature name (sorted) to a 1-D int64 array (``int64_list``), a 1-D
    float32 array (``float_list``) or a list of bytes (``bytes_list``). The framing's CRCs
    are checked on every read; the messages are parsed by our own wire-format reader.

    Random access comes from an index of record offsets, built once per file by one scan
    of its frame headers (12 bytes read per record) and saved: next to a local file as
    ``<file>.apidx``, under ``index_dir`` if given, and for a URL or a read-only directory
    in ``~/.cache/agnostic_prefetch/tfrecord-index``. It is reused while the file's size
    and modification time (an object's ETag) are unchanged, and built again (logged) when
    they changed. Several files form one index space, in the order given (globs sorted;
    a glob leaves out the ``.apidx`` files it matches).

    Args:
        paths: a file, a glob, or a list of them; local paths or fsspec URLs.
        index_dir: a local directory for the indexes.
        storage_options: fsspec options for URLs (credentials, endpoint).
        max_record_bytes: the largest record read; a bigger one is an error.

    Raises:
        FileNotFoundError: a path or glob that names nothing.
        TFRecordError: a compressed (GZIP/ZLIB) file, a truncated file or a corrupt
            length, naming the file, record, byte offset and the remedy.

    Example:
        >>> source = TFRecordSource("train-*.tfrecord")   # doctest: +SKIP
        >>> source[0]                                      # doctest: +SKIP
        {'image/encoded': [b'\\xff\\xd8...'], 'label': array([7])}
    """

    thread_safe = True  # reads share nothing mutable but a set of checked files

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        index_dir: str | os.PathLike[str] | None = None,
        storage_options: _storage.StorageOptions = None,
        max_record_bytes: int = 1 << 30,
    ) -> None:
        self.storage_options = dict(storage_options) if storage_options else None
        self.paths = expand_data_paths(paths, self.storage_options, index_suffix=INDEX_SUFFIX,
                                       what="TFRecord files")
        self.index_dir = None if index_dir is None else os.fspath(index_dir)
        self.max_record_bytes = int(max_record_bytes)
        built = [load_or_build(p, self.storage_options, self.index_dir) for p in self.paths]
        self._offsets = np.concatenate([b[0] for b in built]).astype(np.int64)
        self._lengths = np.concatenate([b[1] for b in built]).astype(np.int64)
        self._signatures = [b[2] for b in built]
        self.index_locations = [b[3] for b in built]
        self._starts = np.cumsum([0] + [len(b[0]) for b in built], dtype=np.int64)  # first index per file
        self._checked: set[int] = set()  # files whose signature this process has compared
        self._pid = os.getpid()

    # -- where a record is -----------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _place(self, index: int) -> tuple[int, int]:
        """(file number, record number within that file) of ``index``."""
        return place(self._starts, index, self)

    def locate(self, index: int) -> str:
        """Where record ``index`` is: its file, record number in it and byte offset."""
        f, k = self._place(int(index))
        return f"record {k} of {self.paths[f]} (byte offset {int(self._offsets[index])})"

    # -- reading ---------------------------------------------------------------------------

    def _check_signature(self, f: int) -> None:
        """Once per file per process: refuse an index that no longer matches its file."""
        if self._pid != os.getpid():
            self._checked, self._pid = set(), os.getpid()
        if f in self._checked:
            return
        now = _storage.file_signature(self.paths[f], self.storage_options)
        if now != self._signatures[f]:
            raise TFRecordError(
                f"{self.paths[f]} changed after its index was built (then {self._signatures[f]}, now "
                f"{now}): its record offsets no longer hold. Remedy: create the TFRecordSource again "
                "(it rebuilds the index), and do not write to files while they are read.")
        self._checked.add(f)

    def _check_size(self, index: int) -> None:
        length = int(self._lengths[index])
        if length > self.max_record_bytes:
            raise TFRecordError(
                f"{self.locate(index)} holds {length} bytes, more than max_record_bytes="
                f"{self.max_record_bytes}. Remedy: pass a larger max_record_bytes if records this "
                "large are expected.")

    def _frame_end(self, index: int) -> int:
        return int(self._offsets[index]) + HEADER + int(self._lengths[index]) + FOOTER

    def _record(self, index: int, run: bytes | memoryview, run_start: int) -> dict[str, Any]:
        """Record ``index``, checked and parsed, from ``run`` (bytes read from ``run_start``)."""
        at = int(self._offsets[index]) - run_start
        length = int(self._lengths[index])
        header = run[at:at + HEADER]
        where = self.locate(index)
        if struct.unpack("<Q", header[:8])[0] != length or masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
            raise TFRecordError(
                f"{where}: its header no longer says {length} bytes with a valid CRC; the file "
                "changed after it was indexed. Remedy: create the TFRecordSource again.")
        data = run[at + HEADER:at + HEADER + length]
        stored = struct.unpack("<I", run[at + HEADER + length:at + HEADER + length + FOOTER])[0]
        computed = masked_crc32c(data)
        if computed != stored:
            raise TFRecordError(
                f"{where}: the data CRC does not match (stored {stored:#010x}, computed "
                f"{computed:#010x} over {length} bytes): the record is corrupt. Remedy: write the "
                "file again, or pass on_error='skip' to the Loader to leave this record out.")
        try:
            return parse_example(data)
        except ExampleParseError as exc:
            raise TFRecordError(
                f"{where}: {exc} (the CRCs match, so it was written so). Remedy: TFRecordSource "
                "reads tf.train.Example records; read other records with your own source, or "
                "pass on_error='skip' to leave this one out.") from exc

    def _read(self, f: int, first: int, last: int) -> bytes:
        """The bytes from record ``first``'s frame to the end of record ``last``'s, in one read."""
        start, stop = int(self._offsets[first]), self._frame_end(last)
        data = _storage.read_range(self.paths[f], start, stop - start, self.storage_options)
        if len(data) != stop - start:
            raise TFRecordError(
                f"{self.locate(last)}: the file ends {len(data)} bytes after byte {start}, before "
                f"the record's end at {stop}: it is truncated or changed after it was indexed. "
                "Remedy: copy the file again, then create the TFRecordSource again.")
        return data

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        f, _ = self._place(index)
        self._check_size(index)
        self._check_signature(f)
        return self._record(index, self._read(f, index, index), int(self._offsets[index]))

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The records at ``indices``, in that order: per file, sorted by offset, each run of
        neighbouring records (on object storage, records under 1 MiB apart) read at once."""
        indices = [int(i) for i in indices]
        for i in indices:
            self._place(i)
            self._check_size(i)
        out: list[Any] = [None] * len(indices)
        order = sorted(range(len(indices)), key=lambda j: indices[j])  # by index: by file, then offset
        gap = _URL_GAP if any(map(_storage.is_url, self.paths)) else 0
        run: list[int] = []
        for j in order + [None]:
            index = None if j is None else indices[j]
            if run and (index is None or self._file(index) != self._file(indices[run[0]])
                        or int(self._offsets[index]) - self._frame_end(indices[run[-1]]) > gap):
                self._read_run(indices, run, out)
                run = []
            if j is not None:
                run.append(j)
        return out

    def _file(self, index: int) -> int:
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def _read_run(self, indices: list[int], run: list[int], out: list[Any]) -> None:
        f = self._file(indices[run[0]])
        self._check_signature(f)
        first, last = indices[run[0]], indices[run[-1]]
        data = memoryview(self._read(f, first, last))
        for j in run:
            out[j] = self._record(indices[j], data, int(self._offsets[first]))

    def release(self) -> None:
        """Nothing stays open between reads; forgets which files this process has checked."""
        self._checked = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_checked=set(), _pid=-1)
        return state

    def __repr__(self) -> str:
        files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files: {self.paths[0]}, ..."
        return f"TFRecordSource({files}, records={len(self)}, format='tf.train.Example')"
