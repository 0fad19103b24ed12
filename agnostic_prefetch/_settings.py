"""The Loader's settings, grouped into small frozen objects, and the one validator they pass.

``Loader(...)`` keeps its keyword arguments; :meth:`LoaderOptions.from_arguments` turns them
into four groups (the order, the pool, the items, what is watched) and validates them all
in :meth:`LoaderOptions.validate`, cross rules included, before anything is started. Every
message names the value, the numbers and the remedy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_prefetch.batching import Bucket, Pack, Pad
from agnostic_prefetch.sampler import REMAINDERS

__all__ = ["ItemOptions", "LoaderOptions", "OrderOptions", "PoolOptions", "WatchOptions"]


@dataclass(frozen=True)
class OrderOptions:
    """Which records form each batch, in what order, and how far one iteration goes."""

    batch_size: int  # rows of this shard's batches
    shuffle: bool = False
    seed: int = 0
    epochs: int | None = 1  # None: endless
    remainder: str = "short"  # a short last global batch: "short", "pad" or "drop"
    mask_key: str = "mask"  # the mask leaf with remainder="pad"
    shard_index: int = 0
    shard_count: int = 1
    ordered: bool = True

    @property
    def mask(self) -> str | None:
        """The mask leaf's key, where padding adds one."""
        return self.mask_key if self.remainder == "pad" else None


@dataclass(frozen=True)
class PoolOptions:
    """Who loads: the workers, their backend, the ring's slots, and how workers are watched."""

    workers: int | str = 2  # a count, or "auto"
    backend: str = "process"  # "process", "thread", or "auto" (with workers="auto")
    slots: int | None = None
    timeout: float | None = None
    worker_init: Callable[[int], None] | None = None
    stall_warning: float | None = 60.0  # seconds without progress before a warning with the stack
    max_worker_deaths: int = 8  # worker deaths survived in any 60 s (each replaced, its batches redone)


@dataclass(frozen=True)
class ItemOptions:
    """How a record becomes a row of a batch: the transform, bad records, the layout's shapes."""

    transform: Callable[..., Any] | None = None
    on_error: str = "raise"
    spec: Any = None
    shapes: str = "fixed"
    batching: Pad | Bucket | Pack | None = None  # sequences of varying length (docs/sequences.md)

    @property
    def skip(self) -> bool:
        return self.on_error == "skip"


