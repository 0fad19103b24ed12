"""ParquetSource: rows of Parquet files as dict items, read a row group at a time and cached per worker.

Random access by row group: the footers (read once in the parent) say how many rows each
row group holds, so row ``i`` of the files taken in order is (file, row group, row) by one
binary search. A read fetches the whole row group (only the wanted columns: one ranged read
per column chunk, coalesced on object storage) and keeps it in a per-process LRU bounded
by ``cache_bytes``, so neighbouring rows cost a slice, not a read.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources._arrow_rows import gather, table_rows

__all__ = ["ParquetSource"]

DEFAULT_CACHE_BYTES = 256 << 20
MAX_OPEN_FILES = 64  # per process: files beyond it are closed least recently used first, reopened on a read
_EXTRA = "pip install 'agnostic_prefetch[parquet]'"


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"ParquetSource needs pyarrow: {_EXTRA}") from None
    return pq


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".")


def _close(handle: Any, pf: Any) -> None:
    pf.close(force=True)
    if handle is not None:
        handle.close()


def _is_system_error(exc: BaseException) -> bool:
    """An error of the system (too many open files, a missing file, a network error) rather than of
    the file's bytes: pyarrow reports a bad page as an OSError too, but one without an errno."""
    return isinstance(exc, OSError) and exc.errno is not None


def _open_error(path: str, exc: OSError) -> OSError:
    """``exc`` naming ``path``, and for too many open files the limit and the remedy."""
    import errno

    detail = f"cannot open {path}: {_one_line(exc)}"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        detail += (f". This process may open {soft} files (RLIMIT_NOFILE) and a ParquetSource keeps up to "
                   f"{MAX_OPEN_FILES} open per process: raise the limit (ulimit -n) or close other files")
    return OSError(exc.errno, detail)


