"""The slot table: the state of every ring slot, owned in one place and testable without processes.

Each slot is in exactly one state::

    free --order--> ordered --filled--> ready --hand_out--> leased --(last view dies)--> free
                       |                  |        \\--(copied out)--> free
                       +----discard-------+-----------------------------> free

A slot handed out as numpy views is *leased* until the last array viewing it dies. NumPy
collapses chains of views only through arrays, and the base array's own base is the mmap, so
every view of the batch (a slice, a ``jax.Array`` aliasing it, a torch tensor from DLPack)
keeps that base array alive; a finalizer on it ends the lease. The finalizer runs in whichever
thread drops the last reference, and at any allocation of that thread (a garbage collection
that frees a batch in a reference cycle), so it takes no lock: it appends to a deque (atomic),
which the loader's driving thread drains in :meth:`SlotTable.reclaim`.

If the consumer already holds ``max_held`` slots, a batch is copied out instead and its slot
is free again at once: the workers always keep a slot to fill. The table counts how many
batches the consumer held at once (leased, and copied out and still alive: ``peak``), so
that a copy-out can name the ``slots=`` that would have kept every batch in the ring.
"""

from __future__ import annotations

import collections
import weakref

import numpy as np

from agnostic_prefetch._layout import Layout
from agnostic_prefetch._ring import Ring

FREE, ORDERED, READY, LEASED = "free", "ordered", "ready", "leased"


class SlotStateError(AssertionError):
    """A transition from the wrong state: a bug in the loader, never a user error."""


class SlotTable:
    """Free, ordered, ready and leased slots of one ring.

    Args:
        slots: slots in the ring.
        max_held: slots the consumer may lease before batches are copied out instead.

    Example:
        >>> table = SlotTable(3, max_held=2)
        >>> slot = table.order()
        >>> table.filled(slot); table.discard(slot)
        >>> table.counts()
        {'free': 3, 'ordered': 0, 'ready': 0, 'leased': 0}
    """

    def __init__(self, slots: int, max_held: int) -> None:
        self.max_held = max_held
        self._state = [FREE] * slots
        self._free = list(range(slots - 1, -1, -1))  # a stack: the lowest slot goes out first
        self._leased = 0
        self._released: collections.deque[int] = collections.deque()
        self._copies = 0  # batches copied out and still alive
        self._copies_released: collections.deque[int] = collections.deque()
        self.peak = 0  # the most batches the consumer held at once, the one handed out included

    def __len__(self) -> int:
        return len(self._state)

    @property
    def free(self) -> int:
        """Slots free now (released leases count once reclaimed)."""
        return len(self._free)

    @property
    def leased(self) -> int:
        return self._leased

    @property
    def slots_needed(self) -> int:
        """The ``slots=`` with which no batch handed out so far would have been copied out:
        the consumer's peak, plus the slots kept for the workers."""
        return self.peak + len(self._state) - self.max_held

    def state(self, slot: int) -> str:
        return self._state[slot]

    def counts(self) -> dict[str, int]:
        """Slots per state; they always add up to ``len(self)``."""
        counts = dict.fromkeys((FREE, ORDERED, READY, LEASED), 0)
        for s in self._state:
            counts[s] += 1
        return counts

    def order(self) -> int:
        """Take a free slot for a worker to fill (the caller checks :attr:`free` first)."""
        slot = self._free.pop()
        self._state[slot] = ORDERED
        return slot

    def filled(self, slot: int) -> None:
        """A worker reported the slot's batch complete."""
        self._move(slot, ORDERED, READY)

    def discard(self, slot: int) -> None:
        """Free an ordered or ready slot whose batch nobody will take (stale, failed, all skipped)."""
        state = self._state[slot]
        if state is not ORDERED and state is not READY:
            raise SlotStateError(f"slot {slot} is {state}; only an ordered or ready slot can be discarded")
        self._state[slot] = FREE
        self._free.append(slot)

    def hand_out(self, ring: Ring, layout: Layout, slot: int, count: int,
                 shapes: list[tuple[int, ...]] | None = None) -> tuple[list[np.ndarray], bool]:
        """The array leaves of the ready batch in ``slot``, and whether they were copied out.

        Views of the slot (leasing it) while the consumer holds fewer than ``max_held``
        slots; otherwise copies, and the slot is free again at once. ``shapes`` are the
        batch's item shapes where they vary per batch (the layout's otherwise).
        """
        base = ring.slot_array(slot)
        if shapes is None:
            views = [
                base[a.offset : a.offset + a.item_bytes * count].view(a.dtype).reshape((count, *a.shape))
                for a in layout.arrays
            ]
        else:
            views = [
                base[a.offset : a.offset + a.dtype.itemsize * count * int(np.prod(shape, dtype=np.int64))]
                .view(a.dtype).reshape((count, *shape))
                for a, shape in zip(layout.arrays, shapes, strict=True)
            ]
        held = self._leased + self._copies + 1
        if held > self.peak:
            self.peak = held
        if self._leased >= self.max_held:
            copies = [v.copy() for v in views]
            self._move(slot, READY, FREE)
            self._free.append(slot)
            if copies:  # the batch is held while its first leaf lives (they go together)
                self._copies += 1
                weakref.finalize(copies[0], self._copies_released.append, 1)
            return copies, True
        self._move(slot, READY, LEASED)
        self._leased += 1
        weakref.finalize(base, self._released.append, slot)
        return views, False

    def reclaim(self) -> None:
        """Free the slots whose last view died (the driving thread only)."""
        while self._copies_released:
            self._copies -= self._copies_released.popleft()
        released = self._released
        while released:
            slot = released.popleft()
            self._move(slot, LEASED, FREE)
            self._leased -= 1
            self._free.append(slot)

    def discard_unleased(self) -> None:
        """Free every ordered and ready slot (at shutdown: no worker fills them any more)."""
        for slot, state in enumerate(self._state):
            if state is ORDERED or state is READY:
                self.discard(slot)

    def _move(self, slot: int, old: str, new: str) -> None:
        if self._state[slot] is not old:
            raise SlotStateError(f"slot {slot} is {self._state[slot]}, not {old}: cannot make it {new}")
        self._state[slot] = new
