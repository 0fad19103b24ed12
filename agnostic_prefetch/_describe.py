"""How a loader describes itself: ``repr(loader)``, with its shard, its pool and its memory bill."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agnostic_prefetch.loader import Loader


def describe(loader: Loader) -> str:
    """The loader's ``repr``: batches, shard, workers, and the ring's bytes (slots and counters)."""
    ring, layout, tuner = loader._ring, loader.layout, loader._tuner
    pool = tuner.summary() if tuner is not None else f"workers={loader.workers}, backend={loader.backend!r}"
    return (
        f"Loader(batch_size={loader.batch_size}, batches_per_epoch={loader.batches_per_epoch}, "
        f"{_shard(loader)}{pool}, ring={loader.slots} slots x {layout.slot_bytes:,} B + "
        f"{ring.nbytes - ring.extra_offset:,} B of counters = {ring.nbytes:,} B [{layout.describe()}]"
        f"{', closed' if loader.closed else ''})"
    )


def _shard(loader: Loader) -> str:
    sampler = loader._sampler
    parts = []
    if sampler.shard_count > 1:
        parts.append(f"shard {sampler.shard_index} of {sampler.shard_count} of global batches of "
                     f"{sampler.global_batch_size}")
    if sampler.remainder != "short":
        parts.append(f"remainder={sampler.remainder!r}")
    return "".join(f"{p}, " for p in parts)
