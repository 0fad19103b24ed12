"""Batches in flight for the torch and CuPy stagers: read ahead, hand out in order, track leases.

A *placement* turns one host batch into device arrays and returns a ``done()`` check for
its copy. The host batch (and with it its ring slot) is kept until that copy has completed,
which on CUDA may be after the batch was handed out: the consumer's stream waits on an
event, the host does not.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Placement(Protocol):
    def put(self, host: Any) -> tuple[Any, Callable[[], bool]]: ...
    def hand_out(self, device: Any) -> None: ...
    def close(self) -> None: ...


class InFlight:
    """Iterator over device batches, ``size`` ahead of the caller, with the caller's ``state_dict()``.

    Args:
        iterable: host batches; if it has ``state_dict`` (a ``Loader``), the position after
            each pulled batch travels with that batch.
        size: batches kept in flight (>= 1).
        placement: how a batch reaches the device (see module docstring).
    """

    def __init__(self, iterable: Iterable[Any], size: int, placement: Placement) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (batches kept in flight), got {size}")
        self.size = int(size)
        self._placement = placement
        self._state_of = getattr(iterable, "state_dict", None)  # before iter(): the Loader's own
        self._state = self._state_of() if self._state_of is not None else None
        self._source = iter(iterable)
        self._queue: collections.deque[tuple[Any, Any, Any, Callable[[], bool]]] = collections.deque()
        self._copying: list[tuple[Any, Callable[[], bool]]] = []  # handed out, copy not yet done
        self._exhausted = False
        # Dropped without close(): still wait for pending copies before the host batches
        # (ring slots) they read from go back to the loader. Runs before attributes clear.
        self._finalizer = weakref.finalize(self, placement.close)
        self._fill(self.size)

    def _fill(self, n: int) -> None:
        while n > 0 and not self._exhausted:
            try:
                host = next(self._source)
            except StopIteration:
                self._exhausted = True
                return
            state = self._state_of() if self._state_of is not None else None
            device, done = self._placement.put(host)
            self._queue.append((device, host, state, done))
            n -= 1

    def __iter__(self) -> InFlight:
        return self

    def __next__(self) -> Any:
        # Leases end once their copies are done: a cheap query, never a wait.
        self._copying = [(h, done) for h, done in self._copying if not done()]
        if not self._queue:
            self.close()  # the end: undo the page-locking now, not when this object dies
            raise StopIteration
        device, host, state, done = self._queue.popleft()
        self._fill(1)  # start the next copy before the caller's step
        if not done():
            self._copying.append((host, done))
        self._placement.hand_out(device)
        self._state = state
        return device

    def state_dict(self) -> dict[str, Any] | None:
        """The source's position after the batches handed out so far (``None`` without one)."""
        return self._state

    def close(self) -> None:
        """Drop the batches in flight and release what the placement holds (page-locking)."""
        # placement.close() first (once): it waits for the copies still reading the host
        # batches, so their ring slots go back to the loader only after that.
        self._finalizer()
        self._queue.clear()
        self._copying.clear()

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
