"""Watching workers' progress: a stall is logged once with the worker's stack; a hang is an error.

Each worker counts the items of the batch it fills in its slot's header (``H_PROGRESS``).
A counter that does not move for ``stall_warning`` seconds (default 60) is logged as a
WARNING naming the worker, the record it is on and its Python stack, once per stall (it
warns again only after progress resumes and stops again); one that does not move for
``timeout`` seconds, when given, is a ``LoaderTimeoutError``. Nothing hangs silently, and
nothing is an error unless asked for. The supervisor wakes the wait often enough for either
(a quarter of the shorter one), since a counter in shared memory signals no descriptor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agnostic_prefetch import _supervisor
from agnostic_prefetch._layout import H_PROGRESS

__all__ = ["ProgressWatch"]

log = logging.getLogger("agnostic_prefetch")


class ProgressWatch:
    """Compares each busy worker's progress counter with what it was, at most every ``period``.

    Called by the thread driving the scheduler only.

    Args:
        timeout: seconds without progress that make an error, or ``None``.
        stall_warning: seconds without progress that make a warning, or ``None``.
        words: the ring's slot headers as int64 words (slot ``s``'s word ``w`` at
            ``s * words_per_slot + w``).
        words_per_slot: int64 words per slot.
        locate: where record ``index`` comes from (the source's ``locate``), or ``None``.
        batch_of: a batch's epoch and number from its sequence number (``Scheduler.epoch_number``).
    """

    def __init__(self, timeout: float | None, stall_warning: float | None, words: Any, words_per_slot: int,
                 locate: Callable[[int], str] | None, batch_of: Callable[[int], tuple[int, int]]) -> None:
        self.period = self.period_for(timeout, stall_warning)
        self._timeout, self._stall = timeout, stall_warning
        self._words, self._per_slot = words, words_per_slot
        self._locate = locate
        self._batch_of = batch_of
        self._next = 0.0

    @staticmethod
    def period_for(timeout: float | None, stall_warning: float | None) -> float | None:
        """How often to look: a quarter of the shorter limit (``None``: never)."""
        limits = [t for t in (timeout, stall_warning) if t is not None]
        return min(limits) / 4 if limits else None

    def check(self, watched: Iterable[Any], orders: Mapping[int, Any]) -> None:
        """Look at the workers now, if a period has passed since the last look.

        Raises:
            LoaderTimeoutError: a worker made no progress for ``timeout``.
        """
        now = time.monotonic()
        if self.period is None or now < self._next:
            return
        self._next = now + self.period
        for worker in watched:
            if not worker.outstanding or (worker.process is None and worker.thread is None):
                continue  # idle, or the caller itself (workers=0): it cannot be watched
            order = orders.get(worker.outstanding[0])  # the one it is filling
            if order is None:
                continue
            progress = self._words[order.slot * self._per_slot + H_PROGRESS]
            if progress != order.progress:
                order.progress, order.progress_at, order.warned = progress, now, False
                continue
            stalled = now - order.progress_at
            if self._timeout is not None and stalled >= self._timeout:
                raise _supervisor.hung(worker, stalled, self._timeout, *self._record(order, progress),
                                       *self._batch_of(order.seq))
            if self._stall is not None and stalled >= self._stall and not order.warned:
                order.warned = True
                log.warning("%s", _supervisor.stalled(worker, stalled, self._stall, *self._record(order, progress),
                                                      *self._batch_of(order.seq)))

    def _record(self, order: Any, progress: int) -> tuple[int | None, str | None]:
        """The record a worker is on, and where it comes from (``None``: padding only)."""
        indices = order.indices
        if not len(indices):
            return None, None
        index = int(indices[min(progress, len(indices) - 1)])
        try:
            where = self._locate(index) if self._locate is not None else None
        except Exception:
            where = None
        return index, where
