"""The order: which indices form global batch k of epoch e, and which slice shard s takes.

Nothing here knows about processes, memory or frameworks. Every other part asks this
module "what is batch k of epoch e on this shard?" and gets the same answer whatever the
worker count, backend or timing, and the same *global* batches whatever the shard count.

Rules, in the order they are applied (``G = batch_size * shard_count``, the global batch):

1. The epoch's global order. For a plain map-style source it is ``range(len(source))``,
   permuted by ``numpy.random.default_rng([seed, epoch]).permutation(n)`` when
   ``shuffle``. Global batch ``k`` is items ``[k * G, (k + 1) * G)`` of it. A source that
   defines ``batch_order`` (see :class:`BatchOrderSource`) is called with
   ``batch_size=G`` and supplies the epoch's global batches itself.
2. The remainder: a last global batch with fewer than ``G`` items is dropped
   (``"drop"``), kept short (``"short"``, only with one shard: several processes must
   feed equal shapes) or padded (``"pad"``: every shard's batch is full, with a boolean
   mask marking real rows).
3. Sharding. Shard ``s`` of ``S`` takes rows ``[s * batch_size, (s + 1) * batch_size)``
   of every global batch (fewer, maybe none, of a short last one; padding fills the rest).

So the global sequence of batches is a pure function of ``(seed, epoch, k, G)``: a
checkpoint taken with ``S`` shards resumes exactly on ``S'``. Each item also carries its
*position*, its row in the epoch's global order (``k * G + row``); the per-item random
generator is seeded from ``(seed, epoch, position)``, so draws do not depend on the shard
count, worker count or timing either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_prefetch.sources.protocol import BatchOrderSource, check_seed

__all__ = ["REMAINDERS", "BatchOrderSource", "Batch", "Sampler", "item_rng"]

REMAINDERS = ("short", "pad", "drop")


@dataclass(frozen=True)
class Batch:
    """One shard's slice of one global batch: what to read and where it sits in the epoch."""

    epoch: int
    number: int  # the global batch's number within the epoch (the same on every shard)
    indices: np.ndarray  # int64 record indices, in batch order (fewer than rows: padding)
    first_position: int  # item j sits at first_position + j in the epoch's global order
    plan: Any = None  # a sequence batch's rows (``_plan.RowPlan``: batching=), else None
    item_positions: np.ndarray | None = None  # a sequence batch's items' positions

    @property
    def positions(self) -> np.ndarray:
        """Each item's position in the epoch's global order (seeds its random generator)."""
        if self.item_positions is not None:
            return self.item_positions
        return np.arange(self.first_position, self.first_position + len(self.indices), dtype=np.int64)


def item_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random generator for one item: a pure function of (seed, epoch, position)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, position])))


