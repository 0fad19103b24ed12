"""How a loader describes itself: ``repr(loader)``, with its shard, its pool and its memory bill."""

from __future__ import annotations

from agnostic_prefetch._core import LoaderCore


def describe(core: LoaderCore) -> str:
    """The loader's ``repr``: batches, shard, workers, and the ring's bytes (slots and counters)."""
    ring, layout, tuner, members = core.scheduler.ring, core.layout, core.tuner, core.scheduler.members
    pool = tuner.summary() if tuner is not None else f"workers={members.count}, backend={members.backend!r}"
    batching = getattr(core.sampler, "batching", None)
    bound = "at most " if core.ends_early else ""
    stream = getattr(core.sampler, "stream", None)
    epoch = f"stream={stream!r}" if stream is not None else f"batches_per_epoch={bound}{core.bpe}"
    return (
        f"Loader(batch_size={core.sampler.batch_size}, {epoch}, "
        f"{f'batching={batching!r}, ' if batching is not None else ''}"
        f"{_shard(core)}{pool}, ring={ring.slots} slots x {layout.slot_bytes:,} B + "
        f"{ring.nbytes - ring.extra_offset:,} B of counters = {ring.nbytes:,} B [{layout.describe()}]"
        f"{', closed' if core.closed else ''})"
    )


def _shard(core: LoaderCore) -> str:
    sampler = core.sampler
    parts = []
    if sampler.shard_count > 1:
        parts.append(f"shard {sampler.shard_index} of {sampler.shard_count} of global batches of "
                     f"{sampler.global_batch_size}")
    if sampler.remainder != "short":
        parts.append(f"remainder={sampler.remainder!r}")
    return "".join(f"{p}, " for p in parts)
