"""What a Loader and its iterators share: the scheduler (workers and ring), the order's settings,
delivery counters, the latest iteration's cursor, the traces; closed when neither holds it.

The ``Loader`` is configuration and the public face; a ``LoaderIterator`` is one iteration.
Both hold this core, and it holds neither (the latest iteration's position lives in a
:class:`Cursor` that the core and that iterator share), so there is no reference cycle:
``for batch in Loader(...)`` keeps the workers for as long as the iterator lives, and the
moment neither the loader nor an iterator is referenced, the core's finalizer stops the
workers and releases the ring, without waiting for the cyclic garbage collector.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from agnostic_prefetch import _fork
from agnostic_prefetch._accounts import per_worker, worker_totals
from agnostic_prefetch._autotune import Tuner
from agnostic_prefetch._layout import Layout
from agnostic_prefetch._resume import (
    ENDLESS,
    START,
    Position,
    decode,
    encode,
    iteration_end,
    order_settings,
    pick,
)
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._window import Snapshots
from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import Sampler
from agnostic_prefetch.tracing import TraceLink, Tracer, register

__all__ = ["CLOSED", "Cursor", "LoaderCore"]

CLOSED = "this Loader is closed; build a new one (load_state_dict resumes exactly)"
FORKED = ("Build a new Loader in this process: old.state_dict() works here and says where the "
          "parent's stood at the fork, for the new one's load_state_dict()")


class Cursor:
    """One iteration's position, shared by its iterator and (while it is the latest) the core.

    ``position`` is an immutable tuple replaced whole on every delivery, so any thread may
    read it; the iterating thread replaces it while holding the scheduler's drive.
    ``ended`` may be set by any thread (``cancel``); once set, the iteration takes no
    further batch.
    """

    __slots__ = ("end", "ended", "position")

    def __init__(self, position: Position) -> None:
        assert position.end is not None
        self.position, self.end, self.ended = position, position.end, False

    def restart(self, position: Position) -> None:
        assert position.end is not None
        self.position, self.end, self.ended = position, position.end, False


class LoaderCore:
    """The state a loader and its iterators share, each field with one owner.

    Set at construction and never changed: ``scheduler``, ``sampler``, ``layout``,
    ``settings``, ``epochs``, ``ordered``, ``padded``, ``by_source``, ``tuner``, ``trace``,
    ``snapshots``. ``latest`` and ``start`` change only under ``scheduler.drive``. The
    delivery counters in ``stats`` are added to by the thread driving the scheduler.

    Args:
        scheduler: the workers, ring and orders.
        sampler: the order.
        layout: the slot layout.
        epochs, ordered, mask_key: the loader's settings (``mask_key``: ``None`` without padding).
        source: what the workers read (its fingerprint and component counts are asked here).
        tuner: ``workers="auto"``'s tuner (kept for its report), or ``None``.
        trace: the traces that record this loader.
        own_tracer: the trace ``trace=`` started, written at close.
        log_every: seconds between diagnosis log lines, or ``None``.
    """

    def __init__(self, scheduler: Scheduler, sampler: Sampler, layout: Layout, *, epochs: int | None,
                 ordered: bool, mask_key: str | None, source: Any, tuner: Tuner | None, trace: TraceLink,
                 own_tracer: Tracer | None, log_every: float | None) -> None:
        self.scheduler = scheduler
        self.sampler = sampler
        self.layout = layout
        self.epochs = epochs
        self.ordered = ordered
        self.bpe = sampler.batches_per_epoch
        self.padded = mask_key is not None  # every batch full; a mask marks real rows
        self.settings = order_settings(sampler, ordered)
        self.settings["source_order"] = getattr(source, "order_fingerprint", None)
        self.settings["batching"] = getattr(sampler, "fingerprint", None)
        # Pack: an epoch may end before batches_per_epoch (a bound); positions step over the rest
        self.ends_early = bool(getattr(sampler, "ends_early", False))
        self.by_source = getattr(source, "items_by_source", None)
        self.tuner = tuner
        self.trace = trace
        self.stats: dict[str, Any] = {"batches": 0, "items": 0, "padded": 0, "wait_s": 0.0,
                                      "skipped": 0, "copied_out": 0}
        if self.by_source is not None:
            self.stats["items_per_source"] = self.by_source(np.zeros(0, np.int64))
        self.warned_copy = False
        self._stage_holds: Any = None  # a weak reference to a prefetcher's count of held batches
        self.snapshots = Snapshots(weakref.WeakMethod(self.snapshot_stats), log_every)
        self.latest: Cursor | None = None
        self.start: Position = START  # where the next iteration starts when there is no latest
        self._finalizer = weakref.finalize(self, _shut_down, scheduler, trace, own_tracer,
                                           getattr(sampler, "close", None))
        self.pid = _fork.adopt(self._finalizer)  # the process it loads for (a forked child's copy refuses)
        register(trace)
        if own_tracer is not None:
            trace.attach(own_tracer)

    # ---- iterations ----------------------------------------------------------------------

    def position(self) -> Position:
        """Where the next iteration starts: the latest one's position, else ``start``."""
        latest = self.latest
        return latest.position if latest is not None else self.start

    def begin(self, cursor: Cursor | None, position: Position | None, plan_cursor: Any = None) -> Cursor:
        """Start an iteration from ``position`` (default: where the latest stands), on
        ``cursor`` (default: a new one); the iteration it takes over from ends.
        ``plan_cursor``: where a resumed state's packing stands (``Pack``)."""
        self.check_open()
        self._cancel_latest(cursor)
        with self.scheduler.drive:
            self.check_open()
            self._cancel_latest(cursor)  # one another thread started meanwhile
            start = self.position() if position is None else position
            if self.ends_early:
                if plan_cursor is not None:
                    self.sampler.seek(*divmod(start.next_seq, self.bpe), plan_cursor)  # type: ignore[attr-defined]
                start = self.settle(start)
            end = iteration_end(start, self.epochs, self.bpe)
            if cursor is None:
                cursor = Cursor(start._replace(end=end))
            else:
                cursor.restart(start._replace(end=end))
            self.scheduler.restart(cursor.position, end)
            self.latest = cursor
        return cursor

    def load(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """The next iteration continues from ``state``; the live one ends. A state that is
        refused changes nothing.

        Raises:
            ValueError: the state cannot be continued exactly here (``_resume.decode``).
        """
        self.check_open()
        state, position = self.decode(state)
        self._cancel_latest(None)
        with self.scheduler.drive:
            self._cancel_latest(None)
            self.latest = None
            if self.ends_early:
                plan_cursor = state.get("plan_cursor")
                if plan_cursor is not None:
                    self.sampler.seek(*divmod(position.next_seq, self.bpe), plan_cursor)  # type: ignore[attr-defined]
                position = self.settle(position)
            self.start = position

    def decode(self, state: dict[str, Any] | list[dict[str, Any]]) -> tuple[dict[str, Any], Position]:
        """The state this shard continues from (one of every process's, ``pick``) and its position.

        Raises:
            ValueError: the state cannot be continued exactly here (``_resume.decode``).
        """
        if isinstance(state, list | tuple):
            state = pick(list(state), self.settings)
        return state, decode(state, self.settings)

    def state_of(self, position: Position, endless: bool) -> dict[str, Any]:
        """``position``'s state dict (with where packing stands, for ``Pack``)."""
        state = encode(position, self.settings, endless=endless)
        if self.ends_early:
            state["plan_cursor"] = self.sampler.cursor(*divmod(position.next_seq, self.bpe))  # type: ignore[attr-defined]
        return state

    def settle(self, position: Position) -> Position:
        """``position`` moved past the batch numbers its epoch does not have (``Pack``)."""
        sampler: Any = self.sampler
        seq, bpe, ahead = position.next_seq, self.bpe, position.ahead
        while seq < ENDLESS:
            if seq in ahead:  # (ordered=False) delivered already
                seq += 1
            elif not sampler.exists(*divmod(seq, bpe)):
                seq = (seq // bpe + 1) * bpe
            else:
                break
        sampler.forget(*divmod(seq, bpe))
        if seq == position.next_seq:
            return position
        return position._replace(next_seq=seq, ahead=frozenset(s for s in ahead if s > seq))

    def remaining(self, position: Position, end: int) -> int:
        """Batches not yet delivered before ``end`` (``Pack``: counting each epoch's real batches)."""
        if not self.ends_early:
            return position.remaining(end)
        sampler: Any = self.sampler
        count, seq, bpe = 0, position.next_seq, self.bpe
        while seq < end:
            epoch = seq // bpe
            count += max(0, min(end, epoch * bpe + sampler.epoch_batches(epoch)) - seq)
            seq = (epoch + 1) * bpe
        return count - sum(1 for s in position.ahead if s < end)

    def next_length(self) -> int:
        """Batches the next iteration yields (``len(loader)``)."""
        if self.epochs is None:
            raise TypeError("a Loader with epochs=None never ends and has no length")
        position = self.position()
        return self.remaining(position, iteration_end(position, self.epochs, self.bpe))

    def cancel(self, cursor: Cursor) -> None:
        """End ``cursor``'s iteration from any thread; a ``next()`` waiting in it wakes at once."""
        if not cursor.ended:
            cursor.ended = True
            if not self.scheduler.closed and self.pid == _fork.pid:  # (a forked child's copy wakes nobody)
                self.scheduler.wake()

    def _cancel_latest(self, keep: Cursor | None) -> None:
        latest = self.latest
        if latest is not None and latest is not keep:
            self.cancel(latest)

    def count_held_by(self, counter: Any) -> None:
        """A prefetch stage over this loader says how many batches it holds (see the iterator)."""
        self._stage_holds = weakref.WeakMethod(counter) if hasattr(counter, "__self__") else lambda: counter

    def stage_holds(self) -> int | None:
        """The batches the prefetch stage over this loader holds now, if one said so."""
        ref = self._stage_holds
        counter = ref() if ref is not None else None
        return counter() if counter is not None else None

    # ---- stats ---------------------------------------------------------------------------

    def stats_dict(self) -> dict[str, Any]:
        """``Loader.stats()``."""
        scheduler = self.scheduler
        members = scheduler.members
        table = scheduler.table
        stats = {**self.stats, "ring_bytes": scheduler.ring.nbytes, "slots": len(table),
                 "workers": members.count, "backend": members.backend, "held_peak": table.peak,
                 "slots_needed": table.slots_needed}
        if "items_per_source" in stats:
            stats["items_per_source"] = dict(stats["items_per_source"])
        stats["deaths"] = scheduler.deaths()
        stats["worker_deaths"] = len(stats["deaths"])
        stats.update(stage_times(scheduler, stats["wait_s"]))
        if self.tuner is not None:
            stats["auto"] = self.tuner.report()
        return stats

    def snapshot_stats(self) -> dict[str, Any]:
        return self.stats_dict()

    # ---- closing -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.scheduler.closed

    def check_open(self) -> None:
        _fork.check(self.pid, "Loader", FORKED)
        if self.scheduler.closed:
            raise LoaderError(CLOSED)

    def close(self, grace: float = 0.5) -> None:
        """Stop the workers and release the ring (once; what ``Loader.close()`` does)."""
        if self._finalizer.alive:
            _, _, (scheduler, trace, own_tracer, close_sampler), _ = self._finalizer.detach()
            _shut_down(scheduler, trace, own_tracer, close_sampler, grace)


def _shut_down(scheduler: Scheduler, trace: TraceLink, own_tracer: Tracer | None,
               close_sampler: Callable[[], None] | None, grace: float = 0.5) -> None:
    """What closing a loader does (its finalizer's work: no reference to the core)."""
    if close_sampler is not None:
        close_sampler()
    scheduler.close(grace)
    trace.close()
    if own_tracer is not None and not own_tracer.closed:
        own_tracer.write()


def stage_times(scheduler: Scheduler, wait_s: float) -> dict[str, Any]:
    """The per-stage part of ``Loader.stats()``: the caller's wait split up, the workers' times."""
    table = scheduler.board.table()
    times: dict[str, Any] = {"blocked_s": scheduler.blocked_s, "handoff_s": max(0.0, wait_s - scheduler.blocked_s),
                             "held_s": scheduler.held_s, **worker_totals(table)}
    times["fill_s"] = times["read_s"] + times["transform_s"] + times["write_s"]
    times["per_worker"] = per_worker(table)
    return times
