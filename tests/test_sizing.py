"""Ring sizing: one function decides the slots, what the consumer may hold, and orders per worker."""

from __future__ import annotations

import pytest

from agnostic_prefetch._sizing import CONSUMER_HOLDS, SMALL_SLOT_BYTES, plan_ring
from agnostic_prefetch.prefetch import Prefetcher


def test_the_default_is_one_slot_per_worker_plus_what_the_consumer_holds():
    plan = plan_ring(workers=2, slot_bytes=SMALL_SLOT_BYTES + 4096)
    assert plan.slots == 2 + CONSUMER_HOLDS
    assert plan.max_held == CONSUMER_HOLDS  # one slot per worker stays for the workers
    assert plan.orders_per_worker == 2  # one filling, one queued


def test_small_slots_give_each_worker_eight_so_it_takes_several_orders_per_write():
    plan = plan_ring(workers=2, slot_bytes=SMALL_SLOT_BYTES)
    assert plan.slots == 2 * 8 + CONSUMER_HOLDS and plan.orders_per_worker == 8


def test_the_consumer_holding_more_gets_more_slots():
    assert plan_ring(1, 1 << 20, consumer_holds=9).slots == 10


def test_workers_zero_keeps_one_slot_free_for_the_batch_being_filled():
    plan = plan_ring(workers=0, slot_bytes=1 << 20)
    assert plan.slots == CONSUMER_HOLDS and plan.max_held == CONSUMER_HOLDS - 1


@pytest.mark.parametrize("workers,slots", [(2, 2), (3, 3), (0, 1)])
def test_too_few_slots_is_an_error_naming_the_minimum(workers, slots):
    with pytest.raises(ValueError, match=rf"slots={slots} is too few for {workers} workers: need at least {max(2, workers + 1)}"):
        plan_ring(workers, 4096, slots)


def test_an_explicit_ring_always_leaves_the_workers_a_slot():
    for workers in range(5):
        for slots in range(max(2, workers + 1), 12):
            plan = plan_ring(workers, 4096, slots)
            assert 1 <= plan.max_held <= slots - 1 and plan.max_held >= slots - max(1, workers)


def test_the_default_consumer_covers_a_prefetch_stage_of_the_default_size():
    assert CONSUMER_HOLDS >= Prefetcher.held_at_peak(2, thread=True)
