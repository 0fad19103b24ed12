"""Scheduling a stream: each worker is ordered its own next batches, in the order they are taken.

A map-style batch is a function of its number and any worker may fill it; a stream's batch
``j`` of worker ``w`` is whatever ``w``'s stream yields next, so every order goes to its
worker, in sequence, and a batch that was ordered cannot be dropped and filled again later
(only a restart of the stream from a saved state can go back). Orders go out lowest turn
first (``(epoch, j, w)``), so the batch the caller needs next is never kept from a slot by
batches it needs later; a worker whose stream ended may start the next epoch's early.

Batch keys (``seq``) pack ``(epoch, worker, j)`` into one integer, so the scheduler's
bookkeeping (ready and failed batches, the slot header check, traces) works unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agnostic_prefetch import _supervisor
from agnostic_prefetch._inflight import InFlight, Ready
from agnostic_prefetch._messages import Done, Message
from agnostic_prefetch._orders import PAD_ONLY, RESTART, Order
from agnostic_prefetch._resume import ENDLESS
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._stream_position import StreamPosition

__all__ = ["PAD", "StreamScheduler", "Taken"]

_J_BITS, _W_BITS = 40, 12
_J_MASK, _W_MASK = (1 << _J_BITS) - 1, (1 << _W_BITS) - 1
PAD = _W_MASK  # the "worker" of a batch of padding only
_NO_ITEMS = np.zeros(0, np.int64)


def key(epoch: int, worker: int, j: int) -> int:
    return (epoch << (_J_BITS + _W_BITS)) | (worker << _J_BITS) | j


def _unkey(seq: int) -> tuple[int, int, int]:
    return seq >> (_J_BITS + _W_BITS), (seq >> _J_BITS) & _W_MASK, seq & _J_MASK


class Taken:
    """What :meth:`StreamScheduler.take` found: worker ``worker``'s next batch (``ready``:
    ``None`` for no batch, its stream having ended), whether its stream ended with it, and
    the stream's state after it."""

    __slots__ = ("ended", "ready", "state", "worker")

    def __init__(self, worker: int, ready: Ready | None, ended: bool, state: Any) -> None:
        self.worker, self.ready, self.ended, self.state = worker, ready, ended, state


