"""Ring sizing: how many slots, how many the consumer may hold, how many orders a worker holds.

Deadlock freedom rests on one rule: the consumer may hold at most ``max_held`` slots (further
batches are copied out instead), so at least one slot per worker stays for the workers, and
because orders go out lowest batch first, the next batch the consumer needs is always ready,
being filled, or first in line for the next free slot.
"""

from __future__ import annotations

from typing import NamedTuple

# Slots this small get more of them: the per-batch cost is then the pipe write, and several
# orders per write amortise it.
SMALL_SLOT_BYTES = 64 << 10
# Batches a consumer holds at its peak by default: a training loop behind one of the prefetch
# stages at its default size (``Prefetcher.held_at_peak(2)`` is 5: see prefetch.py), plus one
# spare. A stage that needs more says so, naming the slots= to pass.
CONSUMER_HOLDS = 6


class RingPlan(NamedTuple):
    """What :func:`plan_ring` decided."""

    slots: int
    max_held: int  # batches the consumer may hold before further ones are copied out
    orders_per_worker: int  # orders a worker holds at once (one filling, the rest queued)


def plan_ring(workers: int, slot_bytes: int, slots: int | None = None,
              consumer_holds: int = CONSUMER_HOLDS) -> RingPlan:
    """Size the ring for ``workers`` and a consumer that holds ``consumer_holds`` batches.

    Args:
        workers: worker count (0: the consumer fills batches itself).
        slot_bytes: bytes of one slot.
        slots: an explicit slot count, or ``None`` for the default: one per worker (eight
            when slots are small, so each worker can take several orders per pipe write)
            plus ``consumer_holds``.
        consumer_holds: batches the consumer holds at its peak.

    Raises:
        ValueError: ``slots`` too few for the workers, naming the minimum.
    """
    if slots is None:
        per_worker = 8 if slot_bytes <= SMALL_SLOT_BYTES else 1
        slots = workers * per_worker + consumer_holds
    slots = int(slots)
    least = max(2, workers + 1)
    if slots < least:
        raise ValueError(
            f"slots={slots} is too few for {workers} workers: need at least {least} (one per "
            "worker plus one for the batch you hold)."
        )
    kept_for_workers = max(1, min(workers, slots - 1))
    per_worker = max(2, min(8, (slots - consumer_holds) // max(1, workers)))
    return RingPlan(slots, slots - kept_for_workers, per_worker)
