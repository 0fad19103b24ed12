"""HuggingFaceSource: a ``datasets.Dataset`` read from its Arrow table, items as ``with_format("numpy")``.

Random access is Arrow's: a batch of rows is one ``take`` on the (memory-mapped) table,
through the dataset's indices mapping (``select``, ``shuffle``, ``filter``), then converted
column by column; images are decoded in the worker. The source travels to a worker as the
paths of the dataset's cache files (mapped there again with pyarrow; ``datasets`` is not
imported in the worker), and only in-memory parts by value.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from agnostic_prefetch.sources._arrow_rows import gather
from agnostic_prefetch.sources._hf_tables import build_table, by_value_bytes, describe_table
from agnostic_prefetch.sources._hf_values import column_plan, column_values, unsupported_feature

__all__ = ["HuggingFaceSource", "from_huggingface"]

DEFAULT_MAX_PICKLED_BYTES = 1 << 30


def from_huggingface(obj: Any) -> HuggingFaceSource | None:
    """``HuggingFaceSource(obj)`` if ``obj`` is a ``datasets.Dataset``, else ``None``.

    Never imports ``datasets``: an object can only be a Dataset if its module already is.

    Example:
        >>> from_huggingface([1, 2, 3]) is None
        True
    """
    module = sys.modules.get("datasets")
    if module is None or not type(obj).__module__.startswith("datasets"):
        return None
    dataset_type = getattr(module, "Dataset", None)
    return HuggingFaceSource(obj) if dataset_type is not None and isinstance(obj, dataset_type) else None


class HuggingFaceSource:
    """Rows of a Hugging Face ``datasets.Dataset``, each equal to ``dataset.with_format("numpy")[i]``.

    An item is a dict, column name -> value, as datasets' numpy format gives it (datasets
    5.x): a ``Value`` or ``ClassLabel`` number a numpy scalar of its dtype (a bool a 0-d
    array), a string ``np.str_``, binary ``np.bytes_``, a ``List`` of numbers a 1-D array
    (integers int64, floats float32), ``Array2D``..``Array5D`` an array of their shape
    (int64 / float32 likewise), an ``Image`` the decoded H×W×C (H×W for gray) array of the
    image's own mode (or the feature's ``mode=``), EXIF orientation applied, structs dicts.
    Values are read from the Arrow table, not through datasets' Python formatting: a batch
    of rows is one ``take`` and each column is converted at once; JPEGs are decoded with
    libjpeg-turbo (:func:`~agnostic_prefetch.sources.images.decode_image`), other images
    by Pillow as datasets does.

    Sent to a worker: the dataset's cache files (``dataset.cache_files``) go as paths and
    are memory-mapped there again; the parts of the table held in memory (a dataset made
    with ``from_dict``, or a ``cast``) go by value, up to ``max_pickled_bytes`` (each
    worker holds a copy; above it, save the dataset to disk and load it back).

    Args:
        dataset: a ``datasets.Dataset`` (not an ``IterableDataset``: it has no random access).
        length_columns: list columns whose per-row lengths :meth:`lengths` returns, for
            ``Loader(batching=ap.Pack(...))``; read from the lists' offsets.
        max_pickled_bytes: the bound on the in-memory part sent to each worker (1 GiB).

    Raises:
        TypeError: not a ``datasets.Dataset``.
        ValueError: a column decoded by datasets other than a top-level Image (Audio,
            Video, an Image in a list), or an in-memory table above the bound, naming the remedy.

    Example:
        >>> import datasets
        >>> ds = datasets.Dataset.from_dict({"x": [1, 2], "tokens": [[5, 6, 7], [8]]})
        >>> source = HuggingFaceSource(ds, length_columns=("tokens",))
        >>> source[0]
        {'x': np.int64(1), 'tokens': array([5, 6, 7])}
        >>> source.lengths()["tokens"].tolist()
        [3, 1]
    """

    thread_safe = True  # reads only (Arrow takes and decoding); the first open is locked

    def __init__(self, dataset: Any, *, length_columns: Sequence[str] = (),
                 max_pickled_bytes: int = DEFAULT_MAX_PICKLED_BYTES) -> None:
        datasets = sys.modules.get("datasets")
        if datasets is None or not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"HuggingFaceSource needs a datasets.Dataset, got {type(dataset).__name__}"
                            + (" (an IterableDataset has no random access: use load_dataset(..., streaming=False))"
                               if type(dataset).__name__ == "IterableDataset" else ""))
        features = dataset.features
        for name, feature in features.items():
            reason = unsupported_feature(name, feature)
            if reason:
                raise ValueError(reason)
        self._plans = {name: column_plan(feature) for name, feature in features.items()}
        self.length_columns = tuple(length_columns)
        for name in self.length_columns:
            if self._plans.get(name, ("",))[0] not in ("list", "generic") or name not in features:
                raise ValueError(f"length column {name!r} is not a list column of this dataset; its columns "
                                 f"are {list(features)}")
        self._table_plan = describe_table(dataset._data)
        self._index_plan = None if dataset._indices is None else describe_table(dataset._indices)
        self._rows = len(dataset)
        self.cache_files = [f["filename"] for f in dataset.cache_files]
        self.fingerprint = getattr(dataset, "_fingerprint", None)
        self._check_plans(dataset, int(max_pickled_bytes))
        self._lengths: dict[str, np.ndarray] | None = None
        self._reset()

    def _check_plans(self, dataset: Any, bound: int) -> None:
        rebuilt = build_table(self._table_plan)  # files mapped, nothing read
        table = dataset._data.table
        if rebuilt.schema != table.schema or rebuilt.num_rows != table.num_rows:
            self._table_plan = [[("value", table)]]  # a table layout this module does not know
        sent = by_value_bytes(self._table_plan) + (by_value_bytes(self._index_plan) if self._index_plan else 0)
        if sent > bound:
            raise ValueError(
                f"this dataset holds {sent / 2**20:.0f} MiB in memory, which each worker would receive a copy "
                f"of (above max_pickled_bytes={bound / 2**20:.0f} MiB): write it to disk and load it back "
                "(dataset.save_to_disk(path); datasets.load_from_disk(path)), so workers map its files, or "
                "raise max_pickled_bytes.")

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._table: Any = None
        self._indices: np.ndarray | None = None
        self._pid = -1

    def _open(self) -> tuple[Any, np.ndarray | None]:
        if self._table is None or self._pid != os.getpid():
            with self._lock:
                if self._table is None or self._pid != os.getpid():
                    indices = None
                    if self._index_plan is not None:
                        column = build_table(self._index_plan).column(0)
                        indices = column.to_numpy().view(np.int64)  # uint64 row numbers, mapped
                    self._indices, self._table, self._pid = indices, build_table(self._table_plan), os.getpid()
        return self._table, self._indices

    def release(self) -> None:
        """Unmap this process's view of the table (the next read maps it again)."""
        self._reset()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_table", "_indices", "_pid"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self._rows

    def _checked(self, indices: Sequence[int]) -> np.ndarray:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (rows < -self._rows) | (rows >= self._rows)
        if bad.any():
            raise IndexError(f"row {int(rows[bad][0])} is out of range for {self._rows} rows of {self!r}")
        return rows % max(self._rows, 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Rows ``indices`` in that order, through the indices mapping: gathered as slices of
        the memory-mapped table, each column converted at once."""
        rows = self._checked(indices)
        if not len(rows):
            return []
        table, mapping = self._open()
        wanted = rows if mapping is None else mapping[rows]
        part = gather([(table, row) for row in wanted.tolist()])
        numbers = rows.tolist()
        columns = [column_values(part.column(name).combine_chunks(), plan, name, numbers)
                   for name, plan in self._plans.items()]
        names = list(self._plans)
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def lengths(self, column: str | None = None) -> np.ndarray | dict[str, np.ndarray] | None:
        """Per-row list lengths: of ``column``, or (no argument) ``{name: lengths}`` for each of
        ``length_columns`` (``None`` without them: the Loader then measures). From the lists'
        offsets, through the indices mapping; a null list counts 0."""
        if column is not None:
            return self._list_lengths(column)
        if not self.length_columns:
            return None
        if self._lengths is None:
            self._lengths = {k: self._list_lengths(k) for k in self.length_columns}
        return dict(self._lengths)

    def _list_lengths(self, name: str) -> np.ndarray:
        import pyarrow.compute as pc

        table, mapping = self._open()
        found = pc.list_value_length(table.column(name)).fill_null(0).to_numpy().astype(np.int64)
        return found if mapping is None else found[mapping]

    def locate(self, index: int) -> str:
        """Which row of the dataset's table ``index`` is, and the dataset's files."""
        row = int(self._checked([index])[0])
        _, mapping = self._open()
        at = row if mapping is None else int(mapping[row])
        files = f" of {self.cache_files[0]}{' ...' if len(self.cache_files) > 1 else ''}" if self.cache_files else ""
        return f"row {row} (table row {at}){files}"

    def __repr__(self) -> str:
        where = f"{len(self.cache_files)} cache files" if self.cache_files else "in memory"
        mapped = ", through an indices mapping" if self._index_plan is not None else ""
        return f"HuggingFaceSource({self._rows} rows, columns {list(self._plans)}; {where}{mapped})"
