"""The loader iterator: it owns its position, takes its batches from the scheduler, hands out views.

``iter(loader)`` returns one. It is the stateful object (like Grain's iterators): its
``state_dict()`` is the position after the batches *it* delivered, so a stage that reads
ahead asks the iterator it reads, after each batch, and gets an exact answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agnostic_prefetch import _fork
from agnostic_prefetch._core import CLOSED, FORKED, Cursor, LoaderCore
from agnostic_prefetch._inflight import Ready
from agnostic_prefetch._resume import ENDLESS
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._slots import SlotTable
from agnostic_prefetch._tree import unflatten
from agnostic_prefetch.errors import LoaderError

log = logging.getLogger("agnostic_prefetch")


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

    def __init__(self, core: LoaderCore, cursor: Cursor) -> None:
        self._core = core  # shared with the loader: keeps the workers while this iterator lives
        self._cursor = cursor
        self._scheduler = core.scheduler
        self._layout = core.layout
        self._stats = core.stats
        self._only_arrays = "object" not in self._layout.kinds
        self._padded = core.padded
        self._by_source = core.by_source
        self._snapshots = core.snapshots
        self._trace = core.trace
        self._ends_early = core.ends_early

    def __iter__(self) -> LoaderIterator:
        return self

    def __len__(self) -> int:
        """Batches this iteration has yet to deliver."""
        cursor = self._cursor
        if cursor.end >= ENDLESS:
            raise TypeError("an iteration of a Loader with epochs=None never ends and has no length")
        return 0 if cursor.ended else self._core.remaining(cursor.position, cursor.end)

    @property
    def max_held(self) -> int:
        """Batches a consumer may hold at once before further ones are copied out of the ring."""
        return self._scheduler.table.max_held

    @property
    def held(self) -> int:
        """Slots held by the consumer now (batches handed out and still viewed)."""
        return self._scheduler.table.leased

    @property
    def slots(self) -> int:
        """Slots in the loader's ring."""
        return len(self._scheduler.table)

    @property
    def global_batch_size(self) -> int:
        """Items per global batch, over all shards (its loader's)."""
        return self._core.sampler.global_batch_size

    @property
    def shard_index(self) -> int:
        return self._core.sampler.shard_index

    @property
    def shard_count(self) -> int:
        return self._core.sampler.shard_count

    @property
    def interruptible(self) -> bool:
        """Whether :meth:`cancel` ends a ``next()`` in progress at once (not with ``workers=0``,
        where that ``next()`` runs the source itself)."""
        return self._scheduler.members.count > 0

    def stats(self) -> dict[str, Any]:
        """Its loader's :meth:`~agnostic_prefetch.Loader.stats`."""
        return self._core.stats_dict()

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches this iterator delivered: small and JSON-able."""
        cursor = self._cursor
        return self._core.state_of(cursor.position, cursor.end >= ENDLESS)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue *this* iterator from ``state`` (see ``Loader.load_state_dict``); the
        loader's other live iterator, if any, ends. Not while another thread iterates it.

        Raises:
            ValueError: the state cannot be continued exactly here (nothing changes then).
        """
        core = self._core
        state, position = core.decode(state)
        core.begin(self._cursor, position, state.get("plan_cursor"))

    def count_held_by(self, counter: Callable[[], int]) -> None:
        """Let a stage that reads this iterator (a prefetcher) say how many of its batches it
        holds, so that a copy-out warning can tell them from the ones its caller holds.
        ``counter`` is kept as a weak reference if it is a bound method."""
        self._core.count_held_by(counter)

    def cancel(self) -> None:
        """End this iterator from any thread; a ``next()`` waiting for a worker wakes at once."""
        self._core.cancel(self._cursor)

    def close(self) -> None:
        """End this iterator (like a generator's ``close()``)."""
        self.cancel()

    def __next__(self) -> Any:
        cursor = self._cursor
        if self._core.pid != _fork.pid:  # before the drive: a thread of the parent's may hold it
            _fork.check(self._core.pid, "Loader", FORKED)
        if cursor.ended:
            raise StopIteration
        scheduler = self._scheduler
        started = time.perf_counter()
        try:
            with scheduler.drive:
                batch = self._next_batch(scheduler, cursor)
        except LoaderError:
            if not scheduler.closed:  # a failed pipeline stops with its error, at once
                self._core.close(grace=0.0)
            raise
        finally:
            now = time.perf_counter()
            self._stats["wait_s"] += now - started
        if self._trace.tracers:
            self._trace.span("next", started, now)
        if now >= self._snapshots.next_at:
            self._snapshots.tick(now)
        return batch

    def _next_batch(self, scheduler: Scheduler, cursor: Cursor) -> Any:
        end = cursor.end
        while True:
            if scheduler.closed:
                raise LoaderError(CLOSED)
            if cursor.ended:
                raise StopIteration
            position = cursor.position
            if position.next_seq >= end:
                cursor.position = position._replace(end=None)  # no iteration in progress
                cursor.ended = True
                raise StopIteration
            # Top the workers up first, even when a batch is ready: otherwise they idle while
            # the caller drains ready batches, and the caller then waits a whole fill.
            scheduler.dispatch(position, end)
            found = scheduler.take(position, end)
            if found is None:
                scheduler.wait()
                continue
            seq, ready = found
            cursor.position = position.after(seq)
            if self._ends_early:  # Pack: step over batch numbers past the epoch's end
                cursor.position = self._core.settle(cursor.position)
            for index, reason in ready.skipped:
                log.warning("skipped record %d (on_error='skip'): %s", index, reason)
            self._stats["skipped"] += len(ready.skipped)
            if ready.count == 0 and not self._padded:  # every record of this batch was skipped
                scheduler.discard(ready)
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

    def _note_outside(self, ready: Ready) -> None:
        stats = self._stats
        stats["outside_ring"] = stats.get("outside_ring", 0) + 1
        if stats["outside_ring"] == 1:
            assert ready.shapes is not None
            leaves = ", ".join(f"{a.path} {list(shape)} (the ring holds {list(a.shape)})"
                               for a, shape in zip(self._layout.arrays, ready.shapes, strict=True)
                               if int(np.prod(shape)) * a.dtype.itemsize > a.item_bytes)
            log.warning(
                "a batch whose first record is larger than the ring's slots were laid out for "
                "(record %d: %s) arrived through its worker's pipe: a copy of %s, where a batch "
                "in the ring costs none. Each such batch does (counted in stats()['outside_ring']); "
                "pass spec= with each leaf's largest shape to keep every batch in the ring.",
                int(ready.indices[0]), leaves, _size(sum(a.nbytes for a in ready.outside or ())))

    def _count_by_source(self, ready: Ready) -> None:
        totals = self._stats["items_per_source"]
        for name, n in self._by_source(ready.indices).items():
            totals[name] += n
        if ready.skipped:
            for name, n in self._by_source(np.array([i for i, _ in ready.skipped], np.int64)).items():
                totals[name] -= n

    def _deliver(self, scheduler: Scheduler, ready: Ready, rows: int) -> Any:
        table = scheduler.table
        if ready.outside is not None:
            arrays, copied = ready.outside, False
            self._note_outside(ready)
        else:
            arrays, copied = table.hand_out(scheduler.ring, self._layout, ready.slot, rows, ready.shapes)
        if copied:
            self._stats["copied_out"] += 1
            core = self._core
            if not core.warned_copy:
                core.warned_copy = True
                log.warning("%s", copy_out_message(table, core.stage_holds()))
        layout = self._layout
        if self._only_arrays:
            return unflatten(layout.treedef, arrays)
        array_leaves = iter(arrays)
        objects = iter(ready.objects)
        leaves = [next(array_leaves) if kind == "array" else next(objects) for kind in layout.kinds]
        return unflatten(layout.treedef, leaves)


def copy_out_message(table: SlotTable, stage: int | None) -> str:
    """The warning for the first batch copied out: who holds the slots, and the ``slots=`` to pass."""
    held = table.leased
    if stage is None:
        who = "your code holds them"
    else:
        stage = min(stage, held)
        who = (f"the prefetch stage over this loader holds {stage} (its queue and copies in flight), "
               f"and your code {held - stage}")
    return (
        f"the consumer holds {held} of the ring's {len(table)} slots ({who}, directly or through "
        "work it queued: a torch tensor or array that views a batch keeps its slot, and JAX keeps "
        "a step's inputs alive until the step has run); the rest stay for the workers, so further "
        "batches are copied out of the ring until some are let go. To keep every batch in the "
        f"ring, pass slots={table.slots_needed} to the Loader (the consumer held {table.peak} at "
        "once so far; stats()['slots_needed'] follows it), or hold fewer batches.")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes:,} bytes"
