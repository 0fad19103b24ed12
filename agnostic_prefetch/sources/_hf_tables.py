"""A Hugging Face dataset's Arrow table as something cheap to send to a worker and rebuild there.

``datasets`` keeps a dataset's table as blocks: memory-mapped Arrow files (its cache files)
with the operations done since (``replays``: slice, drop, rename, ...), in-memory tables,
and their concatenation. In the parent :func:`describe_table` turns that into a plan of
plain values: a file block is its path and replays (a few bytes), an in-memory block its
``pyarrow.Table`` (pickled by value, so its size is bounded). In a worker
:func:`build_table` maps the files again with pyarrow alone and replays the operations, as
``datasets`` itself does when it unpickles a table; ``datasets`` is not imported there.

Example:
    >>> import pyarrow as pa
    >>> plan = [[("value", pa.table({"x": [1, 2]}))], [("value", pa.table({"x": [3]}))]]
    >>> build_table(plan).column("x").to_pylist()
    [1, 2, 3]
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_table", "by_value_bytes", "describe_table"]

# Replays that need datasets' own functions (an Arrow cast with its extension types); a
# block with them travels by value instead.
_DATASETS_REPLAYS = {"cast", "flatten"}


def describe_table(table: Any) -> list[list[tuple]]:
    """The plan of a ``datasets.table.Table``: rows of blocks, each ``("file", path, replays)``
    or ``("value", pyarrow.Table)``; rows are joined column-wise, then stacked."""
    blocks = getattr(table, "blocks", None)
    if blocks is None:
        return [[_block(table)]]
    if blocks and not isinstance(blocks[0], list):
        return [[_block(b)] for b in blocks]
    return [[_block(b) for b in row] for row in blocks]


def _block(block: Any) -> tuple:
    path, replays = getattr(block, "path", None), getattr(block, "replays", None)
    if path is not None and all(name not in _DATASETS_REPLAYS for name, _, _ in replays or []):
        return ("file", str(path), list(replays or []))
    return ("value", block.table if hasattr(block, "table") else block)


def by_value_bytes(plan: list[list[tuple]]) -> int:
    """Bytes of the blocks that travel by value (what each worker receives a copy of)."""
    return sum(int(b[1].nbytes) for row in plan for b in row if b[0] == "value")


def build_table(plan: list[list[tuple]]) -> Any:
    """The ``pyarrow.Table`` a plan describes, files memory-mapped (nothing read until used)."""
    import pyarrow as pa

    stacked = []
    for row in plan:
        tables = [_open(b) for b in row]
        joined = tables[0]
        for t in tables[1:]:
            for name, column in zip(t.column_names, t.columns, strict=True):
                joined = joined.append_column(name, column)
        stacked.append(joined)
    if len(stacked) == 1:
        return stacked[0]
    return pa.concat_tables(stacked, promote_options="default")


def _open(block: tuple) -> Any:
    if block[0] == "value":
        return block[1]
    import pyarrow as pa

    _, path, replays = block
    try:
        table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(
            f"cannot map the dataset's cache file {path}: {exc}. It was moved, deleted or rewritten since "
            "the source was made: load the dataset again (datasets.load_from_disk) and make the source "
            "from it.") from None
    for name, args, kwargs in replays:
        table = getattr(table, name)(*args, **kwargs)
    return table