@dataclass(frozen=True)
class WatchOptions:
    """What the loader reports while it runs."""

    log_every: float | None = None
    trace: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class LoaderOptions:
    """Every setting of a loader, validated once (:meth:`validate`) when it is built.

    Example:
        >>> LoaderOptions.from_arguments(batch_size=4).order.remainder
        'short'
        >>> LoaderOptions.from_arguments(batch_size=4, on_error="ignore")
        Traceback (most recent call last):
        ...
        ValueError: on_error must be 'raise' or 'skip', got 'ignore'
    """

    order: OrderOptions
    pool: PoolOptions
    items: ItemOptions
    watch: WatchOptions

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_arguments(cls, *, batch_size: int | None = None, global_batch_size: int | None = None,
                       shuffle: bool = False, seed: int = 0, epochs: int | None = 1,
                       drop_remainder: bool = False, remainder: str | None = None,
                       mask_key: str = "mask", ordered: bool = True, shard_index: int = 0,
                       shard_count: int = 1, workers: int | str = 2, backend: str = "process",
                       slots: int | None = None, timeout: float | None = None, max_worker_deaths: int = 8,
                       worker_init: Callable[[int], None] | None = None, stall_warning: float | None = 60.0,
                       transform: Callable[..., Any] | None = None, on_error: str = "raise",
                       spec: Any = None, shapes: str = "fixed", batching: Pad | Bucket | Pack | None = None,
                       log_every: float | None = None,
                       trace: str | os.PathLike[str] | None = None) -> LoaderOptions:
        """The Loader's keyword arguments as settings: the batch size per shard and the
        remainder rule resolved from the ways they may be given, then validated.

        Raises:
            ValueError: a bad value or two that contradict each other, naming the remedy.
        """
        if drop_remainder and remainder not in (None, "drop"):
            raise ValueError(f"drop_remainder=True contradicts remainder={remainder!r}; pass one of them")
        order = OrderOptions(_local_batch_size(batch_size, global_batch_size, shard_count), shuffle, seed,
                             epochs, "drop" if drop_remainder else (remainder or "short"), mask_key,
                             shard_index, shard_count, ordered)
        return cls(order, PoolOptions(workers, backend, slots, timeout, worker_init, stall_warning, max_worker_deaths),
                   ItemOptions(transform, on_error, spec, shapes, batching), WatchOptions(log_every, trace))

    def validate(self) -> None:
        """Check every setting and the rules between them.

        Raises:
            ValueError: naming the value, the numbers and the remedy.
        """
        order, pool, items, watch = self.order, self.pool, self.items, self.watch
        _check_pool(pool)
        if items.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {items.on_error!r}")
        if order.epochs is not None and (not _is_int(order.epochs) or order.epochs < 1):
            raise ValueError(f"epochs must be an integer >= 1, or None (endless), got {order.epochs!r}")
        if watch.log_every is not None and not watch.log_every > 0:
            raise ValueError(f"log_every must be positive seconds or None, got {watch.log_every}")
        if order.remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {order.remainder!r}")
        if items.skip and order.shard_count > 1 and order.remainder != "pad":
            raise ValueError(
                f"on_error='skip' with shard_count={order.shard_count} needs remainder='pad': a skipped "
                "record would make this shard's batch shorter than the other shards' (and an "
                "all-skipped batch would change its step count), so the processes would feed "
                "different shapes. Padding keeps every batch full and marks real rows in a mask.")
        _check_shapes(items, order)
        _check_batching(items, order)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_pool(pool: PoolOptions) -> None:
    if pool.backend not in ("process", "thread", "auto"):
        raise ValueError(f"backend must be 'process', 'thread' or 'auto', got {pool.backend!r}")
    if isinstance(pool.workers, str):
        if pool.workers != "auto":
            raise ValueError(f"workers must be a count or 'auto', got {pool.workers!r}")
    elif not _is_int(pool.workers) or pool.workers < 0:
        raise ValueError(f"workers must be an integer >= 0 or 'auto', got {pool.workers!r}")
    elif pool.backend == "auto":
        raise ValueError(f"backend='auto' picks the backend together with the count: pass workers='auto', "
                         f"or backend='process' or 'thread' with workers={pool.workers}")
    if pool.timeout is not None and not pool.timeout > 0:
        raise ValueError(f"timeout must be positive seconds or None, got {pool.timeout}")
    if pool.stall_warning is not None and not pool.stall_warning > 0:
        raise ValueError(f"stall_warning must be positive seconds or None (no warning), got {pool.stall_warning}")
    if not _is_int(pool.max_worker_deaths) or pool.max_worker_deaths < 0:
        raise ValueError(f"max_worker_deaths must be an integer >= 0 (0: the first death stops the loader), got "
                         f"{pool.max_worker_deaths!r}")


def _check_shapes(items: ItemOptions, order: OrderOptions) -> None:
    if items.shapes not in ("fixed", "per_batch"):
        raise ValueError(f"shapes must be 'fixed' or 'per_batch', got {items.shapes!r}")
    if items.shapes == "fixed":
        return
    if order.shard_count > 1:
        raise ValueError(
            f"shapes='per_batch' with shard_count={order.shard_count}: every process must feed the "
            "same shape every step; crop or resize to one size instead")
    if order.remainder == "pad":
        raise ValueError("shapes='per_batch' cannot pad batches (their shapes vary); use remainder='short'")


def _check_batching(items: ItemOptions, order: OrderOptions) -> None:
    batching = items.batching
    if batching is None:
        return
    if not isinstance(batching, Pad | Bucket | Pack):
        raise ValueError(f"batching must be ap.Pad(...), ap.Bucket(...) or ap.Pack(...), got {batching!r}")
    name = type(batching).__name__
    if items.shapes != "fixed" or items.spec is not None:
        raise ValueError(f"batching=ap.{name}(...) lays the ring out from the sequences' lengths; it takes "
                         "no shapes='per_batch' and no spec=")
    if order.shard_count > 1 and order.remainder == "short" and not isinstance(batching, Pad):
        raise ValueError(
            f"batching=ap.{name}(...) with shard_count={order.shard_count}: an epoch's last global batch may "
            "have fewer rows than the others, and every process must feed equal shapes. Pass "
            "remainder='pad' (full batches, a mask of the rows that hold something) or remainder='drop'.")


def _local_batch_size(batch_size: int | None, global_batch_size: int | None, shard_count: int) -> int:
    if batch_size is None and global_batch_size is None:
        raise ValueError("pass batch_size= (per shard) or global_batch_size= (over all shards)")
    if batch_size is not None and global_batch_size is not None and batch_size * shard_count != global_batch_size:
        raise ValueError(
            f"batch_size={batch_size} x shard_count={shard_count} is not global_batch_size="
            f"{global_batch_size}; pass one of them")
    if batch_size is not None:
        return batch_size
    assert global_batch_size is not None
    if not _is_int(global_batch_size) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if shard_count < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not split into shard_count={shard_count} "
            "equal slices; use a global batch that is a multiple of the shard count")
    return int(global_batch_size) // shard_count
