"""The order: which indices form batch k of epoch e on one shard (a pure function).

Nothing here knows about processes, memory or frameworks. Every other part asks this
module "what is batch k of epoch e?" and gets the same answer whatever the worker count,
backend or timing.

Rules, in the order they are applied:

1. The epoch's global order. For a plain map-style source it is ``range(len(source))``,
   permuted by ``numpy.random.default_rng([seed, epoch]).permutation(n)`` when
   ``shuffle``. A source that defines ``batch_order`` (see :class:`BatchOrderSource`) supplies the
   epoch's global *batches* itself instead.
2. Sharding. Items (or, for a batch-order source, whole batches) are split into
   ``shard_count`` contiguous runs whose lengths differ by at most one: shard ``s`` takes
   ``[s * n // shard_count, (s + 1) * n // shard_count)``. With ``drop_remainder`` every
   shard is first cut to ``n // shard_count`` so all shards have the same length.
3. Batching. A shard's items are cut into batches of ``batch_size``; ``drop_remainder``
   drops the partial last batch. (A batch-order source's short batches are dropped
   before sharding.)

Each item also carries its *position*: its place in the epoch's global order (for a
batch-order source, ``global_batch * batch_size + j``). The per-item random generator is
seeded from ``(seed, epoch, position)``, so draws do not depend on the shard layout of
the other items either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_prefetch.sources.protocol import BatchOrderSource

__all__ = ["BatchOrderSource", "Batch", "Sampler", "item_rng"]


@dataclass(frozen=True)
class Batch:
    """One batch of one epoch on this shard: what to read and where it sits in the epoch."""

    epoch: int
    number: int  # batch number within the epoch, on this shard
    indices: np.ndarray  # int64 record indices, in batch order
    first_position: int  # item j sits at first_position + j in the epoch's global order

    @property
    def positions(self) -> np.ndarray:
        """Each item's position in the epoch's global order (seeds its random generator)."""
        return np.arange(self.first_position, self.first_position + len(self.indices), dtype=np.int64)


def item_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The random generator for one item: a pure function of (seed, epoch, position)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, position])))


def _split(n: int, shard_index: int, shard_count: int, equal: bool) -> tuple[int, int]:
    if equal:
        per = n // shard_count
        return shard_index * per, (shard_index + 1) * per
    return shard_index * n // shard_count, (shard_index + 1) * n // shard_count


class Sampler:
    """Batches of each epoch for one shard, computed on demand and cached per epoch.

    Args:
        source: the map-style source (only ``len`` and an optional ``batch_order`` are used).
        batch_size: items per batch.
        shuffle: permute items per epoch from ``(seed, epoch)``.
        seed: the run's seed.
        drop_remainder: every batch full and every shard the same length.
        shard_index, shard_count: which contiguous part of each epoch this process reads.

    Raises:
        ValueError: on a bad batch size or shard, naming the numbers and the remedy.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
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
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self._source_len = len(source)
        self._batch_order = getattr(source, "batch_order", None)
        if self._batch_order is not None and not callable(self._batch_order):
            self._batch_order = None
        self._orders: dict[int, Any] = {}  # per recent epoch: the shard's order (or batches)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"an epoch has no batches on shard {shard_index} of {shard_count}: the source "
                f"has {self._source_len} records and batch_size={batch_size}"
                f"{' with drop_remainder=True' if drop_remainder else ''}. Use a smaller "
                "batch_size, fewer shards, or drop_remainder=False."
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches one epoch yields on this shard (the same for every epoch)."""
        if self._batch_order is not None:
            return len(self._source_batches(0))
        lo, hi = _split(self._source_len, self.shard_index, self.shard_count, self.drop_remainder)
        n = hi - lo
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def batch(self, epoch: int, number: int) -> Batch:
        """Batch ``number`` of ``epoch`` on this shard (computed from the epoch's order)."""
        if self._batch_order is not None:
            return self._source_batches(epoch)[number]
        order, lo = self._shard_order(epoch)
        start = number * self.batch_size
        if not 0 <= number < self.batches_per_epoch:
            raise IndexError(f"batch {number} of an epoch with {self.batches_per_epoch} batches")
        return Batch(epoch, number, order[start : start + self.batch_size], lo + start)

    def epoch(self, epoch: int) -> list[Batch]:
        """All batches of ``epoch`` on this shard."""
        return [self.batch(epoch, k) for k in range(self.batches_per_epoch)]

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, int]:
        """This shard's records of ``epoch`` in order, and the global position of the first.

        Only the order array is kept (8 bytes a record), for the two most recent epochs: the
        loader's look-ahead straddles an epoch boundary.
        """
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        n = self._source_len
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        lo, hi = _split(n, self.shard_index, self.shard_count, self.drop_remainder)
        if self.drop_remainder:
            hi = lo + (hi - lo) // self.batch_size * self.batch_size
        cached = (order[lo:hi], lo)
        self._orders = {e: v for e, v in self._orders.items() if e == epoch - 1}
        self._orders[epoch] = cached
        return cached

    def _source_batches(self, epoch: int) -> list[Batch]:
        cached = self._orders.get(epoch)
        if cached is not None:
            return cached
        assert self._batch_order is not None
        bs = self.batch_size
        raw = self._batch_order(seed=self.seed, epoch=epoch, batch_size=bs)
        batches = [np.asarray(b, dtype=np.int64).reshape(-1) for b in raw]
        for k, b in enumerate(batches):
            if len(b) > bs:
                raise ValueError(
                    f"batch_order() returned batch {k} of epoch {epoch} with {len(b)} indices; "
                    f"batch_size is {bs}. Return batches of at most batch_size indices."
                )
        numbered = list(enumerate(batches))
        if self.drop_remainder:  # drop short batches first, so every shard gets as many
            numbered = [(g, b) for g, b in numbered if len(b) == bs]
        lo, hi = _split(len(numbered), self.shard_index, self.shard_count, self.drop_remainder)
        result = [Batch(epoch, k, b, g * bs) for k, (g, b) in enumerate(numbered[lo:hi])]
        self._orders = {e: v for e, v in self._orders.items() if e == epoch - 1}
        self._orders[epoch] = result
        return result
