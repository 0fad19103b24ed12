"""Leases: which ring slots are free, which the caller holds, and when to copy out instead.

A slot handed out as numpy views is leased until the last array viewing it dies. NumPy
collapses chains of views only through arrays, and the base array's own base is the mmap,
so every view of the batch (a slice, a ``jax.Array`` aliasing it, a torch tensor from
DLPack) keeps that base array alive; a finalizer on it ends the lease. The finalizer runs in
whichever thread drops the last reference, and at any allocation of that thread (a garbage
collection that frees a batch in a reference cycle), so it takes no lock: it appends to a
deque (atomic), which the loader's thread drains in :meth:`Leases.reclaim`.
"""

from __future__ import annotations

import collections
import weakref

import numpy as np

from agnostic_prefetch._layout import Layout
from agnostic_prefetch._ring import Ring


class Leases:
    """Free slots and slots the caller holds.

    Args:
        slots: slots in the ring.
        max_leased: slots the caller may hold before batches are copied out; the rest stay
            for the workers, so they never starve however many batches the caller keeps.
    """

    def __init__(self, slots: int, max_leased: int) -> None:
        self.free = list(range(slots - 1, -1, -1))
        self.leased: set[int] = set()
        self.max_leased = max_leased
        self._released: collections.deque[int] = collections.deque()

    def release(self, slot: int) -> None:
        """End a lease (called by a finalizer, from any thread; takes no lock)."""
        self._released.append(slot)

    def reclaim(self) -> None:
        """Return released slots to the free list (the loader's thread only)."""
        while self._released:
            slot = self._released.popleft()
            self.leased.discard(slot)
            self.free.append(slot)

    def hand_out(self, ring: Ring, layout: Layout, slot: int, count: int) -> tuple[list[np.ndarray], bool]:
        """The array leaves of the batch in ``slot``, and whether they were copied out.

        Views of the slot (leasing it) while the caller holds fewer than ``max_leased``
        slots; otherwise copies, and the slot is free again at once.
        """
        base = ring.slot_array(slot)
        views = [
            base[a.offset : a.offset + a.item_bytes * count].view(a.dtype).reshape((count, *a.shape))
            for a in layout.arrays
        ]
        if len(self.leased) >= self.max_leased:
            copies = [v.copy() for v in views]
            self.free.append(slot)
            return copies, True
        self.leased.add(slot)
        weakref.finalize(base, self.release, slot)
        return views, False
