"""Putting a loader together from its source and settings, in an order whose every failure
releases what was built before it.

The order: what cannot fail after resources exist is done first (the trace's path, the
order, the layout example, the ring's plan); then the ring, the workers, the supervisor
and the scheduler, each registered for release as it is made, and released in reverse if
anything after it fails. Nothing is left to the garbage collector: a construction that
raises leaves no worker, no descriptor and no open database behind.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

from agnostic_prefetch import _autotune, _pool
from agnostic_prefetch._accounts import Board, board_bytes
from agnostic_prefetch._core import LoaderCore
from agnostic_prefetch._example import let_go, read_example
from agnostic_prefetch._layout import Layout, layout_from_example, with_mask
from agnostic_prefetch._lengths import Measure, lengths_for, sequence_keys
from agnostic_prefetch._membership import Membership
from agnostic_prefetch._progress import ProgressWatch
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._rows import RowLayout, roles_of, row_example
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._sequences import SequenceSampler
from agnostic_prefetch._settings import LoaderOptions
from agnostic_prefetch._sizing import plan_ring
from agnostic_prefetch._slots import SlotTable
from agnostic_prefetch._stream_core import StreamCore, StreamOrder
from agnostic_prefetch._stream_pool import read_stream_example, stream_pool
from agnostic_prefetch._stream_schedule import StreamScheduler
from agnostic_prefetch._worker import FillRules, Job
from agnostic_prefetch.batching import Pack
from agnostic_prefetch.sampler import Sampler
from agnostic_prefetch.streams import Fetcher, Stream
from agnostic_prefetch.tracing import TraceLink, Tracer

__all__ = ["assemble"]


def assemble(source: Any, options: LoaderOptions, measure: Callable[[Any], Iterable[Any]] | None = None) -> LoaderCore:
    """A running loader's core: workers started, ring reserved, nothing delivered yet.

    ``measure`` runs a pass of a loader over a source and yields its batches (the pass that
    measures sequence lengths when ``batching=`` needs them and nothing else gives them).

    Raises:
        ValueError, LayoutError, RingTooLargeError, LoaderError, OSError: whatever failed,
            after everything built before it was released.
    """
    order, pool, items, watch = options.order, options.pool, options.items, options.watch
    own_tracer = Tracer(watch.trace) if watch.trace is not None else None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(let_go, source)  # what a failed construction opened in this process
        row_layout: RowLayout | None = None
        stream = source if isinstance(source, Stream | Fetcher) else None
        if stream is not None:
            stream_job = stream_pool(stream, options)
            sampler = StreamOrder(stream, order.batch_size, seed=order.seed, remainder=order.remainder,
                                  shard_index=order.shard_index, shard_count=order.shard_count)
            example = items.spec if items.spec is not None else read_stream_example(
                stream, items.transform, order.seed, stream_job, items.skip)
        elif items.batching is not None:
            assert measure is not None
            sampler, example = _sequence_order(source, options, measure)
            cleanup.callback(sampler.close)
        else:
            sampler = Sampler(source, order.batch_size, shuffle=order.shuffle, seed=order.seed,
                              remainder=order.remainder, shard_index=order.shard_index,
                              shard_count=order.shard_count)
            example = (items.spec if items.spec is not None
                       else read_example(sampler, source, items.transform, items.skip))
        if order.mask is not None:
            example = with_mask(example, order.mask)
        layout = layout_from_example(example, sampler.batch_size)
        if isinstance(sampler, SequenceSampler):
            row_layout = _row_layout(layout, sampler, order.mask)
        auto = (_autotune.plan_auto(source, items.transform, pool.backend, layout.slot_bytes, pool.slots)
                if pool.workers == "auto" and stream is None else None)
        if stream is not None:
            workers, backend = stream_job.started, stream_job.backend
        else:
            workers, backend = auto.first if auto else (int(pool.workers), pool.backend)
        plan = plan_ring(auto.limit if auto else workers, layout.slot_bytes, pool.slots)
        rows = auto.rows if auto else max(1, workers)
        ring = Ring(plan.slots, layout.slot_bytes, board_bytes(rows))
        cleanup.callback(ring.close)
        job = Job(source, items.transform, layout,
                  FillRules(sampler.seed, items.skip, order.mask, items.shapes == "per_batch"),
                  pool.worker_init, ring.extra_offset, row_layout, stream_job.job if stream is not None else None)
        started: list[_pool.Worker] = []
        cleanup.callback(_pool.stop, started, 0.0)  # the list fills as workers start
        started += _pool.start(workers, backend, job, ring, plan.orders_per_worker)
        start_more = functools.partial(_start_more, job, ring, plan.orders_per_worker)
        members = Membership(started, backend, start_more if auto else None,
                             ProgressWatch.period_for(pool.timeout, pool.stall_warning), start_more)
        cleanup.callback(members.stop, 0.0)
        board = Board(ring.map, ring.extra_offset, rows)
        trace = TraceLink(board)
        tuner = _autotune.Tuner(auto) if auto else None
        kind, core_kind, extra = Scheduler, LoaderCore, {}
        if stream is not None:
            kind, core_kind = StreamScheduler, StreamCore  # type: ignore[assignment]
            extra = {"workers": stream_job.job.workers}
            scheduler_extra = {**extra, "batches_per_epoch": stream.batches_per_epoch, "pad": order.mask is not None}
        scheduler = kind(sampler, ring, SlotTable(plan.slots, plan.max_held), members, board,
                         timeout=pool.timeout, stall_warning=pool.stall_warning,
                         locate=getattr(source, "locate", None), lookahead=plan.slots, ordered=order.ordered, trace=trace,
                         tuner=tuner, on_released=functools.partial(_released, source),
                         max_deaths=pool.max_worker_deaths, skip=items.skip,
                         **(scheduler_extra if stream is not None else {}))
        core = core_kind(scheduler, sampler, layout, epochs=order.epochs, ordered=order.ordered,
                         mask_key=order.mask, source=source, tuner=tuner, trace=trace,
                         own_tracer=own_tracer, log_every=watch.log_every, **extra)
        cleanup.pop_all()
    return core


def _sequence_order(source: Any, options: LoaderOptions,
                    measure: Callable[[Any], Iterable[Any]]) -> tuple[SequenceSampler, Any]:
    """``batching=``'s order, and the example the ring is laid out from: the first item's,
    each sequence as long as the longest row, with its segment ids and positions."""
    order, items = options.order, options.items
    batching = items.batching
    assert batching is not None
    g = order.batch_size * order.shard_count
    first = read_example(Sampler(source, g, shuffle=order.shuffle, seed=order.seed), source, items.transform,
                         items.skip)
    keys = sequence_keys(batching, first)
    lengths = lengths_for(source, batching, keys, measure,
                          lambda: Measure(source, items.transform, keys, order.seed, items.skip))
    sampler = SequenceSampler(source, batching, keys, lengths, batch_size=order.batch_size, shuffle=order.shuffle,
                              seed=order.seed, remainder=order.remainder, shard_index=order.shard_index,
                              shard_count=order.shard_count)
    return sampler, row_example(first, keys, sampler.row_lengths, isinstance(batching, Pack))


def _row_layout(layout: Layout, sampler: SequenceSampler, mask_key: str | None) -> RowLayout:
    paths = [a.path for a in layout.arrays]
    mask = paths.index(f"[{mask_key!r}]") if mask_key is not None else None
    batching = sampler.batching
    return RowLayout(sampler.keys, roles_of(paths, sampler.keys), batching.pad_value, isinstance(batching, Pack),
                     mask, mask_key)


def _start_more(job: Job, ring: Ring, capacity: int, count: int, backend: str, first_id: int) -> list[_pool.Worker]:
    return _pool.start(count, backend, job, ring, capacity, first_id)


def _released(source: Any, ended_here: bool) -> None:
    # Workers that ran in this process (threads, workers=0) read the user's own source
    # object: once they have all ended, let go of what they opened (an LMDB environment,
    # which py-lmdb allows once per path, so the user can open the database again).
    if ended_here:
        let_go(source)
