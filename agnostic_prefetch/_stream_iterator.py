"""The iterator of a loader over a stream: the workers' batches in turn, epoch after epoch.

What ``iter(loader)`` returns when the source is a stream: a
:class:`~agnostic_prefetch._iterator.LoaderIterator` (the same hand-out, stats, cancel and
``state_dict``) whose next batch is the next turn's (``_stream_position.py``), a worker
whose stream ended dropping out, and whose epoch ends when every stream has (or at the
stream's ``batches_per_epoch``).
"""

from __future__ import annotations

import logging
from typing import Any

from agnostic_prefetch._core import CLOSED, Cursor
from agnostic_prefetch._iterator import LoaderIterator
from agnostic_prefetch._resume import ENDLESS
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._stream_schedule import PAD, StreamScheduler
from agnostic_prefetch.errors import LoaderError

log = logging.getLogger("agnostic_prefetch")

__all__ = ["StreamIterator"]


class StreamIterator(LoaderIterator):
    """What ``iter(loader)`` returns over a stream (see :class:`LoaderIterator`)."""

    def _next_batch(self, scheduler: Scheduler, cursor: Cursor) -> Any:
        assert isinstance(scheduler, StreamScheduler)
        end = cursor.end
        batch_size = self._layout.batch_size
        drop = self._core.sampler.drop_remainder
        while True:
            if scheduler.closed:
                raise LoaderError(CLOSED)
            if cursor.ended:
                raise StopIteration
            position: Any = cursor.position
            if position.epoch >= end:
                cursor.position = position._replace(end=None)  # no iteration in progress
                cursor.ended = True
                raise StopIteration
            if scheduler.epoch_over(position):
                if position.batches == 0 and end >= ENDLESS:
                    raise LoaderError(
                        f"{self._core.stream!r} yielded no batch in epoch {position.epoch} (every worker's "  # type: ignore[attr-defined]
                        "stream ended at once); with epochs=None the loader would start empty epochs "
                        "forever. Check the stream, or give epochs= a number.")
                cursor.position = position.next_epoch()
                scheduler.new_epoch(position.epoch + 1)
                continue
            scheduler.dispatch(position, end)
            taken = scheduler.take(position, end)
            if taken is None:
                scheduler.wait()
                continue
            ready = taken.ready
            if taken.worker == PAD:
                cursor.position = position._replace(batches=position.batches + 1)
            else:
                count = ready.count if ready is not None else 0
                delivered = count > 0 and not (drop and count < batch_size)
                cursor.position = position.after(taken.worker, taken.ended, taken.state, delivered)
                if ready is not None:
                    for index, reason in ready.skipped:
                        log.warning("skipped item %d (on_error='skip'): %s", index, reason)
                    self._stats["skipped"] += len(ready.skipped)
                if not delivered:
                    if ready is not None:
                        scheduler.discard(ready)
                    continue
            assert ready is not None
            self._stats["batches"] += 1
            self._stats["items"] += ready.count
            rows = ready.count
            if self._padded:
                rows = batch_size
                self._stats["padded"] += rows - ready.count
            return self._deliver(scheduler, ready, rows)
