"""Who drives a scheduler now, and a close that either releases at once or leaves it to that driver.

One thread drives a scheduler at a time: it dispatches, takes and waits while it holds the
:class:`Drive` (re-entrant, like an ``RLock``). ``close()`` from another thread must not
release the ring and workers under it: it wakes the driver, waits a moment for it to leave,
and if it does not (a ``workers=0`` fill cannot be interrupted), hands the release to the
driver, which runs it as it leaves. Handing over and leaving never lose the release
between them (see :class:`Drive`): nothing leaks, and nothing is released twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["Drive"]


class Drive:
    """A re-entrant drive with a hand-over for ``close()``.

    ``_lock`` (an ``RLock``) is held by the driving thread; ``owner`` and ``_depth`` change
    only in the thread that holds it. A release handed over waits in ``_handed``, a list
    (append and pop are atomic): a closer that waited in vain appends, then tries once
    more to take the drive; every thread that lets go of the drive looks at ``_handed``
    after it let go, and tries to take the drive back to run it. Whichever of them holds
    the drive pops the release and runs it; the others find the list empty. So a driver
    that leaves just as the closer gives up waiting cannot strand it.

    Example:
        >>> drive, done = Drive(), []
        >>> with drive:
        ...     with drive:  # re-entrant
        ...         pass
        >>> drive.close_or_hand_over(lambda: done.append(1), wait_s=0.1) is None, done
        (True, [1])
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.owner: int | None = None  # the ident of the driving thread (for messages)
        self._depth = 0
        self._handed: list[Callable[[], None]] = []

    def __enter__(self) -> Drive:
        self._lock.acquire()
        if not self._depth:
            self.owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(self, kind: type[BaseException] | None = None, exc: BaseException | None = None,
                 tb: TracebackType | None = None) -> None:
        self._depth -= 1
        if self._depth:
            self._lock.release()
            return
        self.owner = None
        self._lock.release()
        if self._handed:
            self._run_handed()

    def _run_handed(self) -> None:
        """Run a release handed over, holding the drive (if nobody else drives now: then
        that thread runs it as it leaves)."""
        if not self._lock.acquire(blocking=False):
            return
        self._depth += 1
        try:
            try:
                release = self._handed.pop()
            except IndexError:
                return  # another thread ran it
            release()
        finally:
            self._depth -= 1
            self._lock.release()

    def close_or_hand_over(self, release: Callable[[], None], wait_s: float) -> int | None:
        """Run ``release`` holding the drive, waiting up to ``wait_s`` for the driver to leave;
        if it does not, hand ``release`` to it and return its thread's ident (else ``None``)."""
        if self._lock.acquire(timeout=wait_s):
            self._depth += 1
            try:
                release()
            finally:
                self._depth -= 1
                self._lock.release()
            return None
        owner = self.owner
        self._handed.append(release)
        self._run_handed()  # the driver may have left between the wait and the append
        return (self.owner or owner) if self._handed else None
