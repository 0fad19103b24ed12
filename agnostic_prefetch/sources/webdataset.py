"""WebDatasetSource: samples of WebDataset tar shards, by index, through an index of member offsets.

A tar shard is read sequentially by webdataset; here each shard's headers are read once
(a seek over every member's data) into an index of ``(name, data offset, size)``, saved
beside the shard or under ``index_dir`` and reused while the shard is unchanged. Members
are grouped into samples by webdataset's rules (``_wds_decode.group_samples``); a sample is
then one ranged read of its members' bytes, and a batch one read per run of nearby samples.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import IO, Any

import numpy as np

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources._open_files import DEFAULT_MAX_OPEN, OpenFiles
from agnostic_prefetch.sources._own_files import expand_data_paths
from agnostic_prefetch.sources._tar_index import INDEX_SUFFIX, index_path, load_or_build
from agnostic_prefetch.sources._wds_arrays import DEFAULT_LIMIT
from agnostic_prefetch.sources._wds_decode import decode_member, expand_braces, group_samples

__all__ = ["WebDatasetSource"]

_GAP = 1 << 16  # samples at most this far apart share one read in __getitems__
_SPAN = 1 << 26  # a read spans at most this much (unless one sample is larger)
_STALE = ("Remedy: construct the source again, which rebuilds the index from the shard as it is "
          "now (or restore the shard the index was built from).")


def list_shards(shards: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                storage_options: _storage.StorageOptions = None) -> list[str]:
    """Paths and URLs of the shards: brace patterns expanded, then globs (less the indices
    saved beside the shards that they match); in the given order."""
    items = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    out: list[str] = []
    for item in items:
        for pattern in expand_braces(os.fspath(item)):
            out += expand_data_paths(pattern, storage_options, index_suffix=INDEX_SUFFIX, what="tar shards")
    if not out:
        raise ValueError("no shards given: pass a path, a brace pattern, a glob or a list of them")
    return out


class WebDatasetSource:
    """Samples of WebDataset tar shards (written by ``webdataset.TarWriter``, ``tar``, ...), by index.

    Members are grouped into samples as webdataset groups them: the key is the member's path
    up to the first dot of its base name, consecutive members with one key are one sample,
    and ``__meta__`` members and names without an extension are skipped. An item is a dict
    like webdataset's sample after ``.decode("rgb8")``: ``"__key__"`` and ``"__url__"`` (the
    shard's path or URL), then one entry per extension in the tar's order: images (jpg, png,
    ppm, webp, ...) H×W×3 uint8 RGB, ``cls``/``cls2``/``index``/``id`` an int, ``txt`` a
    str, ``json`` the parsed value, ``npy`` the array (never unpickled), ``name.gz``
    decompressed first, anything else (pickles included) the bytes. ``decode=False`` gives
    the bytes of every member.

    Each shard's index (members' offsets and sizes, from the tar headers alone) is built on
    first use and kept as JSON: beside a local shard as ``<shard>.index.json``, or under
    ``index_dir`` (for a URL, or a shard in a read-only directory, the default is the user
    cache directory, ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``agnostic_prefetch/tar_index``).
    It is reused while the shard's size and mtime (a URL's ETag) are unchanged, rebuilt otherwise.

    Args:
        shards: a path, URL (``s3://...``), glob or brace pattern
            (``"train-{000000..000099}.tar"``), or a list of them; all shards form one
            index space, in the order given.
        index_dir: a local directory for the indices (created if missing).
        storage_options: passed to fsspec for URLs (credentials otherwise come from the
            environment).
        decode: decode members as above (default), or give bytes.
        max_open_files: local shards kept open per process, least recently read closed first.
        max_sample_bytes: the largest sample read (its members' span in the shard, as the
            index says, checked before reading) and the most a ``.gz`` member or an ``npz``
            decompresses to; a bigger one is an error.

    Raises:
        FileNotFoundError: a shard that does not exist.
        TarFormatError: a compressed shard (refused: decompress it), a truncated or corrupt
            one, naming the shard and byte offset.
        ValueError: no samples, or one extension twice in a sample; when read, a sample over
            ``max_sample_bytes`` or a shard changed since it was indexed.

    Example:
        >>> source = WebDatasetSource("shards/train-{000000..000009}.tar")  # doctest: +SKIP
        >>> item = source[0]; item["__key__"], item["jpg"].shape, item["cls"]  # doctest: +SKIP
        ('000000', (256, 256, 3), 7)
    """

    thread_safe = True  # positioned reads (os.pread) of leased handles; opening under a lock

    def __init__(self, shards: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 index_dir: str | os.PathLike[str] | None = None,
                 storage_options: _storage.StorageOptions = None, decode: bool = True,
                 max_sample_bytes: int = DEFAULT_LIMIT, max_open_files: int = DEFAULT_MAX_OPEN) -> None:
        self.storage_options = dict(storage_options) if storage_options else None
        self.index_dir = None if index_dir is None else os.fspath(index_dir)
        self.decode = bool(decode)
        self.max_sample_bytes = int(max_sample_bytes)
        self.max_open_files = int(max_open_files)
        self.shards = list_shards(shards, self.storage_options)
        self.index_paths = [index_path(s, self.index_dir) for s in self.shards]
        self._signatures: list[dict[str, Any]] = []
        sample_shard, starts, exts, offsets, sizes, keys = [], [0], [], [], [], []
        ext_ids: dict[str, int] = {}
        for s, shard in enumerate(self.shards):
            members, signature = load_or_build(shard, self.storage_options, self.index_dir)
            self._signatures.append(signature)
            for key, parts in group_samples(members, where=shard):
                sample_shard.append(s)
                keys.append(key.encode("utf-8", "surrogateescape"))
                for ext, offset, size in parts:
                    exts.append(ext_ids.setdefault(ext, len(ext_ids)))
                    offsets.append(offset)
                    sizes.append(size)
                starts.append(len(offsets))
        if not keys:
            raise ValueError(f"no samples in {len(self.shards)} shard(s) ({self.shards[0]}, ...): the tar "
                             "members need names like <key>.<extension> (webdataset's layout)")
        self.extensions = tuple(ext_ids)
        self._sample_shard = np.asarray(sample_shard, dtype=np.int32)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._member_ext = np.asarray(exts, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._keys_blob = b"".join(keys)
        self._key_ends = np.cumsum([len(k) for k in keys], dtype=np.int64)
        self._lock = threading.Lock()  # guards _checked for URLs
        self._checked: set[int] = set()  # URL shards whose signature this process compared
        self._files = OpenFiles(self.max_open_files)  # this process's open local shards
        self._pid = os.getpid()

    # -- per-process state ---------------------------------------------------------------

    def _state(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's handles are not ours
            self._files = OpenFiles(self.max_open_files)
            self._checked, self._pid = set(), os.getpid()

    def _check(self, shard: int) -> None:
        """Once per process and shard: the shard is still the one indexed."""
        path = self.shards[shard]
        now = _storage.file_signature(path, self.storage_options)
        if now != self._signatures[shard]:
            raise ValueError(f"{path} changed after it was indexed (then {self._signatures[shard]}, now "
                             f"{now}). {_STALE}")
        self._checked.add(shard)

    def _open_shard(self, shard: int) -> IO[bytes]:
        """A local shard opened, checked against its index on every (re)open."""
        self._check(shard)
        return _storage.open_binary(self.shards[shard], self.storage_options)

    def _read(self, shard: int, start: int, length: int) -> bytes:
        self._state()
        path = self.shards[shard]
        if _storage.is_url(path):
            if shard not in self._checked:
                with self._lock:
                    self._check(shard)
            data = _storage.read_range(path, start, length, self.storage_options)
        else:
            with self._files.lease(shard, self._open_shard) as f:
                data = os.pread(f.fileno(), length, start)
        if len(data) != length:
            raise ValueError(f"{path}: {len(data)} of {length} bytes read at byte {start}: the shard is "
                             f"shorter than when it was indexed. {_STALE}")
        return data

    def release(self) -> None:
        """Close this process's open shards (reads reopen them)."""
        with self._lock:
            self._checked = set()
        if self._pid == os.getpid():
            self._files.close_all()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _files=None, _checked=set(), _pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- index ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._key_ends)

    def key(self, index: int) -> str:
        """The ``__key__`` of sample ``index``."""
        start = int(self._key_ends[index - 1]) if index > 0 else 0
        return self._keys_blob[start:int(self._key_ends[index])].decode("utf-8", "surrogateescape")

    def _span(self, index: int) -> tuple[int, int, int]:
        """(shard, first byte, end byte) of sample ``index``'s members."""
        first, last = int(self._starts[index]), int(self._starts[index + 1]) - 1
        return (int(self._sample_shard[index]), int(self._offsets[first]),
                int(self._offsets[last] + self._sizes[last]))

    def locate(self, index: int) -> str:
        """Where sample ``index`` comes from: its key, members and bytes in its shard."""
        index = self._in_range(index)
        shard, start, end = self._span(index)
        exts = " ".join(f".{self.extensions[e]}" for e in
                        self._member_ext[self._starts[index]:self._starts[index + 1]])
        return (f"sample {index} (key {self.key(index)!r}: {exts}) at bytes {start}..{end} of "
                f"{self.shards[shard]}")

    def _in_range(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples in {len(self.shards)} shard(s)")
        return index

    def _check_index(self, index: int) -> int:
        """``index`` as an int, in range, and its sample within ``max_sample_bytes``."""
        index = self._in_range(index)
        _, start, end = self._span(index)
        if end - start > self.max_sample_bytes:
            raise ValueError(
                f"{self.locate(index)}: {end - start} bytes as the shard's index says, more than "
                f"max_sample_bytes={self.max_sample_bytes}; nothing was read. Remedy: pass a larger "
                "max_sample_bytes if samples this large are expected, or on_error='skip' to the "
                "Loader to leave the sample out.")
        return index

    # -- reading -------------------------------------------------------------------------

    def _item(self, index: int, data: bytes, base: int) -> dict[str, Any]:
        shard = int(self._sample_shard[index])
        key, path = self.key(index), self.shards[shard]
        item: dict[str, Any] = {"__key__": key, "__url__": path}
        for m in range(int(self._starts[index]), int(self._starts[index + 1])):
            ext, offset, size = self.extensions[self._member_ext[m]], int(self._offsets[m]), int(self._sizes[m])
            raw = data[offset - base:offset - base + size]
            if self.decode:
                name = f"member {key}.{ext} (bytes {offset}..{offset + size}) of {path}"
                item[ext] = decode_member(ext, raw, name=name, limit=self.max_sample_bytes)
            else:
                item[ext] = raw
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        shard, start, end = self._span(index)
        return self._item(index, self._read(shard, start, end - start), start)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The samples at ``indices``, in that order; nearby samples of a shard share one read."""
        indices = [self._check_index(i) for i in indices]
        spans = [self._span(i) for i in indices]
        order = sorted(range(len(indices)), key=lambda k: spans[k])
        out: list[Any] = [None] * len(indices)
        runs: list[tuple[int, int, list[int], list[int]]] = []  # shard, start, [end], positions
        for k in order:
            shard, start, end = spans[k]
            if runs:
                run_shard, run_start, run_end, positions = runs[-1]
                if shard == run_shard and start <= run_end[0] + _GAP and end - run_start <= _SPAN:
                    run_end[0] = max(run_end[0], end)
                    positions.append(k)
                    continue
            runs.append((shard, start, [end], [k]))
        for shard, start, end_box, positions in runs:
            data = self._read(shard, start, end_box[0] - start)
            for k in positions:
                out[k] = self._item(indices[k], data, start)
        return out

    def __repr__(self) -> str:
        shards = repr(self.shards[0]) if len(self.shards) == 1 else f"{self.shards[0]!r} .. {self.shards[-1]!r}"
        return (f"WebDatasetSource({len(self.shards)} tar shard(s) {shards}, samples={len(self)}, "
                f"extensions={list(self.extensions)}, decode={self.decode})")
