"""The source protocol: what the loader asks of a source (a map-style dataset).

Example:
    >>> import numpy as np
    >>> class Squares:
    ...     def __len__(self): return 4
    ...     def __getitem__(self, i): return {"x": np.float32(i * i)}
    >>> isinstance(Squares(), MapSource)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["BatchOrderSource", "MapSource", "check_seed"]


def check_seed(seed: Any) -> int:
    """``seed`` as an int, if it is a non-negative integer (Python or numpy; not a bool).

    Every seed of the data order and the per-item draws goes to ``numpy.random``, which
    takes non-negative integers only; checking where the seed is given names it there.

    Raises:
        ValueError: any other value, naming it and the remedy.

    Example:
        >>> check_seed(np.uint32(7))
        7
    """
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool | np.bool_) and seed >= 0:
        return int(seed)
    kind = " (a bool)" if isinstance(seed, bool | np.bool_) else ""
    raise ValueError(
        f"seed must be a non-negative integer (Python or numpy), got {seed!r}{kind}; pass any "
        "int >= 0, e.g. seed % 2**32 to keep a negative or hashed seed's variety.")


@runtime_checkable
class MapSource(Protocol):
    """Any object with ``len(source)`` and ``source[i]``, returning a pytree of arrays and scalars.

    It travels to the workers by value (cloudpickle), so it should open files lazily, on
    its first ``__getitem__`` in each process, and ``__getitem__`` should be a pure function
    of the index. A ``__repr__`` that says what it reads makes errors easier to place.
    An optional ``release()`` lets go of what it opened in this process (reads reopen
    lazily); the loader calls it after reading its layout example in the parent.

    ``__getitems__(indices) -> list`` (torch's and Grain's name), where defined, is called
    once per batch a worker fills, with the batch's indices in order, and returns their items
    in that order: a format that reads blocks or row groups reads each once. If it raises,
    the worker reads that batch item by item through ``__getitem__``, so a bad record is
    named (and skipped under ``on_error="skip"``) by itself; its time counts as reading.

    Two more optional methods make failures point at the data: ``locate(index) -> str``
    says where record ``index`` comes from (``"line 7 of train.txt: cat/01.jpg"``, ``"key
    b'00000007' of train_lmdb"``), and ``remedy(index, exc) -> str | None`` a remedy that
    fits this source for an exception raised on that record (by the source or by the
    transform), or ``None``. The loader puts both in the error it raises.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@runtime_checkable
class BatchOrderSource(Protocol):
    """A map-style source that decides the batches of each epoch itself.

    Define ``batch_order`` on a source (for example a window sampler that draws a fixed
    share of foreground windows into every batch) and :class:`~agnostic_prefetch.Loader`
    uses it instead of its own shuffle. It is called with the *global* batch size
    (``batch_size * shard_count``), so its order does not depend on the shard count; the
    loader gives each shard its slice of every batch, applies the remainder rule, derives
    each item's random generator from ``(seed, epoch, position)`` and resumes exactly.

    Indices in the returned batches are passed to ``__getitem__`` unchanged; they may
    range over a larger index space than ``len(source)`` (for example window × flip),
    as long as ``__getitem__`` is a pure function of the index. Such a source says so with
    an ``index_space`` attribute (an int: its indices run over ``range(index_space)``;
    without one, ``range(len(source))``): a source that holds it, such as a
    :class:`~agnostic_prefetch.Mixture`, places its indices by it, while ``len(source)``
    stays the number of items an epoch is built around.

    A source that orders its batches may also define ``order_fingerprint``: a JSON-able
    value naming what decides its order beyond the arguments (checked on resume).

    Example:
        >>> class Sides:
        ...     "Three records, each read as itself (0, 2, 4) and mirrored (1, 3, 5)."
        ...     index_space = 6
        ...     def __len__(self): return 3
        ...     def __getitem__(self, i): return {"record": i // 2, "mirrored": i % 2}
        ...     def batch_order(self, *, seed, epoch, batch_size):
        ...         order = [5, 2, 1] if epoch % 2 else [0, 3, 4]
        ...         return [order[i:i + batch_size] for i in range(0, 3, batch_size)]
        >>> isinstance(Sides(), BatchOrderSource)
        True
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def batch_order(self, *, seed: int, epoch: int, batch_size: int) -> Sequence[Sequence[int]]:
        """All global batches of ``epoch``; a pure function of the arguments.

        ``seed`` is a non-negative integer (:func:`check_seed`). Every batch holds exactly ``batch_size`` indices, except that the last may hold
        fewer (not none); every epoch has as many batches.
        """
        ...