class Sampler:
    """One shard's slices of each epoch's global batches, computed on demand, cached per epoch.

    Args:
        source: the map-style source (only ``len`` and an optional ``batch_order`` are used).
        batch_size: items per batch on this shard; the global batch is
            ``batch_size * shard_count``.
        shuffle: permute items per epoch from ``(seed, epoch)``.
        seed: the run's seed: a non-negative integer (Python or numpy).
        remainder: ``"short"``, ``"pad"`` or ``"drop"`` (see the module's rules).
        shard_index, shard_count: which slice of every global batch this process reads.

    Raises:
        ValueError: on a bad batch size, shard, seed or remainder, naming the numbers and the
            remedy.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        remainder: str = "short",
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> None:
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(
                f"shard_index must be in [0, shard_count); got shard_index={shard_index}, "
                f"shard_count={shard_count}"
            )
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        self.batch_size = int(batch_size)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.global_batch_size = self.batch_size * self.shard_count
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.remainder = remainder
        self.source_len = len(source)
        self._batch_order = getattr(source, "batch_order", None)
        if self._batch_order is not None and not callable(self._batch_order):
            self._batch_order = None
        self._orders: dict[int, Any] = {}  # per recent epoch: the global order (or batches)
        self.batches_per_epoch = self._count_batches()
        if self.batches_per_epoch == 0 and self.drop_remainder:
            raise ValueError(
                f"an epoch has no batches: the source has {self.source_len} records and the "
                f"global batch is {self.global_batch_size} (batch_size={self.batch_size} x "
                f"shard_count={self.shard_count}) with remainder='drop'. Use a smaller "
                "batch_size, fewer shards, or keep the remainder (remainder='pad')."
            )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"an epoch has no batches: the source has {self.source_len} records"
                f"{' and batch_order() returned none' if self._batch_order is not None else ''}; "
                "give the loader a source with records.")

    @property
    def drop_remainder(self) -> bool:
        return self.remainder == "drop"

    @property
    def cached_epochs(self) -> list[int]:
        """The epochs whose order is kept now (the two latest at most: a look-ahead straddles
        an epoch boundary, and an epoch's order is as large as the source)."""
        return sorted(self._orders)

    @property
    def orders_itself(self) -> bool:
        """Whether the source supplies its batches (``batch_order``): ``shuffle`` has no effect."""
        return self._batch_order is not None

    def _count_batches(self) -> int:
        if self._batch_order is not None:
            return len(self._source_batches(0))
        n, g = self.source_len, self.global_batch_size
        if n % g and self.remainder == "short" and self.shard_count > 1:
            raise ValueError(self._uneven_message(n // g, n % g, 0))
        return n // g if self.drop_remainder else -(-n // g)

    def _uneven_message(self, k: int, items: int, epoch: int) -> str:
        g = self.global_batch_size
        return (
            f"global batch {k} of epoch {epoch} has {items} of {g} items, so the "
            f"{self.shard_count} shards would get batches of different sizes (and several "
            "JAX processes would feed different shapes). Pass remainder='pad' (every shard "
            "gets a full batch and a mask of its real rows) or drop_remainder=True (those "
            f"{items} items are left out of each epoch)."
        )

    def batch(self, epoch: int, number: int) -> Batch:
        """This shard's slice of global batch ``number`` of ``epoch``."""
        if not 0 <= number < self.batches_per_epoch:
            raise IndexError(f"batch {number} of an epoch with {self.batches_per_epoch} batches")
        whole = self.global_batch(epoch, number)
        lo = self.shard_index * self.batch_size
        return Batch(epoch, number, whole[lo : lo + self.batch_size],
                     number * self.global_batch_size + lo)

    def global_batch(self, epoch: int, number: int) -> np.ndarray:
        """Every index of global batch ``number`` of ``epoch`` (the same for any shard count)."""
        if self._batch_order is not None:
            return self._source_batches(epoch)[number]
        g = self.global_batch_size
        return self._epoch_order(epoch)[number * g : (number + 1) * g]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every index of ``epoch`` in its global order (the global batches laid end to end)."""
        if self._batch_order is not None:
            batches = self._source_batches(epoch)
            return np.concatenate(batches) if batches else np.zeros(0, np.int64)
        order = self._epoch_order(epoch)
        return order[: self.batches_per_epoch * self.global_batch_size]

    def epoch(self, epoch: int) -> list[Batch]:
        """All of this shard's batches of ``epoch``."""
        return [self.batch(epoch, k) for k in range(self.batches_per_epoch)]

    def _keep(self, epoch: int, value: Any) -> Any:
        # Only the two most recent epochs: the loader's look-ahead straddles an epoch boundary.
        self._orders = {e: v for e, v in self._orders.items() if e == epoch - 1}
        self._orders[epoch] = value
        return value

    def _epoch_order(self, epoch: int) -> np.ndarray:
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        n = self.source_len
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        return self._keep(epoch, order)

    def _source_batches(self, epoch: int) -> list[np.ndarray]:
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        assert self._batch_order is not None
        g = self.global_batch_size
        raw = self._batch_order(seed=self.seed, epoch=epoch, batch_size=g)
        batches = [np.asarray(b, dtype=np.int64).reshape(-1) for b in raw]
        for k, b in enumerate(batches):
            if len(b) > g or (len(b) < g and k != len(batches) - 1) or len(b) == 0:
                raise ValueError(
                    f"batch_order() returned batch {k} of epoch {epoch} with {len(b)} indices; "
                    f"the global batch is {g} (batch_size={self.batch_size} x shard_count="
                    f"{self.shard_count}). Return batches of exactly {g} indices; only the "
                    "last may be shorter (and not empty)."
                )
        if batches and len(batches[-1]) < g:
            if self.drop_remainder:
                batches.pop()
            elif self.remainder == "short" and self.shard_count > 1:
                raise ValueError(self._uneven_message(len(batches) - 1, len(batches[-1]), epoch))
        if epoch and len(batches) != self.batches_per_epoch:
            raise ValueError(
                f"batch_order() returned {len(batches)} batches for epoch {epoch} but "
                f"{self.batches_per_epoch} for epoch 0; every epoch must have as many batches "
                "(a checkpoint counts batches)."
            )
        return self._keep(epoch, batches)
