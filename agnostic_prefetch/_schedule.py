"""Scheduling: orders to idle workers, lowest batch first; results kept by batch number; shutdown.

Everything here counts global batch sequence numbers (``seq``, see ``_resume.py``). The
scheduler knows which batches are ordered or ready, not who will take them: a loader
iterator asks it for the batches its own position needs, and when a new iterator takes over
(a second ``iter()``, ``load_state_dict``), :meth:`Scheduler.restart` keeps what the new
position still needs (the look-ahead into the next epoch, say) and drops the rest.

One thread drives the scheduler at a time: it holds :attr:`Scheduler.drive` while it
dispatches, takes and waits. Another thread that must stop it (``close()``, ``cancel()``)
wakes the wait and then takes ``drive`` itself, so nothing is released under the driver.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agnostic_prefetch import _pool, _supervisor
from agnostic_prefetch._accounts import Board, per_worker, worker_totals
from agnostic_prefetch._layout import (
    H_COUNT,
    H_EPOCH,
    H_MAGIC,
    H_NUMBER,
    H_PROGRESS,
    HEADER_BYTES,
    MAGIC,
)
from agnostic_prefetch._resume import ENDLESS, Position
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._slots import SlotTable
from agnostic_prefetch._warn import warn
from agnostic_prefetch._worker import Order
from agnostic_prefetch.errors import LoaderError, WorkerError
from agnostic_prefetch.sampler import Sampler

log = logging.getLogger("agnostic_prefetch")

# How long close() from another thread waits for the driving thread to leave. A thread woken
# from its wait leaves within microseconds; one filling a batch itself (workers=0) cannot be
# interrupted, and the ring is then released when it leaves.
_LEAVE_S = 0.2


def _load(worker: _pool.Worker) -> int:
    return len(worker.outstanding)


@dataclass(slots=True)
class _Order:
    seq: int
    slot: int
    worker: _pool.Worker
    indices: np.ndarray
    stale: bool = False  # no position needs it any more: its result is thrown away
    progress: int = -1
    progress_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class Ready:
    """A filled batch waiting its turn: its slot, item count, list leaves and skipped records."""

    slot: int
    count: int
    objects: list[list[Any]]
    skipped: list[tuple[int, str]]  # counted and logged when the batch is delivered
    indices: np.ndarray  # the records ordered (skipped ones among them)
    shapes: list[tuple[int, ...]] | None = None  # per array leaf, with shapes="per_batch"


class Scheduler:
    """Orders, results and the wait for one loader's workers and ring; closes them.

    Args:
        sampler: what batch ``seq`` holds.
        ring, table: the ring and its slot table.
        workers: started workers (see ``_pool.start``).
        timeout: seconds a worker may go without progress, or ``None``.
        lookahead: batches it may order past the end of an iteration (no drain between epochs).
        board_rows: worker rows in the accounting block after the ring's slots.
    """

    def __init__(self, sampler: Sampler, ring: Ring, table: SlotTable, workers: list[_pool.Worker],
                 timeout: float | None, lookahead: int, board_rows: int) -> None:
        self.drive = threading.RLock()
        self.closed = False
        self.blocked_s = 0.0  # the driving thread blocked waiting for workers
        self.held_s = 0.0  # worker-seconds without an order because every slot was taken
        self._full_since = 0.0  # when a dispatch last found no free slot (0: there was one)
        self.on_trace: Any = None  # (worker, order's seq, trace) while a trace records
        self.tracer: Any = None  # the trace that records this loader's waits, if any
        self.tuner: Any = None  # workers="auto" while it probes: _autotune.Tuner
        self.starting: list[_pool.Worker] = []  # added, watched, given orders once they serve
        self.retiring: list[_pool.Worker] = []  # no new orders; stopped once their orders are answered
        self.retired: list[_pool.Worker] = []  # told to exit; reaped at close
        self.board = Board(ring.map, ring.extra_offset, board_rows)
        self.ring = ring
        self.table = table
        self.workers = workers
        self.supervisor = _supervisor.Supervisor(workers, timeout)
        self._sampler = sampler
        self._bpe = sampler.batches_per_epoch
        self._timeout = timeout
        self._lookahead = lookahead
        self._headers: np.ndarray | None = np.frombuffer(ring.map, np.int64, ring.extra_offset // 8).reshape(
            ring.slots, -1)[:, : HEADER_BYTES // 8]
        self._orders: dict[int, _Order] = {}
        self._order_ids = itertools.count()
        self._ready: dict[int, Ready] = {}
        self._failed: dict[int, WorkerError] = {}
        self._pending: set[int] = set()  # seqs ordered (not stale), ready or failed
        self._dispatch_seq = 0
        self._warned_frameworks = False
        self._release_when_left: float | None = None
        self.driver = 0  # the ident of the thread driving now, for close()'s warning

    # ---- what an iterator calls, holding ``drive`` ------------------------------------------

    def restart(self, position: Position, end: int) -> None:
        """Serve ``position`` from now on: drop the batches it does not need."""
        limit = end + self._lookahead if end < ENDLESS else ENDLESS

        def unwanted(seq: int) -> bool:
            return seq >= limit or position.delivered(seq)

        for order in self._orders.values():
            if not order.stale and unwanted(order.seq):
                order.stale = True
                self._pending.discard(order.seq)
        for seq in [s for s in self._ready if unwanted(s)]:
            self.table.discard(self._ready.pop(seq).slot)
            self._pending.discard(seq)
        for seq in [s for s in self._failed if unwanted(s)]:
            del self._failed[seq]
            self._pending.discard(seq)
        self._dispatch_seq = position.next_seq

    def dispatch(self, position: Position, end: int) -> None:
        """Order batches, lowest first, while a slot is free and a worker has room.

        A worker is topped up to its capacity in one write once it is down to half of it:
        each write wakes a sleeping worker, which costs more than a tiny batch.
        """
        if self.tuner is not None:
            self.tuner.step(self)
        if self.starting:
            self._admit()
        table = self.table
        table.reclaim()
        free = table.free
        if not free:
            self._make_room(position.next_seq)
            free = table.free
        if free and self._full_since:
            # Workers waiting now have waited since the ring filled up (no order came since).
            self.held_s += self.board.idle_after(self._full_since)
            self._full_since = 0.0
        seq = max(self._dispatch_seq, position.next_seq)
        limit = end + self._lookahead if end < ENDLESS else ENDLESS
        pending_seqs, ahead = self._pending, position.ahead
        workers = self.workers
        only = workers[0] if len(workers) == 1 else None
        batches: dict[Any, list[Order]] = {}
        while free and seq < limit:
            if seq in pending_seqs or (ahead and seq in ahead):
                seq += 1
                continue
            worker = only or min(workers, key=_load)
            load = len(worker.outstanding)
            if load >= worker.capacity or (worker not in batches and load > worker.capacity // 2):
                break
            if worker.on_demand and (self._ready or self._failed):
                # It fills in the caller's thread when the caller waits: an order placed
                # before it is needed would only take a slot early (and a cache-cold one:
                # the caller has not let go of its previous batch yet).
                break
            batches.setdefault(worker, []).append(self._order(seq, worker))
            seq += 1
            free -= 1
        self._dispatch_seq = seq
        if not free and not self._full_since and seq < limit:
            self._full_since = time.perf_counter()
        for worker, orders in batches.items():
            try:
                worker.send(orders)
            except OSError:
                raise _supervisor.died(worker) from None

    def take(self, position: Position, end: int, ordered: bool) -> tuple[int, Ready] | None:
        """A ready batch for ``position``: the next in order, or with ``ordered=False`` any."""
        if ordered:
            candidates: Any = (position.next_seq,)
        else:
            candidates = sorted(s for s in itertools.chain(self._ready, self._failed) if s < end)
        for seq in candidates:
            ready = self._ready.pop(seq, None)
            if ready is not None:
                self._pending.discard(seq)
                return seq, ready
            if seq in self._failed:
                self._pending.discard(seq)
                raise self._failed.pop(seq)
        return None

    def wait(self) -> None:
        """Block until a worker reports (the reports are taken in) or a wake-up."""
        if not self._orders:
            raise LoaderError("internal: nothing in flight and nothing ready")  # pragma: no cover
        started = time.perf_counter()
        reports = self.supervisor.wait()
        ended = time.perf_counter()
        self.blocked_s += ended - started
        if self.tracer is not None:
            self.tracer.span("wait for workers", started, ended)
        for worker, message in reports:
            self._on_message(worker, message)
        if self._timeout is not None:
            self._check_progress()

    # ---- a pool that changes (workers="auto") ------------------------------------------

    def add_workers(self, workers: list[_pool.Worker]) -> None:
        """Watch these started workers, and give them orders once they serve (a process
        takes a while to start: orders waiting in its pipe would hold up delivery)."""
        for worker in workers:
            self.supervisor.add(worker)
        self.starting += workers
        self._admit()

    def _admit(self) -> None:
        ready = [w for w in self.starting if not self.workers or self.board.serving(w.worker_id)]
        self.starting = [w for w in self.starting if w not in ready]
        self.workers += ready

    def retire(self, worker: _pool.Worker) -> None:
        """No new orders for ``worker``; it is stopped once its orders are answered."""
        self.workers.remove(worker)
        if worker.outstanding:
            self.retiring.append(worker)
        else:
            self._let_go(worker)

    def _let_go(self, worker: _pool.Worker) -> None:
        # End of file on its order pipe makes it exit; its exit is no failure now, so it
        # leaves the selector first. It is reaped (and its pipes closed) at close.
        self.supervisor.remove(worker)
        if isinstance(worker, _pool.WorkerHandle):
            _pool.close_quietly(worker.orders)
        self.retired.append(worker)

    # ---- bookkeeping --------------------------------------------------------------------

    def _make_room(self, needed: int) -> None:
        # Dispatch goes lowest first, so the needed batch is normally ordered already. After
        # a restart to an earlier position, ready batches above it may fill every slot the
        # workers have: the highest gives its slot back (it is a function of its number and
        # will be filled again when its turn comes).
        if needed in self._pending or not self._ready:
            return
        victim = max(self._ready)
        if victim > needed:
            self.table.discard(self._ready.pop(victim).slot)
            self._pending.discard(victim)

    def _order(self, seq: int, worker: _pool.Worker) -> Order:
        epoch, number = divmod(seq, self._bpe)
        batch = self._sampler.batch(epoch, number)
        slot = self.table.order()
        order_id = next(self._order_ids)
        self._orders[order_id] = _Order(seq, slot, worker, batch.indices)
        self._pending.add(seq)
        worker.outstanding.append(order_id)
        return Order(order_id, slot, epoch, number, batch.indices, batch.first_position)

    def _on_message(self, worker: _pool.Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "warn":
            if not self._warned_frameworks:
                self._warned_frameworks = True
                log.warning(message[1])
            return
        order_id = message[1]
        if order_id == -1:
            raise _supervisor.failed_to_start(worker, message)
        order = self._orders.pop(order_id)
        if worker.outstanding[0] == order_id:
            worker.outstanding.popleft()
        else:
            worker.outstanding.remove(order_id)
        if self.retiring and not worker.outstanding and worker in self.retiring:
            self.retiring.remove(worker)
            self._let_go(worker)
        if kind == "done":
            _, _, count, objects, skipped, trace, shapes = message
            if trace is not None and self.on_trace is not None:
                self.on_trace(worker, order.seq, trace)
            self._check_header(order, count)
            if order.stale:
                self.table.discard(order.slot)
                return
            self.table.filled(order.slot)
            self._ready[order.seq] = Ready(order.slot, count, objects, skipped, order.indices, shapes)
            return
        self.table.discard(order.slot)
        if not order.stale:
            self._failed[order.seq] = _supervisor.record_failed(worker, message, *divmod(order.seq, self._bpe))

    def _check_header(self, order: _Order, count: int) -> None:
        assert self._headers is not None
        header = self._headers[order.slot]
        epoch, number = divmod(order.seq, self._bpe)
        if (header[H_MAGIC], header[H_EPOCH], header[H_NUMBER], header[H_COUNT]) != (MAGIC, epoch, number, count):
            raise LoaderError(  # pragma: no cover - guards the slot protocol itself
                f"slot {order.slot} header {header[:5].tolist()} does not match batch {number} of "
                f"epoch {epoch} with {count} items: the ring was written out of turn"
            )

    def _check_progress(self) -> None:
        assert self._timeout is not None and self._headers is not None
        now = time.monotonic()
        for worker in (*self.workers, *self.retiring):
            if not worker.outstanding or (worker.process is None and worker.thread is None):
                continue
            order = self._orders.get(worker.outstanding[0])  # the one it is filling
            if order is None:
                continue
            progress = int(self._headers[order.slot, H_PROGRESS])
            if progress != order.progress:
                order.progress, order.progress_at = progress, now
            elif now - order.progress_at >= self._timeout:
                indices = order.indices
                index = int(indices[min(progress, len(indices) - 1)]) if len(indices) else None
                raise _supervisor.hung(worker, now - order.progress_at, self._timeout, index,
                                       *divmod(order.seq, self._bpe))

    # ---- shutdown -----------------------------------------------------------------------

    def close(self, grace: float = 0.5) -> None:
        """Stop the workers and release the ring, after any thread driving the scheduler left.

        A thread waiting for workers is woken and leaves at once. One that is filling a
        batch itself (``workers=0``) cannot be interrupted: then this warns, naming it, and
        the release happens when that thread leaves.
        """
        if self.closed:
            return
        self.closed = True
        self.supervisor.wake()
        if not self.drive.acquire(timeout=_LEAVE_S):
            driver = next((t.name for t in threading.enumerate() if t.ident == self.driver), self.driver)
            warn(
                f"Loader.close(): thread {driver!r} is still inside the loader, filling a "
                "batch in that thread (workers=0 runs the source in the thread that iterates), "
                "and cannot be interrupted; the ring is released as soon as that batch is done.")
            self._release_when_left = grace
            return
        try:
            self._release(grace)
        finally:
            self.drive.release()

    def left(self) -> None:
        """The driving thread has released ``drive``: finish a close() that had to wait for it."""
        if self._release_when_left is not None:
            with self.drive:
                grace, self._release_when_left = self._release_when_left, None
                if grace is not None:
                    self._release(grace)

    def _release(self, grace: float) -> None:
        workers, self.workers = [*self.workers, *self.starting, *self.retiring, *self.retired], []
        self.starting, self.retiring, self.retired, self.tuner = [], [], [], None
        _pool.stop(workers, grace)
        self.supervisor.close()
        self._ready.clear()
        self._orders.clear()
        self.table.reclaim()
        self.table.discard_unleased()  # only the consumer's leases outlive the loader
        self._headers = None  # our own views of the ring: drop them so the mapping can close
        self.board.close()
        self.ring.close()


def stage_times(scheduler: Scheduler, wait_s: float) -> dict[str, Any]:
    """The per-stage part of ``Loader.stats()``: the caller's wait split up, the workers' times."""
    table = scheduler.board.table()
    times: dict[str, Any] = {"blocked_s": scheduler.blocked_s, "handoff_s": max(0.0, wait_s - scheduler.blocked_s),
                             "held_s": scheduler.held_s, **worker_totals(table)}
    times["fill_s"] = times["read_s"] + times["transform_s"] + times["write_s"]
    times["per_worker"] = per_worker(table)
    return times
