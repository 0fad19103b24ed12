"""The scheduler's part that survives a dead worker: replace it, fill its batches again, find a
record that kills (``_recovery.py`` keeps the account; docs/design.md tells the whole story).

A mixin of :class:`~agnostic_prefetch._schedule.Scheduler`, kept apart so that the
scheduler's own module stays about ordering; its methods run in the driving thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from agnostic_prefetch import _supervisor
from agnostic_prefetch._layout import H_EPOCH, H_MAGIC, H_NUMBER, H_PROGRESS, MAGIC
from agnostic_prefetch._orders import Order
from agnostic_prefetch._recovery import CULPRIT, PROBE, Death, Recovery, now, warn_death
from agnostic_prefetch.errors import WorkerDiedError

if TYPE_CHECKING:
    from agnostic_prefetch import _pool
    from agnostic_prefetch._inflight import InFlight

__all__ = ["Redo"]


class Redo:
    """Worker replacement for the scheduler (its fields, and ``epoch_number``, ``_new_order``
    and ``_send_order``, are the scheduler's)."""

    _recovery: Recovery | None
    _poison: set[int]  # records found to kill their worker, left out (on_error="skip")
    _orders: dict[int, InFlight]
    _pending: set[int]
    _dispatch_seq: int
    _headers: memoryview | None
    _words_per_slot: int
    _sampler: Any
    _locate: Any
    table: Any
    members: Any

    def _on_death(self, worker: _pool.Worker) -> None:
        """``worker`` died: replace it and fill its unfinished batches again, or raise.

        Raises:
            WorkerDiedError: replacing is off (``max_worker_deaths=0``), the worker is a
                thread or the caller, too many died, or a record kills its worker and
                ``on_error="raise"``.
        """
        recovery = self._recovery
        if recovery is None or worker.process is None:
            raise _supervisor.died(worker)
        reason = recovery.reason(_supervisor.final_reason(worker))
        orders = [self._orders.pop(i) for i in list(worker.outstanding) if i in self._orders]
        worker.outstanding.clear()
        seq = record = step = None
        probe = False
        # Oldest first, the worker fills them in turn: the first one begun and not finished is
        # the one it died in (an older one may be finished with its answer still unread).
        for order in orders:
            step = None if order.stale else self._item_on(order)
            if step is not None:
                seq, record, probe = order.seq, int(order.indices[step]), order.probe
                break
        words = self._headers
        for order in orders:  # a redone batch's slot must not show the dead worker's progress
            if words is not None:
                words[order.slot * self._words_per_slot + H_MAGIC] = 0
            self.table.discard(order.slot)
        redo = sorted({o.seq for o in orders if not o.stale})
        death = Death(now(), worker.describe(), reason, [self.epoch_number(s) for s in redo],  # type: ignore[attr-defined]
                      None if record is None else self._record_name(record))
        action = recovery.died(death, seq, record, probe)
        if action == PROBE and self._sampler.batch(*self.epoch_number(seq)).plan is not None:
            action = CULPRIT  # a sequence batch's item cannot be read alone into a row: twice is enough
        new = self.members.replace(worker)
        if action == CULPRIT:
            assert seq is not None and record is not None
            self._blame(seq, record, death)
        for s in redo:
            self._pending.discard(s)
            self._dispatch_seq = min(self._dispatch_seq, s)
        if action == PROBE:
            assert seq is not None and step is not None
            self._probe(seq, step, new)
        recent = sum(1 for d in recovery.deaths if d.at > death.at - 60 and not d.blamed)
        warn_death(death, new.describe() if new is not None else "no worker (it was retiring)", recent,
                   recovery.max_deaths)

    def deaths(self) -> list[dict[str, object]]:
        """Every worker death survived so far (``stats()["deaths"]``)."""
        return [] if self._recovery is None else [d.as_dict() for d in self._recovery.deaths]

    def _item_on(self, order: InFlight) -> int | None:
        """The item (its place in the batch) a dead worker was filling, if it had begun."""
        words = self._headers
        if words is None:
            return None
        at = order.slot * self._words_per_slot
        epoch, number = self.epoch_number(order.seq)
        if (words[at + H_MAGIC], words[at + H_EPOCH], words[at + H_NUMBER]) != (MAGIC, epoch, number):
            return None  # it had not begun this batch
        step = int(words[at + H_PROGRESS])
        return step if 0 <= step < len(order.indices) else None

    def _probe(self, seq: int, step: int, worker: _pool.Worker | None) -> None:
        """Read the suspected record alone, with its draws, in a fresh worker; the batch waits."""
        epoch, number = self.epoch_number(seq)
        batch = self._sampler.batch(epoch, number)
        position = int(batch.item_positions[step]) if batch.item_positions is not None else batch.first_position + step
        worker = worker or self.members.serving[0]
        self._pending.add(seq)  # not ordered again until the probe answers
        slot = self.table.order()
        indices = np.array([batch.indices[step]], np.int64)
        order = self._new_order(seq, slot, worker, indices, probe=True)  # type: ignore[attr-defined]
        self._send_order(worker, [Order(order, slot, epoch, number, indices, position)])  # type: ignore[attr-defined]

    def _probe_answered(self, order: InFlight) -> None:
        """The record read alone did not kill its worker: the deaths came from outside."""
        self.table.discard(order.slot)
        assert self._recovery is not None
        self._recovery.cleared(int(order.indices[0]))
        self._pending.discard(order.seq)
        self._dispatch_seq = min(self._dispatch_seq, order.seq)

    def _blame(self, seq: int, record: int, death: Death) -> None:
        """``record`` kills its worker: raise, or leave it out from now on (``on_error="skip"``)."""
        assert self._recovery is not None
        epoch, number = self.epoch_number(seq)
        sequence = self._sampler.batch(epoch, number).plan is not None
        if self._recovery.skip and not sequence:
            self._poison.add(record)
            return
        raise WorkerDiedError(
            f"{death.record} kills the worker that reads it: {death.worker} {death.reason} on it while filling "
            f"batch {number} of epoch {epoch}, and so did the workers before it"
            + (" (read alone, too)" if not sequence else "")
            + ". The loader has stopped. "
            + ("on_error='skip' leaves such a record out and goes on; " if not sequence else
               "A record inside packed or padded sequence rows cannot be left out by itself; ")
            + "or fix or remove the record (load_state_dict resumes exactly in a new loader).")

    def _record_name(self, record: int) -> str:
        where = None
        if self._locate is not None:
            try:
                where = self._locate(record)
            except Exception:
                where = None
        return f"record {record}" + (f" ({where})" if where else "")
