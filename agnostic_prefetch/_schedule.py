"""Scheduling: orders to idle workers, lowest batch first; results kept by batch number; shutdown.

Everything here counts global batch sequence numbers (``seq``, see ``_resume.py``). The
scheduler knows which batches are ordered or ready, not who will take them: a loader
iterator asks it for the batches its own position needs, and when a new iterator takes over
(a second ``iter()``, ``load_state_dict``), :meth:`Scheduler.restart` keeps what the new
position still needs (the look-ahead into the next epoch, say) and drops the rest.

One thread drives the scheduler at a time, holding :attr:`Scheduler.drive` (``_drive.py``):
``close()`` from another thread wakes it and takes the drive, or hands it the release.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from agnostic_prefetch import _pool, _supervisor
from agnostic_prefetch._accounts import Board
from agnostic_prefetch._drive import Drive
from agnostic_prefetch._inflight import InFlight, Ready
from agnostic_prefetch._inflight import load as _load
from agnostic_prefetch._layout import H_COUNT, H_EPOCH, H_MAGIC, H_NUMBER, MAGIC
from agnostic_prefetch._membership import Membership
from agnostic_prefetch._messages import Done, Message, Note, StartFailed
from agnostic_prefetch._orders import Order
from agnostic_prefetch._progress import ProgressWatch
from agnostic_prefetch._recovery import Recovery
from agnostic_prefetch._redo import Redo
from agnostic_prefetch._resume import ENDLESS, Position
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._slots import SlotTable
from agnostic_prefetch._warn import warn
from agnostic_prefetch.errors import LoaderError, WorkerError
from agnostic_prefetch.sampler import Sampler

if TYPE_CHECKING:
    from agnostic_prefetch._autotune import Tuner
    from agnostic_prefetch.tracing import TraceLink

log = logging.getLogger("agnostic_prefetch")

# How long close() waits for the driving thread: a woken one leaves within microseconds; one
# filling a batch itself (workers=0) cannot be interrupted, and releases all as it leaves.
_LEAVE_S = 0.2


class Scheduler(Redo):
    """Orders, results and the wait for one loader's workers and ring; closes them.

    Threads: every method but :meth:`close` is called by the thread that holds
    :attr:`drive` (the driving thread); ``close()`` may come from any thread and takes the
    drive itself, or hands the release to the driver (``_drive.py``). ``closed`` is set
    once, by ``close()``, and read by the driver to leave. Every other field belongs to the
    driving thread.

    Args:
        sampler: what batch ``seq`` holds.
        ring, table: the ring and its slot table.
        members: the workers (``_membership.py``), with the supervisor every wait blocks in.
        board: the workers' accounting rows after the ring's slots.
        timeout, stall_warning: seconds a worker may go without progress before it is an
            error, or a warning (``_progress.py``); ``None``: never.
        locate: where a record comes from (the source's ``locate``), for those messages.
        lookahead: batches it may order past the end of an iteration (no drain between epochs).
        ordered: ``False``: any ready batch may be taken, not only the next in order.
        trace: the traces recording this loader (``tracing.TraceLink``).
        tuner: ``workers="auto"`` until it decides: its decision is applied here, once.
        on_released: called once the workers and ring are released, with whether every
            worker that ran in this process has ended (so what the source opened here
            may be let go).
    """

    def __init__(self, sampler: Sampler, ring: Ring, table: SlotTable, members: Membership, board: Board, *,
                 timeout: float | None, stall_warning: float | None, locate: Callable[[int], str] | None,
                 lookahead: int, ordered: bool, trace: TraceLink,
                 tuner: Tuner | None = None, on_released: Callable[[bool], None] | None = None,
                 max_deaths: int = 0, skip: bool = False) -> None:
        self.drive = Drive()
        self.closed = False
        self.blocked_s = 0.0  # the driving thread blocked waiting for workers
        self.held_s = 0.0  # worker-seconds without an order because every slot was taken
        self._full_since = 0.0  # when a dispatch last found no free slot (0: there was one)
        self.board = board
        self.ring = ring
        self.table = table
        self.members = members
        self._trace = trace
        self._tuner = tuner
        self._on_released = on_released
        self._sampler = sampler
        self._bpe = sampler.batches_per_epoch
        self._lookahead = lookahead
        self._ordered = ordered
        # Every slot's header words, read per batch: element reads of a memoryview cost a
        # fraction of numpy's scalar reads. Slot s's word w is at s * _words_per_slot + w.
        self._headers: memoryview | None = memoryview(ring.map)[: ring.extra_offset].cast("q")
        self._words_per_slot = ring.slot_bytes // 8
        self._progress = ProgressWatch(timeout, stall_warning, self._headers, self._words_per_slot, locate,
                                       self.epoch_number)
        self._orders: dict[int, InFlight] = {}
        self._order_ids = itertools.count()
        self._ready: dict[int, Ready] = {}
        self._failed: dict[int, WorkerError] = {}
        self._pending: set[int] = set()  # seqs ordered (not stale), ready or failed
        self._dispatch_seq = 0
        self._noted = False
        self._recovery = Recovery(max_deaths, skip) if max_deaths > 0 else None  # None: a death raises
        self._poison: set[int] = set()
        self._locate = locate

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
            self._drop(self._ready.pop(seq))
            self._pending.discard(seq)
        for seq in [s for s in self._failed if unwanted(s)]:
            del self._failed[seq]
            self._pending.discard(seq)
        self._dispatch_seq = position.next_seq

    def dispatch(self, position: Position, end: int) -> None:
        """Order batches, lowest first, while a slot is free and a worker has room.

        A worker is topped up to its capacity in one write once it is down to half of it:
        each write wakes a sleeping worker, which costs more than a tiny batch.

        Raises:
            LoaderError: ``workers="auto"`` could not apply its decision.
            WorkerDiedError: a worker's order pipe is closed.
        """
        if self._tuner is not None:
            self._step_tuner()
        members = self.members
        if members.starting:
            members.admit(self.board.serving)
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
        workers = members.serving
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
            if worker.on_demand and self._takeable(position, end):
                # It fills in the caller's thread when the caller waits: an order placed
                # before it is needed would only take a slot early (and a cache-cold one:
                # the caller has not let go of its previous batch yet).
                break
            order = self._order(seq, worker)
            if order is None:  # (Pack) past its epoch's end: on to the next epoch
                seq = (seq // self._bpe + 1) * self._bpe
                continue
            batches.setdefault(worker, []).append(order)
            seq += 1
            free -= 1
        self._dispatch_seq = seq
        if not free and not self._full_since and seq < limit:
            self._full_since = time.perf_counter()
        for worker, orders in batches.items():
            self._send_order(worker, orders)

    def _send_order(self, worker: _pool.Worker, orders: list[Order]) -> None:
        try:
            worker.send(orders)
        except OSError:  # it died: replaced now (or the loader stops), its orders filled again
            self._on_death(worker)

    def take(self, position: Position, end: int) -> tuple[int, Ready] | None:
        """A ready batch for ``position``: the next in order, or with ``ordered=False`` any."""
        if self._ordered:
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
        reports, dead = self.members.supervisor.wait()
        ended = time.perf_counter()
        self.blocked_s += ended - started
        if self._trace.tracers:
            self._trace.span("wait for workers", started, ended)
        for worker, message in reports:
            self._on_message(worker, message)
        for worker in dead:
            self._on_death(worker)
        self._progress.check(self.members.watched, self._orders)

    def wake(self) -> None:
        """Make the driving thread's wait return at once (any thread)."""
        self.members.supervisor.wake()

    # ---- workers="auto" ------------------------------------------------------------------

    def _step_tuner(self) -> None:
        tuner = self._tuner
        assert tuner is not None
        try:
            decision = tuner.step(self.board, self.blocked_s, self.held_s, self.members.pids)
            if decision is None:
                return
            self._tuner = None  # decided: dispatch pays nothing more
            self.members.resize(decision.workers, decision.backend)
        except LoaderError:
            self._tuner = None
            raise
        except Exception as exc:
            self._tuner = None
            raise LoaderError(f"workers='auto' could not change the pool as it decided "
                              f"({type(exc).__name__}: {exc}); the loader has stopped. Pass a "
                              "fixed workers= count to continue without it.") from exc

    # ---- bookkeeping --------------------------------------------------------------------

    def epoch_number(self, seq: int) -> tuple[int, int]:
        """The epoch and batch number that ``seq`` stands for."""
        return divmod(seq, self._bpe)

    def _drop(self, ready: Ready) -> None:
        """Let go of a ready batch nobody will take (its slot, if it is in one)."""
        if ready.outside is None:
            self.table.discard(ready.slot)

    def discard(self, ready: Ready) -> None:
        """A taken batch that will not be handed out (every record of it was skipped)."""
        self._drop(ready)

    def _takeable(self, position: Position, end: int) -> bool:
        """Whether :meth:`take` would find a batch for ``position`` now."""
        if self._ordered:
            return position.next_seq in self._ready or position.next_seq in self._failed
        return any(s < end for s in itertools.chain(self._ready, self._failed))

    def _make_room(self, needed: int) -> None:
        # Dispatch goes lowest first, so the needed batch is normally ordered already. After
        # a restart to an earlier position, ready batches above it may fill every slot the
        # workers have: the highest gives its slot back (it is a function of its number and
        # will be filled again when its turn comes).
        if needed in self._pending or not self._ready:
            return
        in_ring = [seq for seq, ready in self._ready.items() if ready.outside is None]
        victim = max(in_ring) if in_ring else needed
        if victim > needed:
            self._drop(self._ready.pop(victim))
            self._pending.discard(victim)

    def _order(self, seq: int, worker: _pool.Worker) -> Order | None:
        epoch, number = divmod(seq, self._bpe)
        batch = self._sampler.batch(epoch, number)
        if batch is None:
            return None
        slot = self.table.order()
        order_id = self._new_order(seq, slot, worker, batch.indices)
        indices, poisoned = batch.indices, False
        if self._poison and batch.plan is None and self._poison.intersection(indices.tolist()):
            indices, poisoned = np.array([-1 - i if i in self._poison else i for i in indices.tolist()]), True
        return Order(order_id, slot, epoch, number, indices, batch.first_position, batch.item_positions,
                     batch.plan, poisoned=poisoned)

    def _new_order(self, seq: int, slot: int, worker: _pool.Worker, indices: np.ndarray, probe: bool = False) -> int:
        """Note an order in flight (to ``worker``, into ``slot``); its id."""
        order_id = next(self._order_ids)
        self._orders[order_id] = InFlight(seq, slot, worker, indices, probe=probe)
        self._pending.add(seq)
        worker.outstanding.append(order_id)
        return order_id

    def _on_message(self, worker: _pool.Worker, message: Message) -> None:
        kind = type(message)
        if kind is Note:
            if not self._noted:
                self._noted = True
                log.debug("%s", message.text)
            return
        if kind is StartFailed:
            raise _supervisor.failed_to_start(worker, message)
        order_id = message[0]  # Done and Failed both start with it
        order = self._orders.pop(order_id)
        outstanding = worker.outstanding
        if outstanding[0] == order_id:
            outstanding.popleft()
        else:
            outstanding.remove(order_id)
        if self.members.retiring:
            self.members.answered(worker)
        if order.probe:
            self._probe_answered(order)
            return
        if kind is Done:
            _, count, objects, skipped, trace, shapes, overflow, _ = message
            if trace is not None and self._trace.tracers:
                self._trace.worker_batch(worker, *self.epoch_number(order.seq), trace)
            self._check_header(order, count)
            if order.stale or overflow is not None:  # (a batch larger than its slot came here)
                self.table.discard(order.slot)
                if order.stale:
                    return
            else:
                self.table.filled(order.slot)
            self._ready[order.seq] = Ready(order.slot, count, objects, skipped, order.indices, shapes, overflow)
            return
        self.table.discard(order.slot)
        if not order.stale:
            self._failed[order.seq] = _supervisor.record_failed(worker, message, *self.epoch_number(order.seq))

    def _check_header(self, order: InFlight, count: int) -> None:
        words = self._headers
        assert words is not None
        at = order.slot * self._words_per_slot
        epoch, number = self.epoch_number(order.seq)
        if (words[at + H_MAGIC], words[at + H_EPOCH], words[at + H_NUMBER], words[at + H_COUNT]) != (
                MAGIC, epoch, number, count):
            raise LoaderError(  # pragma: no cover - guards the slot protocol itself
                f"slot {order.slot} header {words[at : at + 5].tolist()} does not match batch {number} "
                f"of epoch {epoch} with {count} items: the ring was written out of turn"
            )

    # ---- shutdown -----------------------------------------------------------------------

    def close(self, grace: float = 0.5) -> None:
        """Stop the workers and release the ring, after any thread driving the scheduler left.

        A thread waiting for workers is woken and leaves at once. One that is filling a
        batch itself (``workers=0``) cannot be interrupted: then this warns, naming it, and
        that thread releases everything as it leaves.
        """
        if self.closed:
            return
        self.closed = True
        self.wake()
        driver = self.drive.close_or_hand_over(lambda: self._release(grace), _LEAVE_S)
        if driver is not None:
            name = next((t.name for t in threading.enumerate() if t.ident == driver), driver)
            warn(
                f"Loader.close(): thread {name!r} is still inside the loader, filling a "
                "batch in that thread (workers=0 runs the source in the thread that iterates), "
                "and cannot be interrupted; the ring is released as soon as that batch is done.")

    def _release(self, grace: float) -> None:
        self._tuner = None
        ended_here = self.members.stop(grace)
        self._ready.clear()
        self._orders.clear()
        self.table.reclaim()
        self.table.discard_unleased()  # only the consumer's leases outlive the loader
        if self._headers is not None:
            self._headers.release()  # our own view of the ring: let go so the mapping can close
        self._headers = None
        self.board.close()
        self.ring.close()
        if self._on_released is not None:
            self._on_released(ended_here)
