"""A worker's filler for a stream source: each order is the worker's next batch of its own stream.

The same interface as ``_worker.Filler`` (``fill(order) -> Done | Failed``, ``account``), so
``serve`` runs it in a process, a thread or the caller alike; the items come from this
worker's :class:`~agnostic_prefetch._stream_read.StreamReader` instead of ``source[i]``, and
every ``Done`` says whether the stream ended and where it stands (its state, if it keeps one).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any

from agnostic_prefetch._accounts import CPU_SAMPLE, TRACE_BATCHES, TRACE_ITEMS, WorkerAccount
from agnostic_prefetch._layout import (
    H_COUNT,
    H_EPOCH,
    H_MAGIC,
    H_NUMBER,
    H_PROGRESS,
    MAGIC,
    SlotWriter,
)
from agnostic_prefetch._messages import Done, Failed
from agnostic_prefetch._orders import PAD_ONLY, RESTART, Order
from agnostic_prefetch._stream_read import StreamReader
from agnostic_prefetch._worker import Filler, Job, picklable
from agnostic_prefetch.sampler import item_rng
from agnostic_prefetch.streams import set_stream_info, stream_info

__all__ = ["StreamFiller", "make_filler"]

# A stream that raises this many times in a row under on_error="skip" is broken, not noisy.
MAX_FAILURES_IN_A_ROW = 100


class StreamFiller:
    """Fills ring slots from one worker's stream, one order (batch) at a time, in order."""

    def __init__(self, job: Job, slot_view: Any, board: memoryview | None, row: int, *, worker: int,
                 own_process: bool) -> None:
        assert job.stream is not None
        self.job = job
        self._slot_view = slot_view
        self.account = WorkerAccount(board, row, os.getpid(), threading.get_native_id())
        self.always_flush = False
        self._writers: dict[int, SlotWriter] = {}
        self.reader = StreamReader(job.source, job.stream, worker, job.rules.seed, own_process)
        self._next_number = 0
        self._where = f"worker {worker}'s stream"
        self._own_process = own_process

    def fill(self, order: Order) -> Done | Failed:
        """Carry out one order: the stream's next batch (after opening it, if the order says)."""
        if self._own_process:
            return self._fill(order)
        # In the caller's thread (workers=0), stream_info() answers only while the stream is read.
        before = stream_info()
        set_stream_info(self.reader.info)
        try:
            return self._fill(order)
        finally:
            set_stream_info(before)

    def _fill(self, order: Order) -> Done | Failed:
        reader = self.reader
        flags = order.stream_flags or 0
        if flags & PAD_ONLY:
            pass  # padding only: the stream is not read
        elif flags & RESTART:
            reader.open(order.epoch, order.state)
        elif reader.epoch != order.epoch:
            if order.number != 0:
                raise RuntimeError(f"internal: batch {order.number} of epoch {order.epoch} ordered from "
                                   f"{self._where} before its batch 0")
            reader.open(order.epoch)
        elif order.number != self._next_number:
            raise RuntimeError(f"internal: batch {order.number} of epoch {order.epoch} ordered from "
                               f"{self._where}, which is at batch {self._next_number}")
        if not flags & PAD_ONLY:
            self._next_number = order.number + 1
        job = self.job
        writer = self._writers.get(order.slot)
        if writer is None:
            writer = self._writers[order.slot] = SlotWriter(job.layout, self._slot_view(order.slot))
        header = writer.header
        header[H_MAGIC], header[H_EPOCH], header[H_NUMBER] = MAGIC, order.epoch, order.number
        header[H_COUNT] = header[H_PROGRESS] = 0
        account = self.account
        level = account.control[0]
        started = time.perf_counter()
        result = self._items(order, writer, flags & PAD_ONLY, level >= TRACE_ITEMS)
        if isinstance(result, Failed):
            return result
        count, objects, skipped, spans, times = result
        if job.rules.mask_key is not None and count < job.layout.batch_size:
            writer.pad(count)
            for column in objects:
                column.extend([None] * (job.layout.batch_size - count))
        header[H_PROGRESS] = header[H_COUNT] = count
        stream = None if flags & PAD_ONLY else (reader.ended, reader.state())
        ended = time.perf_counter()
        acc = account.acc
        acc[0] += count
        acc[1] += 1
        acc[2] += times[0]
        acc[3] += times[1]
        acc[4] += times[2] + max(0.0, ended - started - sum(times))
        if self.always_flush or ended - account.flushed_at >= 0.005:
            account.flush(ended)
        trace = (started, ended, spans) if level >= TRACE_BATCHES else None
        return Done(order.order_id, count, objects, skipped, trace, None, None, stream)

    def _items(self, order: Order, writer: SlotWriter, pad_only: int, keep_spans: bool) -> Any:
        """Read, transform and write items until the batch is full or the stream ends."""
        job, reader = self.job, self.reader
        transform, seed = job.transform, job.rules.seed
        into_slot = getattr(transform, "writes_into_slot", False)
        mask_key = job.rules.mask_key
        header = writer.header
        objects: list[list[Any]] = [[] for _ in job.layout.object_paths]
        skipped: list[tuple[int, str]] = []
        spans: list[Any] | None = [] if keep_spans else None
        read_s = transform_s = write_s = 0.0
        sampled = [0.0] * 7
        countdown = self.account.countdown
        now, cpu = time.perf_counter, time.thread_time
        failures = count = 0
        base = reader.global_id << 40  # each item's rng position: its worker, then its number
        size = 0 if pad_only else job.layout.batch_size
        pull = reader.pull
        item = reader.items
        while count < size:
            sample = countdown == 0
            countdown = CPU_SAMPLE - 1 if sample else countdown - 1
            t0, c0 = now(), cpu() if sample else 0.0
            stage = "reading it"
            try:
                try:
                    example = pull()
                except StopIteration:
                    reader.end()
                    break
                finally:
                    item += 1
                t1, c1 = now(), cpu() if sample else 0.0
                stage = "transforming it"
                if into_slot:
                    example = transform(example, item_rng(seed, order.epoch, base + item - 1), out=writer.item_out(count))
                elif transform is not None:
                    example = transform(example, item_rng(seed, order.epoch, base + item - 1))
                t2, c2 = now(), cpu() if sample else 0.0
                stage = "writing it"
                if mask_key is not None:
                    example = {**example, mask_key: True}
                item_objects = writer.write(count, example, item - 1)
            except Exception as exc:
                reader.items = item
                where = f"{self._where} (epoch {order.epoch}), item {item - 1}, {stage}"
                failures += 1
                if job.rules.skip_errors and failures < MAX_FAILURES_IN_A_ROW:
                    skipped.append((item - 1, f"{where}: {type(exc).__name__}: {exc}"))
                    continue
                self.account.countdown = countdown
                remedy = None if job.rules.skip_errors else (
                    "fix the stream, or pass on_error='skip' to leave items that fail out (a generator that "
                    "raises ends there: its stream ends)")
                if failures >= MAX_FAILURES_IN_A_ROW:
                    remedy = f"the stream failed {failures} times in a row; fix it"
                return Failed(order.order_id, item - 1, picklable(exc), f"{type(exc).__name__}: {exc}",
                              traceback.format_exc(), where, remedy)
            failures = 0
            t3 = now()
            read_s += t1 - t0
            transform_s += t2 - t1
            write_s += t3 - t2
            if sample:
                c3 = cpu()
                sampled[0] += 1
                sampled[1:] = [sampled[1] + t1 - t0, sampled[2] + c1 - c0, sampled[3] + t2 - t1,
                               sampled[4] + c2 - c1, sampled[5] + t3 - t2, sampled[6] + c3 - c2]
            if spans is not None:
                spans.append((item - 1, t0, t1, t2, t3))
            if item_objects:
                for column, value in zip(objects, item_objects, strict=True):
                    column.append(value)
            count += 1
            header[H_PROGRESS] = count
        reader.items = item if not reader.ended else item - 1
        self.account.countdown = countdown
        if sampled[0]:
            self.account.add_sampled(sampled)
        return count, objects, skipped, spans, (read_s, transform_s, write_s)


def make_filler(job: Job, slot_view: Any, board: memoryview | None, row: int, *,
                own_process: bool) -> Filler | StreamFiller:
    """The filler for ``job``'s kind of source, as worker ``row`` (its accounting row; for a
    stream, which worker's part of it this is)."""
    if job.stream is None:
        return Filler(job, slot_view, board, row)
    return StreamFiller(job, slot_view, board, row, worker=row, own_process=own_process)
