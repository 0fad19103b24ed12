"""The one test hook: what the tests check inside a loader or prefetcher, and users never need.

Tests specify behaviour through the public API wherever it shows (batches, ``stats()``,
``state_dict()``, ``repr``, the process table, ``/proc/self/maps``). A few guarantees live
below it: that a batch is a view of *this* ring's mapping, how many orders a worker holds
at once, what state each slot is in, which placement a stage runs. :func:`internals` is how
a test reads those, in one place, instead of reaching into private attributes; it is not
API and may change with the internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Internals", "internals"]


@dataclass(frozen=True)
class Internals:
    """A read-only look inside a loader (``placement`` is ``None``) or a prefetcher (only
    ``placement``)."""

    ring: Any = None  # _ring.Ring
    table: Any = None  # _slots.SlotTable
    workers: tuple[Any, ...] = ()  # _pool.Worker handles serving now
    trace_level: int = 0  # what the workers are asked to send (_accounts.TRACE_*)
    placement: Any = None  # the prefetcher's placement


def internals(obj: Any) -> Internals:
    """What :class:`Internals` shows of a ``Loader``, ``LoaderIterator`` or ``Prefetcher``."""
    from agnostic_prefetch.loader import Loader, LoaderIterator
    from agnostic_prefetch.prefetch import Prefetcher

    if isinstance(obj, Prefetcher):
        return Internals(placement=obj._placement)
    if isinstance(obj, Loader | LoaderIterator):
        scheduler = obj._core.scheduler
        level = int(scheduler.board.trace_level())
        return Internals(ring=scheduler.ring, table=scheduler.table, workers=tuple(scheduler.members.serving),
                         trace_level=level)
    raise TypeError(f"internals() takes a Loader, LoaderIterator or Prefetcher, not {type(obj).__name__}")