class StreamScheduler(Scheduler):
    """A :class:`~agnostic_prefetch._schedule.Scheduler` whose workers each fill their own stream.

    Extra args:
        workers: the worker count (the stream's parts).
        batches_per_epoch: the stream's fixed epoch length, or ``None``.
        pad: ``remainder="pad"``: an epoch of ``batches_per_epoch`` is made up with batches
            of padding only.
    """

    def __init__(self, *args: Any, workers: int, batches_per_epoch: int | None, pad: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._workers = max(1, workers)
        self._cap = batches_per_epoch
        self._pad = pad
        self._next: list[tuple[int, int]] = [(0, 0)] * self._workers  # each worker's next batch to order
        self._reopen: dict[int, Any] = {}  # worker -> the state its next order restarts its stream from
        self._ends: dict[tuple[int, int], int] = {}  # (epoch, worker) -> batches its stream has
        self._streams: dict[int, tuple[bool, Any]] = {}  # seq -> (ended, state) of a ready batch
        self._ahead_limit = max(1, len(self.table) - 2 * self._workers - 1)

    def epoch_number(self, seq: int) -> tuple[int, int]:
        epoch, _, j = _unkey(seq)
        return epoch, j

    # ---- what an iterator calls, holding ``drive`` ------------------------------------------

    def restart(self, position: StreamPosition, end: int, reset: bool = True) -> None:  # type: ignore[override]
        """Serve ``position`` from now on. ``reset``: it is not where the workers' streams
        stand (a resume): everything ordered is dropped and every stream restarts from
        ``position``'s states; else (the same iteration continued) everything is kept."""
        if not reset:
            return
        for order in self._orders.values():
            order.stale = True
        for ready in self._ready.values():
            self._drop(ready)
        self._ready.clear()
        self._failed.clear()
        self._pending.clear()
        self._streams.clear()
        self._ends = {(position.epoch, w): e for w, e in enumerate(position.ends) if e is not None}
        for w in range(self._workers):
            self._next[w] = ((position.epoch + 1, 0) if position.exhausted(w)
                             else (position.epoch, position.taken[w]))
            self._reopen[w] = position.states[w] if self._next[w][0] == position.epoch else None

    def new_epoch(self, epoch: int) -> None:
        """The caller moved on to ``epoch``: what was ordered for earlier ones is let go."""
        for order in self._orders.values():
            if _unkey(order.seq)[0] < epoch and not order.stale:
                order.stale = True
                self._pending.discard(order.seq)
        for seq in [s for s in self._ready if _unkey(s)[0] < epoch]:
            self._drop(self._ready.pop(seq))
            self._pending.discard(seq)
            self._streams.pop(seq, None)
        self._ends = {k: v for k, v in self._ends.items() if k[0] >= epoch}
        self._next = [max(n, (epoch, 0)) for n in self._next]

    def dispatch(self, position: StreamPosition, end: int) -> None:  # type: ignore[override]
        """Order each worker's next batches, lowest turn first, while slots and workers have room."""
        table = self.table
        table.reclaim()
        free = table.free
        if free and self._full_since:
            self.held_s += self.board.idle_after(self._full_since)
            self._full_since = 0.0
        by_id = {w.worker_id: w for w in self.members.serving}
        epoch = position.epoch
        limit = end + 1 if end < ENDLESS else ENDLESS  # one epoch ahead: no drain between iterations
        ahead = -1  # batches ordered for later epochs: counted when one is considered
        batches: dict[Any, list[Order]] = {}
        if self._needs_padding(position) and free:
            seq = key(epoch, PAD, position.batches)
            if seq not in self._pending:
                worker = by_id[0] if 0 in by_id else next(iter(by_id.values()))
                batches[worker] = [self._stream_order(seq, worker, PAD_ONLY)]
                free -= 1
        ahead_count = [ahead]

        def orderable(w: int) -> tuple[int, int] | None:
            """Worker ``w``'s next batch to order, if one may be ordered now (slots aside)."""
            e, j = self._next[w]
            stop = self._ends.get((e, w))
            if stop is not None and j >= stop:  # its stream ended: on to the next epoch's
                self._next[w] = (e, j) = (e + 1, 0)
            if e >= limit or (self._cap is not None and j >= self._cap):
                return None
            if e > epoch:
                if ahead_count[0] < 0:
                    ahead_count[0] = sum(1 for s in self._pending if _unkey(s)[0] > epoch)
                if ahead_count[0] >= self._ahead_limit:
                    return None
            return e, j

        while free:
            # The worker whose next batch comes first, among those with room; it is then
            # topped up to its capacity in one write (each write wakes a worker).
            best = None
            for w in range(self._workers):
                worker = by_id.get(w)
                turn = orderable(w) if worker is not None else None
                if turn is None:
                    continue
                load = len(worker.outstanding)
                if load >= worker.capacity or (worker not in batches and load > worker.capacity // 2):
                    continue
                if worker.on_demand and self._takeable(position):
                    continue
                if best is None or (*turn, w) < best:
                    best = (*turn, w)
            if best is None:
                break
            w = best[2]
            worker = by_id[w]
            while free and len(worker.outstanding) < worker.capacity:
                turn = orderable(w)
                if turn is None:
                    break
                e, j = turn
                reopen = w in self._reopen
                state = self._reopen.pop(w, None)
                batches.setdefault(worker, []).append(
                    self._stream_order(key(e, w, j), worker, RESTART if reopen else 0, state))
                self._next[w] = (e, j + 1)
                if e > epoch:
                    ahead_count[0] += 1
                free -= 1
        if not free and not self._full_since:
            self._full_since = time.perf_counter()
        for worker, orders in batches.items():
            try:
                worker.send(orders)
            except OSError:
                raise _supervisor.died(worker) from None

    def take(self, position: StreamPosition, end: int) -> Taken | None:  # type: ignore[override]
        """The next batch for ``position``: the next turn's, or with ``ordered=False`` any
        worker's next that is ready. ``None``: none yet (wait)."""
        epoch = position.epoch
        if self._needs_padding(position):
            seq = key(epoch, PAD, position.batches)
            ready = self._ready.pop(seq, None)
            if ready is not None:
                self._pending.discard(seq)
                return Taken(PAD, ready, False, None)
            return self._raise_failed(seq)
        turn = position.turn()
        if turn is None:
            return None
        candidates = [turn] if self._ordered else sorted(
            (w for w in range(self._workers) if not position.exhausted(w)), key=lambda w: (position.taken[w], w))
        for w in candidates:
            j = position.taken[w]
            seq = key(epoch, w, j)
            ready = self._ready.pop(seq, None)
            if ready is not None:
                self._pending.discard(seq)
                ended, state = self._streams.pop(seq)
                return Taken(w, ready, ended, state)
            self._raise_failed(seq)
            stop = self._ends.get((epoch, w))
            if stop is not None and j >= stop:  # its stream ended before this batch
                return Taken(w, None, True, None)
        return None

    def epoch_over(self, position: StreamPosition) -> bool:
        """Whether ``position``'s epoch has delivered everything it will."""
        if self._cap is not None and position.batches >= self._cap:
            return True
        return position.turn() is None and not self._needs_padding(position)

    # ---- bookkeeping --------------------------------------------------------------------

    def _needs_padding(self, position: StreamPosition) -> bool:
        return (self._pad and self._cap is not None and position.turn() is None
                and position.batches < self._cap)

    def _raise_failed(self, seq: int) -> None:
        if seq in self._failed:
            self._pending.discard(seq)
            raise self._failed.pop(seq)

    def _takeable(self, position: StreamPosition) -> bool:  # type: ignore[override]
        turn = position.turn()
        if turn is None:
            return self._needs_padding(position) and key(position.epoch, PAD, position.batches) in self._ready
        seq = key(position.epoch, turn, position.taken[turn])
        return seq in self._ready or seq in self._failed or (
            self._ends.get((position.epoch, turn), ENDLESS) <= position.taken[turn])

    def _stream_order(self, seq: int, worker: Any, flags: int, state: Any = None) -> Order:
        epoch, _, j = _unkey(seq)
        slot = self.table.order()
        order_id = next(self._order_ids)
        self._orders[order_id] = InFlight(seq, slot, worker, _NO_ITEMS)
        self._pending.add(seq)
        worker.outstanding.append(order_id)
        return Order(order_id, slot, epoch, j, _NO_ITEMS, 0, stream_flags=flags, state=state)

    def _on_death(self, worker: Any) -> None:
        raise _supervisor.died(worker, "a stream's worker cannot be replaced with its batches redone, as its place "
                               "in its stream died with it; build a new loader (load_state_dict resumes a "
                               "stream that keeps state exactly)")

    def _on_message(self, worker: Any, message: Message) -> None:
        order = self._orders.get(message[0]) if type(message) is Done else None
        super()._on_message(worker, message)
        if order is None or order.stale:
            return
        epoch, w, j = _unkey(order.seq)
        ended, state = message.stream or (False, None)  # type: ignore[union-attr]
        if w != PAD and ended:
            count = message.count  # type: ignore[union-attr]
            self._ends[(epoch, w)] = j + 1 if count else j
        self._streams[order.seq] = (ended, state)
