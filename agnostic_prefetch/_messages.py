"""What a worker tells the loader: one small typed message per order, plus start-up failures.

Both ends use the named tuples below; on the pipe a message is a plain tuple of a tag and
its fields (:func:`encode`, :func:`decode`), since pickling a named tuple by its class costs
four times a plain one and a "done" travels per batch. Array data never travels here: it is
in the ring. The parent's side is ``_schedule.Scheduler`` (``Done``, ``Failed``, ``Note``)
and ``_supervisor`` (the wording of ``Failed`` and ``StartFailed``).

Parent to worker, orders travel as packed bytes instead (``_orders.pack_orders``): no pickling
on the per-batch path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Done", "Failed", "Message", "Note", "StartFailed", "decode", "encode"]


class Done(NamedTuple):
    """Order ``order_id`` is filled: ``count`` items are in its slot."""

    order_id: int
    count: int
    objects: list[list[Any]]  # per non-array leaf, its values (the slot holds the arrays)
    skipped: list[tuple[int, str]]  # records left out with on_error="skip": (index, reason)
    trace: tuple[float, float, list[Any] | None] | None  # (start, end, item spans) while a trace records
    shapes: list[tuple[int, ...]] | None  # per array leaf, with shapes="per_batch"
    overflow: list[Any] | None = None  # a batch larger than its slot: its array leaves, here
    stream: tuple[bool, Any] | None = None  # a stream's batch: (its stream ended, its state after it)


class Failed(NamedTuple):
    """Order ``order_id`` failed: in record ``index``, or outside any record (``None``)."""

    order_id: int
    index: int | None
    exception: BaseException | None  # None when it does not pickle
    description: str  # "KeyError: 'record 3 is corrupt'"
    traceback: str  # the worker's traceback text
    where: str | None = None  # where the record comes from, if the source says (locate)
    remedy: str | None = None  # the source's remedy for this failure, if it has one


class StartFailed(NamedTuple):
    """The worker could not start serving (``worker_init`` raised, the job did not unpickle)."""

    exception: BaseException | None
    description: str
    traceback: str


class Note(NamedTuple):
    """Something the worker noticed that the loader logs (once per loader)."""

    text: str


Message = Done | Failed | StartFailed | Note

_TYPES: tuple[type, ...] = (Done, Failed, StartFailed, Note)
_TAGS = {kind: tag for tag, kind in enumerate(_TYPES)}
_NEW = tuple.__new__


def encode(message: Message) -> tuple[Any, ...]:
    """``message`` as it travels: its tag, then its fields."""
    return (_TAGS[type(message)], *message)


def decode(raw: tuple[Any, ...]) -> Message:
    """The message a worker sent (the inverse of :func:`encode`).

    Example:
        >>> decode(encode(Note("hello")))
        Note(text='hello')
    """
    return _NEW(_TYPES[raw[0]], raw[1:])  # _make, less its length check: per batch