class ParquetSource:
    """Rows of one or more Parquet files as items ``{column: value}``, in file order.

    An item is a dict, column name -> value: a numeric (or bool, timestamp) column gives a
    numpy scalar of its dtype (``np.int64(3)``, ``np.float32(0.5)``), a string column a
    ``str``, a binary column ``bytes``, a list or fixed-size list of numbers a 1-D numpy
    array of the list's dtype (a read-only view of Arrow's buffer, no copy) or, when it
    holds a null, a Python list, a list of other values a Python list, a struct a dict, a
    null ``None``. A row's value depends on that row alone, not on the rows read with it.

    Reads go by row group: :meth:`__getitems__` groups the indices by (file, row group),
    reads each row group once (the wanted columns only) and slices its rows. Row groups are
    kept per process in an LRU of at most ``cache_bytes`` (Arrow's size of the decoded
    columns; a row group larger than that is read, used and not kept). The default, 256 MiB,
    holds a few typical row groups (Parquet writers aim at 64–128 MiB of data, pyarrow's
    default of 1M rows is a few MiB per narrow column) per worker, so a shuffled batch that
    revisits a group does not read it again, while 8 workers stay near 2 GiB. Each process
    keeps at most ``MAX_OPEN_FILES`` (64) files open, closing the least recently read.

    Args:
        paths: a file, a glob, or a list of them; local paths or fsspec URLs (``s3://...``).
        columns: the columns to read (top-level names; default: all of the first file's).
        length_columns: list columns whose per-row lengths :meth:`lengths` returns
            (``{"tokens": int64 array}``), for ``Loader(batching=ap.Pack(...))``.
        storage_options: passed to fsspec for URLs (credentials, endpoint).
        cache_bytes: the bound on each process's row-group cache.

    Raises:
        FileNotFoundError: a path or glob that names nothing.
        ValueError: a file that is not Parquet or is truncated (its footer unreadable), lacks
            a requested column, or whose columns' types differ from the first file's, naming
            the files, the columns and the remedy; on a read, a file changed since the
            source was made (its size, modification time or ETag, or its row groups).
        OSError: a file that cannot be opened (missing, too many open files), naming it.

    Example:
        >>> import os, tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
        >>> pq.write_table(pa.table({"x": [1, 2, 3], "tokens": [[1], [2, 3], []]}), path, row_group_size=2)
        >>> source = ParquetSource(path, length_columns=("tokens",))
        >>> source[1]
        {'x': np.int64(2), 'tokens': array([2, 3])}
        >>> source.lengths()["tokens"].tolist(), source.locate(2)
        ([1, 2, 0], '...t.parquet, row group 1, row 0')
    """

    thread_safe = True  # reads and the cache are guarded by one lock per source

    def __init__(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 columns: Sequence[str] | None = None, length_columns: Sequence[str] = (),
                 storage_options: _storage.StorageOptions = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.paths = _storage.expand_paths(paths, storage_options, what="Parquet files")
        self.storage_options = dict(storage_options) if storage_options else None
        self.cache_bytes = int(cache_bytes)
        self.length_columns = tuple(length_columns)
        group_rows: list[int] = []
        self._group_file: list[int] = []  # flat row group -> file number
        self._group_index: list[int] = []  # flat row group -> its number within the file
        self._file_groups: list[list[int]] = []  # rows per row group, per file (checked on reopening)
        self._signatures: list[dict[str, Any]] = []  # size and mtime (or ETag) per file (checked on reopening)
        self._recast: set[int] = set()  # files whose columns differ from the first's in nullability only
        self._schema: Any = None  # the first file's wanted columns: what every row group is read as
        for f, path in enumerate(self.paths):
            self._signatures.append(_storage.file_signature(path, self.storage_options))
            with self._opened(path) as (_, pf):
                names = pf.schema_arrow.names
                if columns is None and f == 0:
                    columns = list(names)
                self._check_columns(path, names, list(columns or []) + list(self.length_columns))
                self._check_schema(f, pf.schema_arrow, list(dict.fromkeys(list(columns or []) + list(self.length_columns))))
                md = pf.metadata
                rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            self._file_groups.append(rows)
            group_rows += rows
            self._group_file += [f] * len(rows)
            self._group_index += range(len(rows))
        self.columns = list(columns or [])
        self._starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
        self._lengths: dict[str, np.ndarray] | None = None
        self._reset()

    # -- opening ---------------------------------------------------------------------------

    @contextmanager
    def _opened(self, path: str) -> Iterator[tuple[Any, Any]]:
        """(file object or None, ParquetFile) of ``path``, closed on leaving."""
        handle, pf = self._open(path)
        try:
            yield handle, pf
        finally:
            _close(handle, pf)

    def _open(self, path: str) -> tuple[Any, Any]:
        pq = _pq()
        import pyarrow as pa

        try:
            handle = _storage.open_binary(path, self.storage_options) if _storage.is_url(path) else None
            try:
                return handle, pq.ParquetFile(handle if handle is not None else path, pre_buffer=True)
            except BaseException:
                if handle is not None:
                    handle.close()
                raise
        except (pa.ArrowException, OSError) as exc:
            if _is_system_error(exc):
                raise _open_error(path, exc) from exc
            raise ValueError(
                f"cannot read the Parquet footer of {path}: {_one_line(exc)}. The file is truncated or not Parquet: "
                "write it again (pyarrow.parquet.write_table), or leave it out of paths.") from None

    @staticmethod
    def _check_columns(path: str, names: list[str], wanted: list[str]) -> None:
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"column {missing[0]!r} is not in {path}, which has columns {names}: pass "
                             "columns= (and length_columns=) from those, or leave this file out of paths.")

    def _check_schema(self, f: int, schema: Any, wanted: list[str]) -> None:
        fields = [schema.field(name) for name in wanted]
        if self._schema is None:
            import pyarrow as pa

            self._schema = pa.schema(fields)
            return
        differ = [f"{name}: {mine.type} here, {theirs.type} in {self.paths[0]}"
                  for name, mine, theirs in zip(wanted, fields, self._schema, strict=True) if mine.type != theirs.type]
        if differ:
            raise ValueError(
                f"{self.paths[f]} has other column types than {self.paths[0]} ({'; '.join(differ)}), so their rows "
                "cannot share a batch: write the files with one schema (pyarrow.parquet.write_table(table.cast("
                "schema), ...)), pass columns= without those columns, or make a source per schema.")
        if any(not mine.equals(theirs) for mine, theirs in zip(fields, self._schema, strict=True)):
            self._recast.add(f)  # nullability differs: its row groups are cast to the first file's fields

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[int, tuple[Any, Any]] = OrderedDict()  # at most MAX_OPEN_FILES, LRU order
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cached_bytes = 0
        self._pid = os.getpid()

    def _file(self, f: int) -> Any:
        """File ``f``'s ParquetFile, opened (and checked unchanged) if this process has not got it open."""
        if f in self._files:
            self._files.move_to_end(f)
            return self._files[f][1]
        path = self.paths[f]
        signature = _storage.file_signature(path, self.storage_options)
        opened = self._open(path)
        md = opened[1].metadata
        rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        if rows != self._file_groups[f] or signature != self._signatures[f]:
            _close(*opened)
            found = (f"its row groups hold {rows} rows, not {self._file_groups[f]}" if rows != self._file_groups[f]
                     else f"it is {signature}, not {self._signatures[f]}")
            raise ValueError(f"{path} changed since this ParquetSource was made: {found}. Make the source again "
                             "over the files as they are.")
        while len(self._files) >= MAX_OPEN_FILES:
            _close(*self._files.popitem(last=False)[1])
        self._files[f] = opened
        return opened[1]

    def release(self) -> None:
        """Close this process's files and drop its row-group cache (reads reopen them)."""
        for opened in getattr(self, "_files", {}).values():
            _close(*opened)
        self._reset()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_files", "_cache", "_cached_bytes", "_pid"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _where(self, index: int) -> tuple[int, int]:
        """(flat row group, row within it) of ``index``."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for {n} rows of {self!r}")
        index %= n
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        return group, index - int(self._starts[group])

    def _row_group(self, group: int) -> Any:
        """The row group's table (wanted columns), from this process's cache or read now."""
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            table = self._cache.get(group)
            if table is not None:
                self._cache.move_to_end(group)
                return table
            f, g = self._group_file[group], self._group_index[group]
            import pyarrow as pa

            pf = self._file(f)
            first = int(self._starts[group])
            where = f"row group {g} (rows {first}..{first + self._file_groups[f][g] - 1}) of {self.paths[f]}"
            try:
                table = pf.read_row_group(g, columns=self.columns)
            except (pa.ArrowException, OSError) as exc:
                if _is_system_error(exc):
                    raise OSError(exc.errno, f"cannot read {where}: {_one_line(exc)}") from exc
                raise ValueError(
                    f"cannot read {where}: {_one_line(exc)}. The file is corrupt: write it again, or pass "
                    "on_error='skip' to the Loader to leave these rows out.") from None
            if f in self._recast:
                table = table.cast(pa.schema([self._schema.field(name) for name in self.columns]))
            size = table.nbytes
            if size <= self.cache_bytes:
                self._cache[group] = table
                self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.nbytes
            return table

    def cached_bytes(self) -> int:
        """Bytes this process's row-group cache holds now (at most ``cache_bytes``)."""
        return self._cached_bytes

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Rows ``indices`` in that order: each row group they touch read once (in file order),
        the rows gathered as slices and each column converted once."""
        where = [self._where(int(i)) for i in indices]
        if not where:
            return []
        tables = {group: self._row_group(group) for group in sorted({group for group, _ in where})}
        return table_rows(gather([(tables[group], row) for group, row in where]))

    def lengths(self, column: str | None = None) -> np.ndarray | dict[str, np.ndarray] | None:
        """Per-row list lengths: of ``column``, or (no argument) ``{name: lengths}`` for each of
        ``length_columns`` (``None`` without them: the Loader then measures). Reads only those
        columns, once; a null list counts 0."""
        if column is not None:
            return self._list_lengths([column])[column]
        if not self.length_columns:
            return None
        if self._lengths is None:
            self._lengths = self._list_lengths(list(self.length_columns))
        return dict(self._lengths)

    def _list_lengths(self, names: list[str]) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for f, path in enumerate(self.paths):
            with self._opened(path) as (_, pf):
                self._check_columns(path, pf.schema_arrow.names, names)
                for g in range(len(self._file_groups[f])):
                    table = pf.read_row_group(g, columns=names)
                    for k in names:
                        n = pc.list_value_length(table.column(k)).fill_null(0)
                        parts[k].append(n.to_numpy().astype(np.int64))
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}

    def locate(self, index: int) -> str:
        """Where row ``index`` is: its file, row group and row within the group."""
        group, row = self._where(int(index))
        return f"{self.paths[self._group_file[group]]}, row group {self._group_index[group]}, row {row}"

    def __repr__(self) -> str:
        files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files ({self.paths[0]}, ...)"
        return (f"ParquetSource({len(self)} rows in {len(self._group_file)} row groups of {files}; "
                f"columns {self.columns}; cache {self.cache_bytes >> 20} MiB per process)")
