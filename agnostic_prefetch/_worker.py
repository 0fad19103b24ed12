"""The loop in each loader worker: take an order, fill its slot item by item, report.

The same ``Filler`` runs in a worker process, in a worker thread, and in the caller when
``workers=0``, so every backend produces the same bytes. Nothing here knows about ordering
or frameworks.

Messages, worker to parent: the typed messages of ``_messages.py`` (a ``Done`` or ``Failed``
per order, ``StartFailed``, ``Note``). Parent to worker: orders packed as bytes
(``_orders.py``); end of file on the order pipe means "exit".
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from agnostic_prefetch._accounts import (
    CPU_SAMPLE,
    FIELDS,
    FLUSH_S,
    TRACE_BATCHES,
    TRACE_ITEMS,
    WorkerAccount,
)
from agnostic_prefetch._layout import (
    H_COUNT,
    H_EPOCH,
    H_MAGIC,
    H_NUMBER,
    H_PROGRESS,
    MAGIC,
    Layout,
    SlotWriter,
    batch_layout,
    layout_from_example,
)
from agnostic_prefetch._messages import Done, Failed, Message, Note, StartFailed, encode
from agnostic_prefetch._orders import Order, unpack_orders
from agnostic_prefetch._plan import RowPlan
from agnostic_prefetch._rows import RowBatch, RowLayout, batch_shapes, shaped_layout
from agnostic_prefetch.sampler import item_rng

FRAMEWORKS = ("jax", "torch", "cupy", "tensorflow")
# glibc's allocator in a worker process keeps freed memory for reuse (unless the user set
# these): by default it gives the top of the heap back after each batch and faults it in
# again for the next, which halved the rate of 100 KB records (24k -> 46k items/s, 2 workers,
# benchmarks/bench_formats.py); large buffers (a decoded image) come from the heap too.
ALLOCATOR_ENV_VARS = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)


_THREAD = FIELDS.index("thread")
@dataclass(frozen=True)
class FillRules:
    """How a worker fills a slot beyond the layout: the draws, bad records, padding, shapes."""

    seed: int  # each item's rng is seeded from (seed, epoch, position)
    skip_errors: bool = False  # on_error="skip": a failing record is left out and reported
    mask_key: str | None = None  # remainder="pad": every batch is full, real rows marked here
    per_batch: bool = False  # shapes="per_batch": each batch takes its first item's shapes


@dataclass(frozen=True)
class Job:
    """What a worker needs to fill slots: the source, the transform, the layout and the rules."""

    source: Any
    transform: Any
    layout: Layout
    rules: FillRules
    worker_init: Any = None
    board_offset: int = 0  # where the accounting block starts in the ring (_accounts.py)
    rows: RowLayout | None = None  # sequence batching (batching=): how rows are filled
    stream: Any = None  # a stream source: the worker count and shard (_stream_read.StreamJob)


class Filler:
    """Fills ring slots for one worker; keeps a writer per slot."""

    def __init__(self, job: Job, slot_view: Any, board: memoryview | None = None, row: int = 0) -> None:
        self.job = job
        self._slot_view = slot_view
        self.account = WorkerAccount(board, row, os.getpid(), threading.get_native_id())
        self.always_flush = False  # the in-process worker: its figures are read right after
        self._writers: dict[int, SlotWriter] = {}
        self._shaped: dict[tuple[int, tuple[Any, ...]], SlotWriter] = {}  # per_batch writers
        self._getitems = getattr(job.source, "__getitems__", None)  # batched reads, where offered
        self._read = getattr(job.source, "__getitem__", None)

    def fill(self, order: Order) -> Done | Failed:
        """Carry out one order; return the message for the parent."""
        order_id, slot, epoch, number = order.order_id, order.slot, order.epoch, order.number
        indices = order.indices
        read = self._read
        if order.poisoned:  # records that killed their worker: left out as skipped ones
            indices, read = _unpoisoned(indices, read)
        positions = range(order.first_position, order.first_position + len(indices))
        job = self.job
        rules = job.rules
        writer = self._writers.get(slot)
        if writer is None:
            writer = self._writers[slot] = SlotWriter(job.layout, self._slot_view(slot))
        rows = None
        if order.plan is not None:  # sequence rows (batching=): items go where the plan says
            rows = self._row_batch(slot, order.plan)
            writer = rows.writer
            assert order.positions is not None
            positions = order.positions.tolist()  # type: ignore[assignment]
        header = writer.header
        header[H_MAGIC], header[H_EPOCH], header[H_NUMBER] = MAGIC, epoch, number
        header[H_COUNT] = header[H_PROGRESS] = 0
        per_batch = rules.per_batch
        transform = job.transform
        into_slot = getattr(transform, "writes_into_slot", False) and not per_batch and rows is None
        mask_key = rules.mask_key
        seed = rules.seed
        slot_writer = writer
        objects: list[list[Any]] = [[] for _ in job.layout.object_paths]
        skipped: list[tuple[int, str]] = []
        count = 0
        # Per-stage times (see _accounts.py): wall time around every stage of every item,
        # kept as sums of the stage boundaries (fewer operations per item than durations);
        # CPU time on one item in CPU_SAMPLE.
        account = self.account
        level = account.control[0]
        spans: list[tuple[int, float, float, float, float]] | None = [] if level >= TRACE_ITEMS else None
        s0 = s1 = s2 = s3 = 0.0
        sampled: list[float] | None = None
        countdown = account.countdown
        now, cpu = time.perf_counter, time.thread_time
        started = t0 = now()
        together = None  # the items of one __getitems__ call
        if self._getitems is not None and len(indices) and not order.poisoned:
            c0 = cpu()
            together = _read_together(self._getitems, indices, job.source)
            t0 = now()
            s0 -= t0 - started  # its time counts as reading (the sum of t1 - t0 below)
            if together is not None:  # and as one CPU sample of reading (_accounts.py)
                sampled = [0.0, t0 - started, cpu() - c0, 0.0, 0.0, 0.0, 0.0]
        for step, (index, position) in enumerate(zip(indices.tolist(), positions, strict=True)):
            header[H_PROGRESS] = step
            if countdown:
                countdown -= 1
                sample = False
            else:
                countdown = CPU_SAMPLE - 1
                sample = True
                c0 = cpu()
            try:
                example = read(index) if together is None else together[step]
                t1 = now()
                if sample:
                    c1 = cpu()
                if into_slot:
                    example = transform(example, item_rng(seed, epoch, position), out=writer.item_out(count))
                elif transform is not None:
                    example = transform(example, item_rng(seed, epoch, position))
                t2 = now()
                if sample:
                    c2 = cpu()
                if rows is not None:
                    item_objects = rows.place(position, example, index)
                else:
                    if mask_key is not None:
                        example = {**example, mask_key: True}
                    if per_batch and count == 0:
                        writer = self._batch_writer(slot, slot_writer, example, index)
                    item_objects = writer.write(count, example, index)
            except Exception as exc:  # a bad record: report it, or skip and count it
                where, remedy = explain(job.source, index, exc)
                if rules.skip_errors:
                    if rows is None or rows.starts(position):  # (an item split over batches counts once)
                        skipped.append((index, f"{f'{where}: ' if where else ''}{type(exc).__name__}: {exc}"))
                    t0 = now()
                    continue
                account.countdown = countdown
                return Failed(order_id, index, picklable(exc), f"{type(exc).__name__}: {exc}",
                              traceback.format_exc(), where, remedy)
            t3 = now()
            s0 += t0
            s1 += t1
            s2 += t2
            s3 += t3
            if sample:
                c3 = cpu()
                if sampled is None:
                    sampled = [0.0] * 7
                sampled[0] += 1
                sampled[1] += t1 - t0
                sampled[2] += c1 - c0
                sampled[3] += t2 - t1
                sampled[4] += c2 - c1
                sampled[5] += t3 - t2
                sampled[6] += c3 - c2
            if spans is not None:
                spans.append((index, t0, t1, t2, t3))
            if item_objects:  # (sequence rows keep their list leaves themselves)
                for column, value in zip(objects, item_objects, strict=True):
                    column.append(value)
            count += 1
            t0 = t3
        items = count
        if rows is not None:
            count, objects = rows.finish(mask_key is not None)
        elif mask_key is not None and count < job.layout.batch_size:
            writer.pad(count)
            for column in objects:
                column.extend([None] * (job.layout.batch_size - count))
        header[H_PROGRESS] = len(indices)
        header[H_COUNT] = count
        if rows is not None:
            shapes = rows.shapes
        else:
            shapes = [a.shape for a in writer.layout.arrays] if per_batch and count else None
        overflow = writer.arrays(count) if writer.outside else None
        account.countdown = countdown
        ended = now()
        acc = account.acc  # inline: this runs per batch, and a batch may be one item
        acc[0] += items
        acc[1] += 1
        acc[2] += s1 - s0
        acc[3] += s2 - s1
        acc[4] += s3 - s2 + ended - t0  # padding and the header count as writing
        if sampled is not None:
            account.add_sampled(sampled)
        if self.always_flush or ended - account.flushed_at >= FLUSH_S:
            account.flush(ended)
        trace = (started, ended, spans) if level >= TRACE_BATCHES else None
        return Done(order_id, count, objects, skipped, trace, shapes, overflow)

    def _row_batch(self, slot: int, plan: RowPlan) -> RowBatch:
        """The rows of a sequence batch in ``slot``, laid out with its row lengths."""
        job = self.job
        assert job.rows is not None
        key = (slot, plan.lengths)
        writer = self._shaped.get(key)
        if writer is None:
            if len(self._shaped) > 4 * len(self._writers) + 16:
                self._shaped.clear()
            layout = shaped_layout(job.layout, batch_shapes(job.layout, job.rows, plan.lengths))
            writer = self._shaped[key] = SlotWriter(layout, self._slot_view(slot))
        return RowBatch(writer, job.rows, plan, len(job.layout.object_paths))

    def _batch_writer(self, slot: int, slot_writer: SlotWriter, example: Any, index: int) -> SlotWriter:
        """A writer for ``slot`` shaped like ``example`` (kept per slot and shapes), or, for a
        batch larger than the slot holds, one over memory of its own: that batch travels to
        the parent through the result pipe (a copy), in ``Done.overflow``."""
        layout = batch_layout(self.job.layout, example, index)
        if layout is None:
            outside = layout_from_example(example, self.job.layout.batch_size)
            writer = SlotWriter(outside, np.zeros(outside.slot_bytes, np.uint8))
            writer.outside = True
            writer.reference = f"record {index}'s, the first of its batch,"
            return writer
        key = (slot, tuple(a.shape for a in layout.arrays))
        writer = self._shaped.get(key)
        if writer is None:
            if len(self._shaped) > 4 * len(self._writers) + 16:
                self._shaped.clear()
            writer = self._shaped[key] = SlotWriter(layout, self._slot_view(slot))
        writer.reference = f"record {index}'s, the first of its batch,"
        writer.remedy = " With shapes='per_batch' a batch takes its first item's shapes: batch_size=1 takes any."
        return writer


def explain(source: Any, index: int, exc: BaseException) -> tuple[str | None, str | None]:
    """Where record ``index`` comes from and the source's remedy for ``exc`` (``locate`` and
    ``remedy`` of the source protocol), each ``None`` where the source does not say; an
    explanation that fails itself is left out rather than hide the record's own error."""
    out: list[str | None] = []
    for name, args in (("locate", (index,)), ("remedy", (index, exc))):
        method = getattr(source, name, None)
        try:
            value = method(*args) if method is not None else None
        except Exception:
            value = None
        out.append(None if value is None else str(value))
    return out[0], out[1]


def picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return None


class RecordKillsWorker(RuntimeError):
    """A record that killed the worker reading it, each time: left out (``on_error="skip"``)."""


def _unpoisoned(indices: np.ndarray, read: Any) -> tuple[np.ndarray, Any]:
    """The order's records (``-1 - i`` marks a record that kills its worker) and a reader
    that raises :class:`RecordKillsWorker` for those instead of reading them."""
    poison = set((-1 - indices[indices < 0]).tolist())

    def careful(index: int) -> Any:
        if index in poison:
            raise RecordKillsWorker(f"record {index} killed the worker reading it, in a fresh worker too; "
                                    "it is left out (the loader's warning says how it died)")
        return read(index)

    return np.where(indices < 0, -1 - indices, indices), careful


def _read_together(getitems: Any, indices: np.ndarray, source: Any) -> list[Any] | None:
    """The items at ``indices`` from one ``source.__getitems__`` call, in order; ``None`` when
    it raised: then each item is read alone, so a bad record is named, and skipped under
    ``on_error="skip"``, by itself."""
    try:
        items = getitems(indices.tolist())
    except Exception:
        return None
    if len(items) != len(indices):
        raise TypeError(f"{source!r}.__getitems__ returned {len(items)} items for {len(indices)} indices; it "
                        "must return one item per index, in the order given")
    return items


