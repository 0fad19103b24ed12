"""The loader iterator: it owns its position, takes its batches from the scheduler, hands out views.

``iter(loader)`` returns one. It is the stateful object (like Grain's iterators): its
``state_dict()`` is the position after the batches *it* delivered, so a stage that reads
ahead asks the iterator it reads, after each batch, and gets an exact answer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from agnostic_prefetch._resume import ENDLESS, Position, decode, encode
from agnostic_prefetch._schedule import Ready, Scheduler
from agnostic_prefetch._tree import unflatten
from agnostic_prefetch.errors import LoaderError

if TYPE_CHECKING:
    from agnostic_prefetch.loader import Loader

log = logging.getLogger("agnostic_prefetch")

_CLOSED = "this Loader is closed; build a new one (load_state_dict resumes exactly)"


class LoaderIterator:
    """What ``iter(loader)`` returns: the batches of one iteration, and its position.

    It ends (``StopIteration``) at the end of its iteration, when :meth:`cancel` is called
    from any thread (a ``next()`` waiting for a worker wakes at once), or when the loader
    starts another iteration (a second ``iter()``, ``load_state_dict``). A cancelled
    iterator takes no further batch, so none is lost: the next iteration starts where this
    one stopped.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> with ap.Loader(ap.ArraySource({"x": np.arange(6)}), 2, workers=0) as loader:
        ...     it = iter(loader)
        ...     first = next(it)["x"].tolist()
        ...     it.state_dict()["batch"], first
        (1, [0, 1])
    """

    def __init__(self, loader: Loader, scheduler: Scheduler, position: Position) -> None:
        self._loader = loader  # kept alive while this iterator is: `for b in Loader(...)`
        self._scheduler = scheduler
        self._position = position
        assert position.end is not None
        self._end = position.end
        self._ended = False
        self._ordered = loader.ordered
        self._layout = loader.layout
        self._stats = loader._stats
        self._only_arrays = "object" not in self._layout.kinds
        self._padded = loader._mask_key is not None  # every batch full; a mask marks real rows
        self._by_source = loader._by_source
        self._snapshots = loader._snapshots

    def __iter__(self) -> LoaderIterator:
        return self

    def __len__(self) -> int:
        """Batches this iteration has yet to deliver."""
        if self._end >= ENDLESS:
            raise TypeError("an iteration of a Loader with epochs=None never ends and has no length")
        return 0 if self._ended else self._position.remaining(self._end)

    @property
    def max_held(self) -> int:
        """Batches a consumer may hold at once before further ones are copied out of the ring."""
        return self._scheduler.table.max_held

    @property
    def slots(self) -> int:
        """Slots in the loader's ring."""
        return len(self._scheduler.table)

    @property
    def interruptible(self) -> bool:
        """Whether :meth:`cancel` ends a ``next()`` in progress at once (not with ``workers=0``,
        where that ``next()`` runs the source itself)."""
        return self._loader.workers > 0

    def stats(self) -> dict[str, Any]:
        """Its loader's :meth:`~agnostic_prefetch.Loader.stats`."""
        return self._loader.stats()

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches this iterator delivered: small and JSON-able."""
        return encode(self._position, self._loader._settings, endless=self._end >= ENDLESS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue *this* iterator from ``state`` (see ``Loader.load_state_dict``); the
        loader's other live iterator, if any, ends. Not while another thread iterates it."""
        self._loader._begin(self, decode(state, self._loader._settings))

    def _restart(self, position: Position) -> None:
        assert position.end is not None
        self._position, self._end, self._ended = position, position.end, False

    def cancel(self) -> None:
        """End this iterator from any thread; a ``next()`` waiting for a worker wakes at once."""
        if not self._ended:
            self._ended = True
            self._scheduler.supervisor.wake()

    def close(self) -> None:
        """End this iterator (like a generator's ``close()``)."""
        self.cancel()

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        scheduler = self._scheduler
        started = time.perf_counter()
        scheduler.drive.acquire()
        try:
            scheduler.driver = threading.get_ident()
            batch = self._next_batch(scheduler)
        except LoaderError:
            if not scheduler.closed:  # a failed pipeline stops with its error, at once
                self._loader._close(grace=0.0)
            raise
        finally:
            now = time.perf_counter()
            self._stats["wait_s"] += now - started
            scheduler.drive.release()
            scheduler.left()
        tracer = self._loader._tracer
        if tracer is not None:
            tracer.span("next", started, now)
        if now >= self._snapshots.next_at:
            self._snapshots.tick(now)
        return batch

    def _next_batch(self, scheduler: Scheduler) -> Any:
        while True:
            if scheduler.closed:
                raise LoaderError(_CLOSED)
            if self._ended:
                raise StopIteration
            position = self._position
            if position.next_seq >= self._end:
                self._position = position._replace(end=None)  # no iteration in progress
                self._ended = True
                raise StopIteration
            # Top the workers up first, even when a batch is ready: otherwise they idle while
            # the caller drains ready batches, and the caller then waits a whole fill.
            scheduler.dispatch(position, self._end)
            found = scheduler.take(position, self._end, self._ordered)
            if found is None:
                scheduler.wait()
                continue
            seq, ready = found
            self._position = position.after(seq)
            for index, reason in ready.skipped:
                log.warning("skipped record %d (on_error='skip'): %s", index, reason)
            self._stats["skipped"] += len(ready.skipped)
            if ready.count == 0 and not self._padded:  # every record of this batch was skipped
                scheduler.table.discard(ready.slot)
                continue
            self._stats["batches"] += 1
            self._stats["items"] += ready.count
            if self._by_source is not None:
                self._count_by_source(ready)
            rows = ready.count
            if self._padded:
                rows = self._layout.batch_size
                self._stats["padded"] += rows - ready.count
            return self._deliver(scheduler, ready, rows)

    def _count_by_source(self, ready: Ready) -> None:
        totals = self._stats["items_per_source"]
        for name, n in self._by_source(ready.indices).items():
            totals[name] += n
        if ready.skipped:
            for name, n in self._by_source(np.array([i for i, _ in ready.skipped], np.int64)).items():
                totals[name] -= n

    def _deliver(self, scheduler: Scheduler, ready: Ready, rows: int) -> Any:
        table = scheduler.table
        arrays, copied = table.hand_out(scheduler.ring, self._layout, ready.slot, rows, ready.shapes)
        if copied:
            self._stats["copied_out"] += 1
            if not self._loader._warned_copy:
                self._loader._warned_copy = True
                log.warning(
                    "the caller holds %d of %d ring slots, so the workers would starve; further "
                    "batches are copied out of the ring until batches are released (raise slots= "
                    "or hold fewer batches).", table.leased, len(table))
        layout = self._layout
        if self._only_arrays:
            return unflatten(layout.treedef, arrays)
        array_leaves = iter(arrays)
        objects = iter(ready.objects)
        leaves = [next(array_leaves) if kind == "array" else next(objects) for kind in layout.kinds]
        return unflatten(layout.treedef, leaves)
