"""Filling a slot with sequence rows (``Pad``, ``Bucket``, ``Pack``), in a worker, from a plan.

The parent sends an order's plan (``_plan.RowPlan``: which piece of which item goes where in
which row); the worker reads each item once, checks its length against the planned one, and
copies its pieces into the rows, with ``<key>_segment_ids`` (1, 2, ... per piece in a row, 0
on padding) and ``<key>_positions`` (0, 1, ... within each piece, as Grain's packers give).
Padding holds ``pad_value`` in the sequence leaves and zeros elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agnostic_prefetch._layout import Layout, SlotWriter
from agnostic_prefetch._plan import DST, FULL, LENGTH, ROW, SRC, RowPlan, column
from agnostic_prefetch.errors import LayoutError

__all__ = ["POSITIONS", "SEGMENT_IDS", "VALUE", "RowBatch", "RowLayout", "roles_of", "row_example"]

VALUE, SEGMENT_IDS, POSITIONS = 0, 1, 2
_SUFFIX = {SEGMENT_IDS: "_segment_ids", POSITIONS: "_positions"}


@dataclass(frozen=True)
class RowLayout:
    """What a worker needs beyond the slot layout to fill rows.

    ``roles`` has, per array leaf of the layout, ``(key number, VALUE | SEGMENT_IDS |
    POSITIONS)`` for a sequence key's leaves, else ``None`` (a leaf with one value per row,
    with ``Pad``/``Bucket``; the mask).
    """

    keys: tuple[str, ...]
    roles: tuple[tuple[int, int] | None, ...]
    pad_value: float
    pack: bool  # several items per row: every leaf of an item is a sequence key
    mask: int | None  # the mask leaf's number among the array leaves (remainder="pad")
    mask_key: str | None


def roles_of(paths: list[str], keys: tuple[str, ...]) -> tuple[tuple[int, int] | None, ...]:
    """Each array leaf's role, from its path in the layout (``"['tokens_positions']"``)."""
    names: dict[str, tuple[int, int]] = {}
    for k, key in enumerate(keys):
        names[f"[{key!r}]"] = (k, VALUE)
        for role, suffix in _SUFFIX.items():
            names[f"[{key + suffix!r}]"] = (k, role)
    return tuple(names.get(path) for path in paths)


