"""Pytrees of examples: flatten dicts/lists/tuples to leaves with readable key paths, and back.

Only what the loader needs: dicts, lists and tuples (namedtuples too); anything else is a
leaf. Key paths (``['image']``, ``[0]['box']``) name leaves in errors.

A dict's keys are its structure, not their order (as in JAX's pytrees and torch's collate):
two dicts with the same keys in another order (a protobuf map, JSON, a dict built in
another order) flatten to the same structure, their leaves in sorted key order. Rebuilding
gives the key order of the example the structure came from: a loader's batches keep the
key order of the first example it read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TreeDef:
    """The structure of a tree without its leaves; equal structures compare equal."""

    kind: str  # "leaf", "dict", "list", "tuple" or "namedtuple"
    keys: tuple[Any, ...] = ()  # a dict's in sorted order: the order of its leaves
    children: tuple[TreeDef, ...] = ()
    namedtuple_type: type | None = None
    # A dict's keys in the order unflatten gives them (None: sorted), not part of the structure.
    order: tuple[Any, ...] | None = field(default=None, compare=False)

    @property
    def num_leaves(self) -> int:
        return 1 if self.kind == "leaf" else sum(c.num_leaves for c in self.children)


_LEAF = TreeDef("leaf")


def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """Leaves in a fixed order, and the structure to rebuild the tree from them."""
    leaves: list[Any] = []
    return leaves, _flatten(tree, leaves)


def _sorted(keys: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        return tuple(sorted(keys))
    except TypeError:  # keys of several types: order by type, then value
        return tuple(sorted(keys, key=lambda k: (type(k).__name__, repr(k))))


def _flatten(node: Any, leaves: list[Any]) -> TreeDef:
    if isinstance(node, dict):
        given = tuple(node)
        keys = _sorted(given)
        return TreeDef("dict", keys, tuple(_flatten(node[k], leaves) for k in keys),
                       order=None if keys == given else given)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return TreeDef("namedtuple", tuple(node._fields), tuple(_flatten(c, leaves) for c in node), type(node))
    if isinstance(node, list | tuple):
        kind = "list" if isinstance(node, list) else "tuple"
        return TreeDef(kind, tuple(range(len(node))), tuple(_flatten(c, leaves) for c in node))
    leaves.append(node)
    return _LEAF


def unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    """Rebuild a tree of ``treedef``'s structure from ``leaves`` (in flatten order)."""
    it = iter(leaves)
    return _unflatten(treedef, it)


def _unflatten(td: TreeDef, it: Any) -> Any:
    if td.kind == "leaf":
        return next(it)
    children = [_unflatten(c, it) for c in td.children]
    if td.kind == "dict":
        out = dict(zip(td.keys, children, strict=True))
        return out if td.order is None else {k: out[k] for k in td.order}
    if td.kind == "namedtuple":
        assert td.namedtuple_type is not None
        return td.namedtuple_type(*children)
    return children if td.kind == "list" else tuple(children)


def key_paths(treedef: TreeDef) -> list[str]:
    """A readable path for every leaf, in flatten order (``"['image']"``, ``"[0]"``)."""
    out: list[str] = []
    _paths(treedef, "", out)
    return out


def _paths(td: TreeDef, prefix: str, out: list[str]) -> None:
    if td.kind == "leaf":
        out.append(prefix or "<root>")
        return
    for key, child in zip(td.keys, td.children, strict=True):
        part = f".{key}" if td.kind == "namedtuple" else f"[{key!r}]"
        _paths(child, prefix + part, out)
