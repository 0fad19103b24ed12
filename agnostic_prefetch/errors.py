"""Errors the loader raises: each names the worker, batch or record involved and the remedy."""

from __future__ import annotations


class LoaderError(RuntimeError):
    """Base class of the loader's runtime failures."""


class WorkerError(LoaderError):
    """A record failed in a worker; carries the worker's traceback and the record index.

    Attributes:
        index: the record index that failed (``None`` if the failure was not in a record).
        epoch, batch: the batch being filled.
        worker_traceback: the traceback text from the worker.
    """

    def __init__(self, message: str, *, index: int | None, epoch: int, batch: int,
                 worker_traceback: str) -> None:
        super().__init__(message)
        self.index = index
        self.epoch = epoch
        self.batch = batch
        self.worker_traceback = worker_traceback


class WorkerDiedError(LoaderError):
    """A worker process exited without being asked to (a signal, an OOM kill, ``os._exit``)."""


class LoaderTimeoutError(LoaderError, TimeoutError):
    """A worker made no progress for ``timeout`` seconds; the message holds its stack."""


class LayoutError(ValueError):
    """An example does not fit the slot layout (other keys, shape or dtype)."""


class RingTooLargeError(MemoryError):
    """The ring would not fit in the memory this machine (or container) can give it."""