def batch_shapes(layout: Layout, rows: RowLayout, lengths: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each array leaf's item shape for a batch whose rows are ``lengths`` long (per key)."""
    shapes = []
    for leaf, role in zip(layout.arrays, rows.roles, strict=True):
        if role is None:
            shapes.append(leaf.shape)
        else:
            shapes.append((lengths[role[0]], *leaf.shape[1:]))
    return shapes


def shaped_layout(layout: Layout, shapes: list[tuple[int, ...]]) -> Layout:
    """``layout`` with these item shapes (each no larger than the slot's)."""
    arrays = tuple(replace(a, shape=s, item_bytes=int(np.prod(s, dtype=np.int64)) * a.dtype.itemsize)
                   for a, s in zip(layout.arrays, shapes, strict=True))
    return replace(layout, arrays=arrays)


class RowBatch:
    """One order's rows: cleared on creation, filled item by item (:meth:`place`), finished.

    Args:
        writer: over the slot, laid out with this batch's shapes.
        rows: the row layout.
        plan: this shard's part of the batch's plan.
        objects: how many list leaves the layout has (``Pad``/``Bucket`` only).
    """

    def __init__(self, writer: SlotWriter, rows: RowLayout, plan: RowPlan, objects: int) -> None:
        self.writer = writer
        self._rows = rows
        self._plan = plan
        self.shapes = [leaf.shape[1:] for leaf in writer.leaves]
        keys = len(rows.keys)
        self._values: list[np.ndarray] = [None] * keys  # type: ignore[list-item]
        self._ids: list[np.ndarray] = [None] * keys  # type: ignore[list-item]
        self._positions: list[np.ndarray] = [None] * keys  # type: ignore[list-item]
        for leaf, role in zip(writer.leaves, rows.roles, strict=True):
            if role is None:
                leaf[...] = 0
                continue
            k, what = role
            (self._values, self._ids, self._positions)[what][k] = leaf
            leaf[...] = rows.pad_value if what == VALUE else 0
        segments = plan.segments.tolist()
        self._pieces: dict[int, list[tuple[int, list[int]]]] = {}  # item position -> (segment id, segment)
        row, ordinal = -1, 0
        for s in segments:
            ordinal = ordinal + 1 if s[ROW] == row else 1
            row = s[ROW]
            self._pieces.setdefault(s[2], []).append((ordinal, s))
        self._filled: set[int] = set()
        self._objects: list[list[Any]] = [[None] * writer.layout.batch_size for _ in range(objects)]
        self._arange = np.arange(max(plan.lengths, default=0), dtype=np.int32)

    def place(self, position: int, example: Any, index: int) -> list[Any]:
        """Copy the pieces of the item at ``position`` of the epoch's order into their rows.

        Raises:
            LayoutError: the example is no dict with the planned keys, or a key's length,
                dtype or trailing shape is not what was planned and laid out.
        """
        rows = self._rows
        pieces = self._pieces[position]
        if not isinstance(example, dict):
            raise LayoutError(f"record {index}: sequence batching needs dict items, got "
                              f"{type(example).__name__}")
        if rows.pack and len(example) != len(rows.keys):
            extra = sorted(set(map(str, example)) - set(rows.keys))
            raise LayoutError(f"record {index} has leaves {extra} beyond the packed keys {list(rows.keys)}; "
                              "a packed row holds several items, so every leaf must be one of them")
        for k, key in enumerate(rows.keys):
            if key not in example:
                raise LayoutError(f"record {index} has no leaf {key!r} (its keys: {sorted(map(str, example))})")
            value = np.asarray(example[key])
            dest = self._values[k]
            full = pieces[0][1][column(k, FULL)]
            if value.ndim == 0 or value.shape[0] != full:
                have = "a scalar" if value.ndim == 0 else f"{value.shape[0]} long"
                raise LayoutError(
                    f"record {index}: {key!r} is {have}, but its planned length is {full}. A length must be "
                    "a function of the index (not of rng): the lengths given (lengths=, the source's "
                    "lengths(), or a saved pass) must be the transformed item's; measure them again "
                    "(delete a saved lengths file) if the data or the transform changed.")
            if value.dtype != dest.dtype or value.shape[1:] != dest.shape[2:]:
                raise LayoutError(
                    f"record {index}: {key!r} is {value.dtype}{list(value.shape)}, but the layout's "
                    f"(from the first example) is {dest.dtype}[n, {', '.join(map(str, dest.shape[2:]))}]"
                    .replace("[n, ]", "[n]")
                    + ". Cast every record to one dtype and trailing shape in the source or transform.")
            ids, positions, arange = self._ids[k], self._positions[k], self._arange
            at_src, at_length, at_dst = column(k, SRC), column(k, LENGTH), column(k, DST)
            for ordinal, s in pieces:
                n = s[at_length]
                if n:
                    row, src, dst = s[ROW], s[at_src], s[at_dst]
                    dest[row, dst : dst + n] = value[src : src + n]
                    ids[row, dst : dst + n] = ordinal
                    positions[row, dst : dst + n] = arange[:n]
        for _, s in pieces:
            self._filled.add(s[ROW])
        if not rows.pack:
            row = pieces[0][1][ROW]
            self._place_others(row, example, index)
        return []

    def starts(self, position: int) -> bool:
        """Whether the first piece of the item at ``position`` is in this batch."""
        return any(all(s[column(k, SRC)] == 0 for k in range(len(self._rows.keys)))
                   for _, s in self._pieces[position])

    def _place_others(self, row: int, example: dict[str, Any], index: int) -> None:
        """The leaves of a ``Pad``/``Bucket`` row that are not sequences (checked as any item's)."""
        rows, writer = self._rows, self.writer
        whole = dict(example)
        for k, key in enumerate(rows.keys):
            whole[key] = self._values[k][row]
            whole[key + _SUFFIX[SEGMENT_IDS]] = self._ids[k][row]
            whole[key + _SUFFIX[POSITIONS]] = self._positions[k][row]
        if rows.mask_key is not None:
            whole[rows.mask_key] = True
        objects = writer.write(row, whole, index)
        for column_, value in zip(self._objects, objects, strict=True):
            column_[row] = value

    def finish(self, padded: bool) -> tuple[int, list[list[Any]]]:
        """The batch's row count and its list leaves; marks real rows in the mask."""
        count = self._plan.rows
        mask = self._rows.mask
        if mask is not None:
            leaf = self.writer.leaves[mask]
            leaf[...] = False
            leaf[sorted(self._filled)] = True
        size = self.writer.layout.batch_size if padded else count
        return count, [column_[:size] for column_ in self._objects]



def row_example(example: dict[str, Any], keys: tuple[str, ...], row_lengths: tuple[int, ...],
                pack: bool) -> dict[str, Any]:
    """The example a slot is laid out from: each sequence key ``row_lengths`` long, followed by
    its ``_segment_ids`` and ``_positions`` (int32); other leaves as they are (refused by
    ``Pack``, whose rows hold several items).

    Raises:
        ValueError: ``Pack`` with a leaf that is no sequence key, or a key whose derived
            leaves the example already has.
    """
    out: dict[str, Any] = {}
    for key, value in example.items():
        if key not in keys:
            if pack:
                raise ValueError(
                    f"Pack fills each row with several items, so every leaf must be a sequence key; "
                    f"{key!r} is not one of {list(keys)}. Drop it in the transform, name it in keys=, or "
                    "use ap.Pad or ap.Bucket (one item per row).")
            out[key] = value
            continue
        array = np.asarray(value)
        length = row_lengths[keys.index(key)]
        out[key] = np.zeros((length, *array.shape[1:]), array.dtype)
        for suffix in _SUFFIX.values():
            if key + suffix in example:
                raise ValueError(f"the items already have a leaf {key + suffix!r}, which sequence batching adds "
                                 f"for {key!r}; rename it in the source or transform")
            out[key + suffix] = np.zeros(length, np.int32)
    return out
