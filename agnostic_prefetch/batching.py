"""How items become a batch: ``Loader(..., batching=ap.Pad(...) | ap.Bucket(...) | ap.Pack(...))``.

The default (no ``batching=``) stacks items of one shape. For sequences of every length:

* :class:`Pad`: each item is a row, its sequence leaves padded (or cut) to one length per
  batch, fixed or the longest of the *global* batch rounded up;
* :class:`Bucket`: each batch holds items of one length bucket, padded to its boundary;
* :class:`Pack`: rows of a fixed length holding several items (``concat``, ``first_fit``,
  ``best_fit``).

Each gives every sequence leaf ``key`` two more leaves: ``key_segment_ids`` (int32: 1, 2,
... for the items of a row, 0 on padding) and ``key_positions`` (int32: 0, 1, ... within
each item's piece in the row, 0 on padding), so one model handles all three.

These are part of the *order*: with every item's length known before the epoch (from the
source's ``lengths()``, from ``lengths=``, or one pass of the workers), global batch ``k``
of ``epoch`` is a function of ``(seed, epoch, k, global batch)`` and the lengths, so resume,
any worker count and any shard count stay exact (docs/sequences.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Bucket", "Pack", "Pad"]

Lengths = np.ndarray | Mapping[str, np.ndarray] | str | os.PathLike[str] | None


def _keys(keys: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if keys is None:
        return None
    return (keys,) if isinstance(keys, str) else tuple(keys)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _length_per_key(length: int | Mapping[str, int], what: str) -> None:
    if isinstance(length, Mapping):
        if not length:
            raise ValueError(f"{what} is an empty mapping; give a length per sequence key")
        for key, value in length.items():
            _positive(f"{what}[{key!r}]", value)
    else:
        _positive(what, length)


@dataclass(frozen=True)
class Pad:
    """Each item is a row; its sequence leaves are padded (or cut) to one length per batch.

    Args:
        length: the padded length (an int, or one per key); ``None``: the longest item of
            the *global* batch rounded up to a multiple of ``multiple``, so every process of a
            multi-host run pads its rows alike (the lengths are known before the batch).
        multiple: with ``length=None``, round the batch's length up to this.
        keys: the sequence leaves (first axis = time); default: the keys ``lengths`` gives, or
            every array leaf of at least one dimension.
        longer: an item longer than ``length``: ``"truncate"`` (keep its first ``length``)
            or ``"refuse"`` (an error naming the record, before the epoch starts).
        lengths: each item's length: an int array (one per index, for every key), a dict of
            them per key, or a path where one pass of the workers saves them (``.npz``) and a
            later run reads them; ``None``: ``source.lengths()``, else one pass, not saved.
        pad_value: what padding holds in the sequence leaves.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> tokens = [np.arange(n, dtype=np.int32) for n in (3, 1, 2, 5)]
        >>> class Docs:
        ...     def __len__(self): return len(tokens)
        ...     def __getitem__(self, i): return {"tokens": tokens[i]}
        ...     def lengths(self): return np.array([len(t) for t in tokens])
        >>> with ap.Loader(Docs(), 2, workers=0, batching=ap.Pad(multiple=4)) as loader:
        ...     [b["tokens"].shape for b in loader]
        [(2, 4), (2, 8)]
    """

    length: int | Mapping[str, int] | None = None
    multiple: int = 8
    keys: str | Sequence[str] | None = None
    longer: str = "refuse"
    lengths: Lengths = field(default=None, repr=False, compare=False)
    pad_value: int | float = 0

    def __post_init__(self) -> None:
        if self.length is not None:
            _length_per_key(self.length, "Pad(length=)")
        _positive("Pad(multiple=)", self.multiple)
        if self.longer not in ("truncate", "refuse"):
            raise ValueError(f"Pad(longer=) must be 'truncate' or 'refuse', got {self.longer!r}")
        object.__setattr__(self, "keys", _keys(self.keys))


@dataclass(frozen=True)
class Bucket:
    """Batches of items of one length bucket, padded to that bucket's boundary.

    An item of length ``n`` falls in the first bucket whose boundary is ``>= n``; each
    global batch holds items of one bucket only, so a JAX step compiles once per bucket.
    Within an epoch every item is delivered once: a bucket's items are taken in the
    epoch's order and cut into global batches; the batches of all buckets are then
    interleaved in an order drawn from ``(seed, epoch)`` (when ``shuffle``), else by their
    first item. The last global batch of each bucket may be short: the Loader's
    ``remainder`` decides (``"short"`` keeps it, ``"pad"`` pads it with masked rows,
    ``"drop"`` leaves its items out of the epoch and counts them in
    ``stats()["dropped"]``).

    Args:
        boundaries: increasing bucket boundaries (the padded length of each bucket).
        keys, lengths, pad_value: as :class:`Pad`.
        longer: an item longer than the last boundary: ``"truncate"`` or ``"refuse"``.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> tokens = [np.arange(n, dtype=np.int32) for n in (3, 9, 2, 12, 1, 10)]
        >>> class Docs:
        ...     def __len__(self): return len(tokens)
        ...     def __getitem__(self, i): return {"tokens": tokens[i]}
        ...     def lengths(self): return np.array([len(t) for t in tokens])
        >>> with ap.Loader(Docs(), 3, workers=0, batching=ap.Bucket((4, 16))) as loader:
        ...     sorted(b["tokens"].shape for b in loader)
        [(3, 4), (3, 16)]
    """

    boundaries: Sequence[int] = ()
    keys: str | Sequence[str] | None = None
    longer: str = "refuse"
    lengths: Lengths = field(default=None, repr=False, compare=False)
    pad_value: int | float = 0

    def __post_init__(self) -> None:
        bounds = tuple(int(b) for b in self.boundaries)
        if not bounds:
            raise ValueError("Bucket(boundaries=) needs at least one boundary")
        for b in bounds:
            _positive("a Bucket boundary", b)
        if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"Bucket boundaries must increase, got {bounds}")
        if self.longer not in ("truncate", "refuse"):
            raise ValueError(f"Bucket(longer=) must be 'truncate' or 'refuse', got {self.longer!r}")
        object.__setattr__(self, "boundaries", bounds)
        object.__setattr__(self, "keys", _keys(self.keys))


@dataclass(frozen=True)
class Pack:
    """Rows of a fixed length, each holding several items (or pieces of them).

    Methods:

    * ``"concat"``: the epoch's items concatenated in order and cut every ``length``
      tokens (Grain's concat-then-split: with several keys, an item is added while every
      key fits, and the key that overflows is split; the others' rest is padding); items
      cross rows and batches; only a row that ends the epoch is padded.
    * ``"first_fit"`` / ``"best_fit"``: whole items, longest first, into the first row
      (or the fullest row) where every key fits, planned over ``window`` consecutive items
      of the epoch's order at a time; a larger window packs tighter.

    Args:
        length: the row length: an int, or one per key (``{"inputs": 1024, "targets": 256}``).
        method: ``"concat"``, ``"first_fit"`` or ``"best_fit"``.
        window: items planned together by the fit methods (default: 8 global batches of
            items); ignored by ``concat``.
        longer: an item longer than a row (fit methods): ``"split"`` into row-long pieces,
            ``"truncate"``, or ``"refuse"`` (an error naming the record).
        keys, lengths, pad_value: as :class:`Pad`. Every leaf of an item must be a sequence
            key: a packed row holds several items, so it has no room for one item's label.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> tokens = [np.arange(n, dtype=np.int32) + 10 * n for n in (3, 2, 4, 1)]
        >>> class Docs:
        ...     def __len__(self): return len(tokens)
        ...     def __getitem__(self, i): return {"tokens": tokens[i]}
        ...     def lengths(self): return np.array([len(t) for t in tokens])
        >>> with ap.Loader(Docs(), 2, workers=0, batching=ap.Pack(length=5)) as loader:
        ...     batch = next(iter(loader))
        >>> batch["tokens"].tolist(), batch["tokens_segment_ids"].tolist()
        ([[30, 31, 32, 20, 21], [40, 41, 42, 43, 10]], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]])
    """

    length: int | Mapping[str, int] = 0
    method: str = "concat"
    window: int | None = None
    longer: str = "split"
    keys: str | Sequence[str] | None = None
    lengths: Lengths = field(default=None, repr=False, compare=False)
    pad_value: int | float = 0

    def __post_init__(self) -> None:
        _length_per_key(self.length, "Pack(length=)")
        if self.method not in ("concat", "first_fit", "best_fit"):
            raise ValueError(f"Pack(method=) must be 'concat', 'first_fit' or 'best_fit', got {self.method!r}")
        if self.window is not None:
            _positive("Pack(window=)", self.window)
        if self.longer not in ("split", "truncate", "refuse"):
            raise ValueError(f"Pack(longer=) must be 'split', 'truncate' or 'refuse', got {self.longer!r}")
        if self.method == "concat" and self.longer != "split":
            raise ValueError(f"Pack(method='concat') splits every item across rows; longer={self.longer!r} "
                             "applies to the fit methods ('first_fit', 'best_fit')")
        object.__setattr__(self, "keys", _keys(self.keys))


Batching = Pad | Bucket | Pack
