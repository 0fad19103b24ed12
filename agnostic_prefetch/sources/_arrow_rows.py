"""Arrow columns to per-row Python/numpy values, a whole column at a time (Parquet's item layout).

One conversion per column of a batch of rows, then cut into rows: a numeric column becomes a
numpy scalar of its dtype, a string ``str``, a binary ``bytes``, a list of numbers a 1-D
numpy array (a view of the column's values, no copy where Arrow's buffer is numpy's), a
fixed-size list likewise (a Python list where that row's list holds a null), a list of
anything else a Python list, a struct a dict, a null ``None``. pyarrow is imported by the caller (this module only receives its arrays).

Example:
    >>> import pyarrow as pa
    >>> column_rows(pa.array([[1, 2], [3]]))
    [array([1, 2]), array([3])]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["column_rows", "gather", "table_rows"]


def table_rows(table: Any) -> list[dict[str, Any]]:
    """Each row of a ``pyarrow.Table`` as a dict column name -> value (see the module docstring)."""
    names = table.column_names
    columns = [column_rows(table.column(k).combine_chunks()) for k in range(table.num_columns)]
    if not columns:
        return [{} for _ in range(table.num_rows)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def gather(parts: list[tuple[Any, int]]) -> Any:
    """One ``pyarrow.Table`` of the rows ``(table, row)``, in that order, as one-row slices:
    nothing is copied until a column is converted. (Arrow's ``take`` costs 25 times more on a
    memory-mapped table of many record batches, and a take per row group adds a conversion
    per group.) The tables must share a schema; ``parts`` must not be empty."""
    import pyarrow as pa

    return pa.concat_tables([table.slice(row, 1) for table, row in parts])


def _is_numeric(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_temporal(t) or pa.types.is_decimal(t))


def _with_nulls(arr: Any, values: list[Any]) -> list[Any]:
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        values = [v if ok else None for v, ok in zip(values, valid, strict=True)]
    return values


def _numbers(arr: Any) -> np.ndarray:
    """A numeric array's values as numpy (a view of Arrow's buffer when it has no nulls)."""
    if arr.null_count:  # to_numpy would turn the nulls into NaN; their rows become None anyway
        arr = arr.fill_null(0) if not _is_temporal_or_decimal(arr.type) else arr
    return arr.to_numpy(zero_copy_only=False)


def _is_temporal_or_decimal(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_temporal(t) or pa.types.is_decimal(t))


def column_rows(arr: Any) -> list[Any]:
    """The per-row values of one (unchunked) ``pyarrow.Array``."""
    import pyarrow as pa

    t = arr.type
    if pa.types.is_dictionary(t):
        return column_rows(arr.dictionary_decode())
    if isinstance(t, pa.ExtensionType):
        return column_rows(arr.storage)
    if _is_numeric(t):
        return _with_nulls(arr, list(_numbers(arr)))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = arr.offsets.to_numpy()
        return _with_nulls(arr, _cut(arr.values, offsets))
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        start = arr.offset * size
        child = arr.values.slice(start, len(arr) * size)
        return _with_nulls(arr, _cut(child, np.arange(len(arr) + 1, dtype=np.int64) * size))
    if pa.types.is_struct(t):
        names = [t.field(k).name for k in range(t.num_fields)]
        fields = [column_rows(child) for child in arr.flatten()]
        rows = [dict(zip(names, values, strict=True)) for values in zip(*fields, strict=True)]
        return _with_nulls(arr, rows if fields else [{} for _ in range(len(arr))])
    return arr.to_pylist()  # strings, binaries, maps, ...: Arrow's own Python values


def _cut(child: Any, offsets: np.ndarray) -> list[Any]:
    """``child`` cut at ``offsets``: a numpy view per row of numbers, a list of values per
    row of anything else, and per row of numbers holding a null (so a row's type does not
    depend on the other rows of its batch)."""
    first = int(offsets[0])
    child = child.slice(first, int(offsets[-1]) - first)
    bounds = (offsets - first).tolist()
    if not _is_numeric(child.type):
        values = column_rows(child)
        return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    numbers = _numbers(child)
    rows = [numbers[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if child.null_count:
        seen = np.concatenate([[0], np.cumsum(~child.is_valid().to_numpy(zero_copy_only=False))])
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if seen[b] > seen[a]:
                rows[k] = _with_nulls(child.slice(a, b - a), list(numbers[a:b]))
    return rows
