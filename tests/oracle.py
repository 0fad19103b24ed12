"""An independent oracle for the loader's order, written from the documented rules only."""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def shard_batches(n, batch_size, *, shuffle=False, seed=0, epoch=0, drop_remainder=False,
                  shard_index=0, shard_count=1) -> list[list[int]]:
    """Batches of record indices for one shard and epoch."""
    order = epoch_order(n, shuffle, seed, epoch)
    if drop_remainder:
        per = n // shard_count
        part = order[shard_index * per:(shard_index + 1) * per]
    else:
        part = order[shard_index * n // shard_count:(shard_index + 1) * n // shard_count]
    batches = []
    for start in range(0, len(part), batch_size):
        chunk = part[start:start + batch_size]
        if drop_remainder and len(chunk) < batch_size:
            break
        batches.append(chunk)
    return batches
