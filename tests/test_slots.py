"""The slot table: every slot in exactly one state, legal transitions only, nothing leaked."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch._layout import layout_from_example
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._slots import FREE, LEASED, ORDERED, READY, SlotStateError, SlotTable
from agnostic_prefetch._testing import internals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = layout_from_example({"x": np.zeros(4, np.float32)}, 2)


@pytest.fixture
def ring():
    ring = Ring(4, LAYOUT.slot_bytes)
    yield ring
    gc.collect()
    ring.close()


def test_a_slot_goes_free_ordered_ready_leased_and_back_to_free_when_its_views_die(ring):
    table = SlotTable(4, max_held=3)
    slot = table.order()
    assert table.state(slot) == ORDERED
    table.filled(slot)
    assert table.state(slot) == READY
    arrays, copied = table.hand_out(ring, LAYOUT, slot, 2)
    assert not copied and table.state(slot) == LEASED and table.leased == 1
    view = arrays[0][1:]
    del arrays
    gc.collect()
    table.reclaim()
    assert table.state(slot) == LEASED  # a view of a view still holds the slot
    del view
    gc.collect()
    table.reclaim()
    assert table.state(slot) == FREE and table.leased == 0


def test_the_lowest_free_slot_goes_out_first():
    table = SlotTable(3, max_held=2)
    assert [table.order(), table.order(), table.order()] == [0, 1, 2]


def test_past_max_held_a_batch_is_copied_out_and_its_slot_is_free_at_once(ring):
    table = SlotTable(4, max_held=1)
    first, second = table.order(), table.order()
    table.filled(first), table.filled(second)
    held, copied = table.hand_out(ring, LAYOUT, first, 2)
    assert not copied
    copies, copied = table.hand_out(ring, LAYOUT, second, 2)
    assert copied and table.state(second) == FREE
    assert not np.shares_memory(copies[0], np.frombuffer(ring.map, np.uint8))
    del held


@pytest.mark.parametrize("move", ["filled", "discard", "hand_out"])
def test_a_transition_from_the_wrong_state_is_refused(ring, move):
    table = SlotTable(2, max_held=1)
    with pytest.raises(SlotStateError, match="slot 0 is free"):
        if move == "hand_out":
            table.hand_out(ring, LAYOUT, 0, 2)
        else:
            getattr(table, move)(0)


def test_a_lease_may_end_in_any_thread_and_is_reclaimed_by_the_driver(ring):
    table = SlotTable(4, max_held=3)
    slot = table.order()
    table.filled(slot)
    arrays, _ = table.hand_out(ring, LAYOUT, slot, 2)
    box = [arrays]
    del arrays
    dropper = threading.Thread(target=box.clear)  # the last reference dies in another thread
    dropper.start()
    dropper.join()
    gc.collect()
    assert table.state(slot) == LEASED  # not until the driving thread reclaims
    table.reclaim()
    assert table.state(slot) == FREE


class SlotTableMachine(RuleBasedStateMachine):
    """Random sequences of the scheduler's and the consumer's moves."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = 5
        self.ring = Ring(self.slots, LAYOUT.slot_bytes)
        self.table = SlotTable(self.slots, max_held=3)
        self.ordered: list[int] = []
        self.ready: list[int] = []
        self.held: list[list[np.ndarray]] = []

    @precondition(lambda self: self.table.free > 0)
    @rule()
    def order(self):
        self.ordered.append(self.table.order())

    @precondition(lambda self: self.ordered)
    @rule(data=st.data())
    def fill(self, data):
        slot = self.ordered.pop(data.draw(st.integers(0, len(self.ordered) - 1)))
        self.table.filled(slot)
        self.ready.append(slot)

    @precondition(lambda self: self.ordered or self.ready)
    @rule(data=st.data(), from_ready=st.booleans())
    def discard(self, data, from_ready):
        pool = self.ready if (from_ready and self.ready) or not self.ordered else self.ordered
        self.table.discard(pool.pop(data.draw(st.integers(0, len(pool) - 1))))

    @precondition(lambda self: self.ready)
    @rule()
    def hand_out(self):
        leased_before = self.table.leased
        arrays, copied = self.table.hand_out(self.ring, LAYOUT, self.ready.pop(0), 2)
        assert copied == (leased_before >= self.table.max_held)  # the copy-out rule
        self.held.append(arrays)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def drop(self, data):
        self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))  # no cycles: freed at once

    @rule()
    def reclaim(self):
        self.table.reclaim()

    @invariant()
    def no_slot_in_two_states_and_every_slot_accounted_for(self):
        counts = self.table.counts()
        assert sum(counts.values()) == self.slots
        assert counts[ORDERED] == len(self.ordered) and counts[READY] == len(self.ready)
        assert counts[FREE] >= self.table.free  # released leases wait for reclaim()
        assert len(set(self.ordered) | set(self.ready)) == len(self.ordered) + len(self.ready)
        assert self.table.leased <= self.table.max_held

    def teardown(self):
        # Shutdown: nothing in flight any more, every view gone: nothing may stay leased.
        self.table.discard_unleased()
        self.held.clear()
        gc.collect()
        self.table.reclaim()
        assert self.table.counts() == {FREE: self.slots, ORDERED: 0, READY: 0, LEASED: 0}
        assert self.table.free == self.slots
        self.ring.close()
        assert self.ring.map.closed


TestSlotTableMachine = SlotTableMachine.TestCase
TestSlotTableMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def ring_mappings() -> int:
    """Mappings of loader rings in this process (memfd-backed rings are named in the maps)."""
    with open("/proc/self/maps") as f:
        return sum("agnostic_prefetch" in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workers=st.integers(0, 2), stop=st.integers(0, 12), keep=st.sets(st.integers(0, 11), max_size=4))
def test_after_close_and_the_last_view_nothing_of_the_ring_is_left(workers, stop, keep):
    gc.collect()
    before = ring_mappings()
    loader = ap.Loader(Counting(24), 2, workers=workers, backend="thread", slots=workers + 3)
    held = []
    for k, batch in enumerate(loader):
        if k in keep:
            held.append(batch)
        if k == stop:
            break
    loader.close()
    counts = internals(loader).table.counts()
    assert counts["ordered"] == counts["ready"] == 0 and counts["leased"] <= len(held) + 1
    assert ring_mappings() == before + 1  # the caller's views keep the ring mapped
    del batch
    held.clear()
    gc.collect()
    assert ring_mappings() == before  # no slot view, no writer, no header view keeps it


_LEASE_DEADLOCK = """
import gc, sys
import numpy as np
import agnostic_prefetch as ap
k = int(sys.argv[1])
loader = ap.Loader(ap.ArraySource({"x": np.arange(64.0)}), 4, workers=0)
it = iter(loader)
b = next(it)                      # leases ring slot 0
gc.collect()
gc.set_threshold(k)               # only places the next collection deterministically
holder = {"batch": b}
holder["self"] = holder           # the caller left the batch in a reference cycle
del b, holder
next(it)                          # reclaim() allocates while it drains released leases
print("ok")
"""


def test_a_garbage_collection_inside_reclaim_that_frees_a_batch_does_not_deadlock():
    env = dict(os.environ, PYTHONPATH=REPO)
    hung = []
    for k in range(1, 17):  # some collection point lands inside the bookkeeping
        try:
            proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_LEASE_DEADLOCK), str(k)],
                                  env=env, cwd=REPO, capture_output=True, text=True, timeout=10)
            assert proc.returncode == 0, proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            hung.append(k)
    assert not hung, f"deadlocked with gc threshold {hung}"
