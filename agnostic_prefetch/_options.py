"""The Loader's options that depend on each other: batch sizes, the remainder rule, per-batch shapes.

Each check names the numbers and the remedy; nothing here touches the ring or the workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_shapes", "let_go", "local_batch_size", "remainder_of"]


def local_batch_size(batch_size: int | None, global_batch_size: int | None, shard_count: int) -> int:
    if batch_size is None and global_batch_size is None:
        raise ValueError("pass batch_size= (per shard) or global_batch_size= (over all shards)")
    if batch_size is not None and global_batch_size is not None and batch_size * shard_count != global_batch_size:
        raise ValueError(
            f"batch_size={batch_size} x shard_count={shard_count} is not global_batch_size="
            f"{global_batch_size}; pass one of them")
    if batch_size is not None:
        return batch_size
    assert global_batch_size is not None
    if not isinstance(global_batch_size, int | np.integer) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if shard_count < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not split into shard_count={shard_count} "
            "equal slices; use a global batch that is a multiple of the shard count")
    return int(global_batch_size) // shard_count


def remainder_of(remainder: str | None, drop_remainder: bool, on_error: str, shard_count: int) -> str:
    if drop_remainder and remainder not in (None, "drop"):
        raise ValueError(f"drop_remainder=True contradicts remainder={remainder!r}; pass one of them")
    chosen = "drop" if drop_remainder else (remainder or "short")
    if on_error == "skip" and shard_count > 1 and chosen != "pad":
        raise ValueError(
            f"on_error='skip' with shard_count={shard_count} needs remainder='pad': a skipped "
            "record would make this shard's batch shorter than the other shards' (and an "
            "all-skipped batch would change its step count), so the processes would feed "
            "different shapes. Padding keeps every batch full and marks real rows in a mask.")
    return chosen


def let_go(source: Any) -> None:
    """Release what reading the layout example opened in this process (an LMDB environment:
    py-lmdb allows one per path, and the user may open the database too), for a source that
    offers ``release()`` (it reopens lazily if read here again; see ``MapSource``)."""
    release = getattr(source, "release", None)
    if callable(release):
        release()


def check_shapes(shapes: str, spec: Any, shard_count: int, remainder: str) -> None:
    if shapes not in ("fixed", "per_batch"):
        raise ValueError(f"shapes must be 'fixed' or 'per_batch', got {shapes!r}")
    if shapes == "fixed":
        return
    if spec is None:
        raise ValueError(
            "shapes='per_batch' sizes the ring's slots for the largest item: give spec= with "
            "each leaf's largest shape (the source is never scanned for it)")
    if shard_count > 1:
        raise ValueError(
            f"shapes='per_batch' with shard_count={shard_count}: every process must feed the "
            "same shape every step; crop or resize to one size instead")
    if remainder == "pad":
        raise ValueError("shapes='per_batch' cannot pad batches (their shapes vary); use remainder='short'")
