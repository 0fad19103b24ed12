"""What the scheduler knows of a batch in flight (ordered, not yet answered) and of one ready."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from agnostic_prefetch import _pool

__all__ = ["InFlight", "Ready", "load"]


def load(worker: _pool.Worker) -> int:
    return len(worker.outstanding)


@dataclass(slots=True)
class InFlight:
    """An order sent and not yet answered: its batch, slot, worker, and its progress as last seen."""

    seq: int
    slot: int
    worker: _pool.Worker
    indices: np.ndarray
    stale: bool = False  # no position needs it any more: its result is thrown away
    progress: int = -1  # items filled when ``_progress`` last looked
    progress_at: float = field(default_factory=time.monotonic)  # when the progress last moved
    warned: bool = False  # this stall was logged
    probe: bool = False  # one record read alone: does it kill its worker? (_redo.py)


@dataclass(slots=True)
class Ready:
    """A filled batch waiting its turn: its slot, item count, list leaves and skipped records."""

    slot: int
    count: int
    objects: list[list[Any]]
    skipped: list[tuple[int, str]]  # counted and logged when the batch is delivered
    indices: np.ndarray  # the records ordered (skipped ones among them)
    shapes: list[tuple[int, ...]] | None = None  # per array leaf, with shapes="per_batch"
    outside: list[np.ndarray] | None = None  # array leaves of a batch larger than its slot
