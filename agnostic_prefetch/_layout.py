"""Slot layout: where each leaf of a batch lives inside one ring slot, and writing items there.

A slot is a 256-byte header followed by one block per array leaf, each block 256-byte
aligned (so DLPack consumers and page-locked copies see aligned buffers) and big enough
for ``batch_size`` items. Leaves that are not arrays (strings, paths) do not live in the
slot; they travel as short lists next to the "done" message.

An array leaf takes items of its exact dtype and shape only. A scalar leaf (shape ``()``)
takes a value of another dtype when its dtype holds that number (``_numbers``: integers in
range, floats rounded to its precision but never overflowing to inf); anything else is an
error naming the record. Nothing is truncated silently. A Python ``int``, ``float`` or
``bool`` in the example is laid out as numpy's wide dtype for it (int64, float64, bool): it
promises no narrower width; a numpy scalar (``np.int16(3)``) promises its own dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agnostic_prefetch._numbers import holds, number_kind, why_not_held
from agnostic_prefetch._tree import TreeDef, flatten, key_paths, unflatten
from agnostic_prefetch.errors import LayoutError

ALIGN = 256
HEADER_BYTES = 256
PAGE = 4096

# Header fields (int64 each). The worker writes them; the parent checks them on delivery and
# reads PROGRESS to name the record a hung worker is stuck on.
H_MAGIC, H_EPOCH, H_NUMBER, H_COUNT, H_PROGRESS = range(5)
MAGIC = 0x41505246  # "APRF"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ArrayLeaf:
    """One array leaf: per-item shape and dtype, and its byte offset in the slot."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    item_bytes: int  # bytes of one item (computed once: it is used per batch)


@dataclass(frozen=True)
class Layout:
    """How one batch of ``batch_size`` items is laid out in a slot."""

    treedef: TreeDef
    batch_size: int
    kinds: tuple[str, ...]  # per leaf, in flatten order: "array" or "object"
    arrays: tuple[ArrayLeaf, ...]
    slot_bytes: int

    @functools.cached_property
    def object_paths(self) -> list[str]:
        """Paths of the leaves that travel as lists (computed once: every fill asks)."""
        paths = key_paths(self.treedef)
        return [p for p, k in zip(paths, self.kinds, strict=True) if k == "object"]

    def describe(self) -> str:
        parts = [f"{a.path}: {a.dtype}{list(a.shape)}" for a in self.arrays]
        parts += [f"{p}: list" for p in self.object_paths]
        return ", ".join(parts)