def serve(filler: Filler, orders: Connection, results: Connection, worker_id: int) -> None:
    """Run ``worker_init``, then answer orders until the order pipe closes (any backend)."""
    if filler.job.worker_init is not None:
        try:
            filler.job.worker_init(worker_id)
        except BaseException as exc:
            results.send(encode(StartFailed(picklable(exc), f"worker_init failed: {type(exc).__name__}: {exc}",
                                            traceback.format_exc())))
            return
    check_imports = threading.current_thread() is threading.main_thread()  # a process worker
    account = filler.account
    account.acc[_THREAD] = float(threading.get_native_id())
    while True:
        account.idle()
        try:
            batch_of_orders = unpack_orders(orders.recv_bytes())
        except (EOFError, OSError):
            return
        account.busy()
        for order in batch_of_orders:
            message: Message
            try:
                message = filler.fill(order)
            except BaseException as exc:  # a failure outside any record (e.g. a broken writer)
                message = Failed(order.order_id, None, picklable(exc), f"{type(exc).__name__}: {exc}",
                                 traceback.format_exc())
            try:
                if check_imports:  # once, and before the first result, so it is never lost
                    check_imports = False
                    _note_frameworks(results)
                results.send(encode(message))
            except (BrokenPipeError, OSError):
                return


def _note_frameworks(results: Connection) -> None:
    # Welcome (a torch Dataset, a torchvision transform), and worth one DEBUG line.
    loaded = [name for name in FRAMEWORKS if name in sys.modules]
    if loaded:
        results.send(encode(Note(f"worker pid {os.getpid()}: the source or transform imported "
                                 f"{', '.join(loaded)}; torch runs one thread per worker here")))
