"""The Loader's options that depend on each other (batch sizes, the remainder rule, per-batch
shapes), and the example its ring is laid out from.

Each check names the numbers and the remedy; nothing here touches the ring or the workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import item_rng

__all__ = ["check_shapes", "check_values", "let_go", "local_batch_size", "read_example", "remainder_of"]


def check_values(*, on_error: str, workers: Any, epochs: int | None, timeout: float | None,
                 log_every: float | None) -> None:
    """The options that stand alone."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if workers != "auto" and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
    if log_every is not None and not log_every > 0:
        raise ValueError(f"log_every must be positive seconds or None, got {log_every}")


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


def read_example(sampler: Any, source: Any, transform: Any, skip: bool) -> Any:
    """The first example of global batch 0 that reads, transformed: what the ring's layout
    is made from (from the whole global batch: this shard's slice of it may be padding)."""
    try:
        errors = []
        for position, index in enumerate(sampler.global_batch(0, 0).tolist()):
            try:
                example = source[index]
                if transform is not None:
                    example = transform(example, item_rng(sampler.seed, 0, position))
                return example
            except Exception as exc:
                if not skip:
                    raise LoaderError(
                        f"reading record {index} in the parent to lay out the ring failed: "
                        f"{type(exc).__name__}: {exc}. Fix the record, pass on_error='skip', or "
                        "give spec= explicitly."
                    ) from exc
                errors.append(f"record {index}: {exc}")
        raise LoaderError("every record of the first batch failed; cannot lay out the ring:\n" + "\n".join(errors))
    finally:
        let_go(source)