def _spec_of(x: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of an array leaf, or ``None`` for a leaf that travels as a list.

    Numeric numpy arrays and scalars (``ml_dtypes``' bfloat16 and float8 among them) and
    Python numbers are arrays; so is anything numpy can convert (``__array__``: a torch
    tensor, say) and a spec with ``shape`` and ``dtype`` (``jax.ShapeDtypeStruct``).
    Strings, bytes, paths, numpy strings, structured dtypes and Python ints beyond 64 bits
    are not (``_numbers.number_kind``).
    """
    if isinstance(x, bool | int | float | complex):
        dtype = np.asarray(x).dtype
        return None if number_kind(dtype) is None else ((), dtype)
    if isinstance(x, str | bytes | np.ndarray | np.generic) or hasattr(x, "__array__"):
        dtype = np.asarray(x).dtype if not isinstance(x, np.ndarray | np.generic) else x.dtype
        if isinstance(x, str | bytes) or number_kind(dtype) is None:
            return None
        return tuple(np.shape(x)), np.dtype(dtype)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        try:
            return tuple(int(d) for d in shape), np.dtype(dtype)
        except TypeError:
            return None
    return None


def with_mask(example: Any, key: str) -> Any:
    """``example`` with the boolean leaf ``key`` that padding (``remainder="pad"``) adds.

    Raises:
        LayoutError: the example is not a dict, or already has ``key``.
    """
    if not isinstance(example, dict):
        raise LayoutError(
            f"remainder='pad' adds a boolean mask leaf to each batch, so examples must be dicts; "
            f"this source yields {type(example).__name__}. Wrap each example in a dict in the "
            "transform, or use drop_remainder=True.")
    if key in example:
        raise LayoutError(
            f"remainder='pad' adds the mask leaf {key!r}, but the examples already have a "
            f"{key!r} key; pass mask_key= another name.")
    return {**example, key: np.True_}


def layout_from_example(example: Any, batch_size: int) -> Layout:
    """Lay out a slot for batches of ``batch_size`` items shaped like ``example``.

    Leaves may also be spec objects with ``shape`` and ``dtype`` (e.g.
    ``jax.ShapeDtypeStruct``) for an explicit layout.

    Raises:
        LayoutError: a leaf that is a nested Python list of many numbers (each number would
            be a leaf of its own), naming it, its shape and the remedy.
    """
    _refuse_lists_of_numbers(example, "")
    leaves, treedef = flatten(example)
    paths = key_paths(treedef)
    kinds: list[str] = []
    arrays: list[ArrayLeaf] = []
    offset = HEADER_BYTES
    for path, leaf in zip(paths, leaves, strict=True):
        spec = _spec_of(leaf)
        if spec is None:
            kinds.append("object")
            continue
        shape, dtype = spec
        kinds.append("array")
        item_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        leaf_spec = ArrayLeaf(path, shape, dtype, offset, item_bytes)
        arrays.append(leaf_spec)
        offset = _round_up(offset + leaf_spec.item_bytes * batch_size, ALIGN)
    return Layout(treedef, batch_size, tuple(kinds), tuple(arrays), _round_up(offset, PAGE))


# A list holding at least this many numbers is data, not structure: a leaf per number would
# be a slow, huge batch (a Hugging Face dataset's default format gives a 32x32x3 image as
# 3,072 Python numbers).
_MANY_NUMBERS = 64


def _refuse_lists_of_numbers(node: Any, path: str) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            _refuse_lists_of_numbers(child, f"{path}[{key!r}]")
    elif isinstance(node, list | tuple) and not hasattr(node, "_fields"):
        shape = _number_list_shape(node)
        if shape is not None and int(np.prod(shape)) >= _MANY_NUMBERS:
            raise LayoutError(
                f"leaf {path or '<root>'} is a nested Python list of {int(np.prod(shape)):,} numbers "
                f"(shape {list(shape)}): every number would be a leaf of its own. Return arrays "
                "instead: for a Hugging Face dataset, dataset.with_format('numpy') (or 'torch'); "
                "otherwise np.asarray(...) in the source or the transform.")
        for k, child in enumerate(node):
            _refuse_lists_of_numbers(child, f"{path}[{k}]")


def _number_list_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a rectangular nest of lists of Python numbers, else ``None``."""
    if isinstance(node, bool | int | float):
        return ()
    if not isinstance(node, list | tuple) or not node or hasattr(node, "_fields"):
        return None
    first = _number_list_shape(node[0])
    if first is None:
        return None
    for child in node[1:]:
        if _number_list_shape(child) != first:
            return None
    return (len(node), *first)


def batch_layout(layout: Layout, example: Any, index: int) -> Layout | None:
    """``layout`` with each array leaf shaped like ``example``'s (``shapes="per_batch"``: a
    batch takes its first item's shapes, as Caffe's reshape does), or ``None`` when a leaf
    needs more bytes than the slot holds for it (the batch then travels outside the ring).

    Raises:
        LayoutError: a leaf with another number of dimensions than the layout's.
    """
    leaves, treedef = flatten(example)
    if treedef != layout.treedef:
        return layout  # SlotWriter.write names the structure that differs
    arrays, specs = [], iter(layout.arrays)
    larger = False
    for kind, value in zip(layout.kinds, leaves, strict=True):
        if kind != "array":
            continue
        spec = next(specs)
        shape = tuple(np.shape(value))
        nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
        if len(shape) != len(spec.shape):
            raise LayoutError(
                f"record {index}: leaf {spec.path} is {list(shape)}, but the layout's is "
                f"{spec.dtype}{list(spec.shape)}: with shapes='per_batch' a leaf's size may vary, "
                "not its number of dimensions.")
        larger = larger or nbytes > spec.item_bytes
        arrays.append(replace(spec, shape=shape, item_bytes=nbytes))
    return None if larger else replace(layout, arrays=tuple(arrays))


class SlotWriter:
    """Writes items of one batch straight into a slot's leaf arrays (used in workers).

    ``reference`` names what an item's shapes must equal in errors, ``remedy`` adds to them.
    """

    remedy = ""
    outside = False  # over memory of its own, not a ring slot (a batch larger than its slot)

    def __init__(self, layout: Layout, slot_bytes: memoryview | np.ndarray,
                 reference: str = "the first example's") -> None:
        buf = np.frombuffer(slot_bytes, dtype=np.uint8)
        self.header = buf[:HEADER_BYTES].view(np.int64)
        self.layout = layout
        self.reference = reference
        td = layout.treedef
        # A flat dict (the usual example): its leaves are read by key, without flattening.
        self._flat_keys = td.keys if td.kind == "dict" and all(c.kind == "leaf" for c in td.children) else None
        self.leaves = [
            buf[a.offset : a.offset + a.item_bytes * layout.batch_size]
            .view(a.dtype)
            .reshape((layout.batch_size, *a.shape))
            for a in layout.arrays
        ]
        # A flat dict of numpy scalars (tiny items): each written by key when it has its
        # leaf's exact scalar type, with nothing to check.
        scalars_only = (self._flat_keys is not None and len(layout.arrays) == len(td.keys)
                        and all(a.shape == () for a in layout.arrays))
        self._scalars = ([(k, leaf, a.dtype.type) for k, leaf, a in zip(td.keys, self.leaves, layout.arrays, strict=True)]
                         if scalars_only else None)

    def arrays(self, count: int) -> list[np.ndarray]:
        """The first ``count`` items of every array leaf."""
        return [leaf[:count] for leaf in self.leaves]

    def item_out(self, j: int) -> Any:
        """Item ``j``'s place in the slot, as a tree like the example (``None`` for list leaves).

        Given to a transform that declares ``writes_into_slot``; what it writes there is not
        copied again.
        """
        arrays = iter(self.leaves)
        return unflatten(self.layout.treedef, [next(arrays)[j] if kind == "array" else None
                                               for kind in self.layout.kinds])

    def pad(self, count: int) -> None:
        """Zero rows ``count`` on of every array leaf (the mask leaf among them: ``False``)."""
        for leaf in self.leaves:
            leaf[count:] = 0

    def write(self, j: int, example: Any, index: int) -> list[Any]:
        """Write ``example`` as item ``j``; return its non-array leaves.

        Raises:
            LayoutError: the example's structure, shape or dtype differs from the layout.
        """
        scalars = self._scalars
        if scalars is not None and type(example) is dict and len(example) == len(scalars):
            try:
                for key, dest, kind in scalars:
                    value = example[key]
                    if type(value) is not kind:
                        break
                    dest[j] = value
                else:
                    return []
            except KeyError:
                pass  # the general path names the difference
        layout = self.layout
        leaves = self._flat_leaves(example)
        if leaves is None:
            leaves, treedef = flatten(example)
            if treedef != layout.treedef:
                raise LayoutError(
                    f"record {index} has structure {_describe_tree(leaves, treedef)}, but the "
                    f"first example had {layout.describe()}. Every record must have the same "
                    "keys; make the source or transform return the same structure."
                )
        values = []
        arrays = iter(layout.arrays)
        objects = []
        for kind, value in zip(layout.kinds, leaves, strict=True):
            if kind == "object":
                objects.append(value)
                continue
            spec = next(arrays)
            a = np.asarray(value)
            if a.dtype != spec.dtype or a.shape != spec.shape:
                if a.shape == spec.shape == ():
                    self._check_scalar(a, spec, index)
                else:
                    raise LayoutError(
                        f"record {index}: leaf {spec.path} is {a.dtype}{list(a.shape)} but "
                        f"{self.reference} is {spec.dtype}{list(spec.shape)}. Batches need equal "
                        "shapes and dtypes: crop, resize or pad in the transform (or the "
                        "source) so every record matches, or cast to one dtype."
                        + (" For sequences of varying length, pass batching=ap.Pad(...), ap.Bucket(...) "
                           "or ap.Pack(...) to the Loader (docs/sequences.md)."
                           if a.ndim and a.shape[1:] == spec.shape[1:] and a.dtype == spec.dtype else "")
                        + self.remedy
                    )
            values.append(a)
        for dest, a in zip(self.leaves, values, strict=True):
            if a.ndim:
                place = dest[j]
                if a.ctypes.data == place.ctypes.data and a.strides == place.strides:
                    continue  # the transform wrote it in place (writes_into_slot)
            dest[j] = a
        return objects

    def _flat_leaves(self, example: Any) -> list[Any] | None:
        """A flat dict example's leaves in flatten order, if the layout is one and so is the
        example (the same keys, no container among the values); else ``None``."""
        keys = self._flat_keys
        if keys is None or type(example) is not dict or len(example) != len(keys):
            return None
        try:
            leaves = [example[k] for k in keys]
        except KeyError:
            return None
        for value in leaves:
            if isinstance(value, dict | list | tuple):
                return None
        return leaves

    @staticmethod
    def _check_scalar(a: np.ndarray, spec: ArrayLeaf, index: int) -> None:
        """Refuse a scalar of another dtype that ``spec``'s dtype does not hold (``_numbers``)."""
        if holds(a, spec.dtype):
            return
        raise LayoutError(
            f"record {index}: leaf {spec.path} is {a.item()!r} ({a.dtype}), which the leaf's "
            f"{spec.dtype} (laid out from the first example, or spec=) does not hold: "
            f"{why_not_held(a, spec.dtype)}. Values are never truncated silently: cast this "
            "leaf to one wider dtype for every record in the source or transform, or give "
            "spec= a wider dtype for it.")


def _describe_tree(leaves: list[Any], treedef: TreeDef) -> str:
    paths = key_paths(treedef)
    return "{" + ", ".join(paths) + "}" if paths else repr(type(leaves[0]).__name__)
