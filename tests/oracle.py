"""An independent oracle for the loader's order, written from the documented rules only."""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def global_batches(n, global_batch, *, shuffle=False, seed=0, epoch=0, drop_remainder=False):
    """The epoch's global batches of record indices (the same for every shard count)."""
    order = epoch_order(n, shuffle, seed, epoch)
    batches = [order[start:start + global_batch] for start in range(0, n, global_batch)]
    if drop_remainder and batches and len(batches[-1]) < global_batch:
        batches.pop()
    return batches


def shard_batches(n, batch_size, *, shuffle=False, seed=0, epoch=0, drop_remainder=False,
                  shard_index=0, shard_count=1) -> list[list[int]]:
    """One shard's real rows of every global batch of one epoch (padding left out)."""
    lo = shard_index * batch_size
    return [b[lo:lo + batch_size] for b in global_batches(
        n, batch_size * shard_count, shuffle=shuffle, seed=seed, epoch=epoch,
        drop_remainder=drop_remainder)]


def real_rows(batch, key="i"):
    """The rows of a batch that are not padding (all of them without a mask)."""
    values = batch[key]
    if "mask" in batch:
        values = values[np.asarray(batch["mask"])]
    return values.tolist()
