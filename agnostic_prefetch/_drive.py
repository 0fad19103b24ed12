"""Who drives a scheduler now, and a close that either releases at once or leaves it to that driver.

One thread drives a scheduler at a time: it dispatches, takes and waits while it holds the
:class:`Drive` (re-entrant, like an ``RLock``). ``close()`` from another thread must not
release the ring and workers under it: it wakes the driver, waits a moment for it to leave,
and if it does not (a ``workers=0`` fill cannot be interrupted), hands the release to the
driver, which runs it as it leaves. Both decisions are taken under one lock, so a driver
that leaves just as the wait runs out still finds the release handed to it: nothing leaks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["Drive"]


class Drive:
    """A re-entrant drive with a hand-over for ``close()``.

    Every field is guarded by ``_cond``'s lock. ``owner`` and ``depth`` change only in the
    thread that owns the drive (``__enter__``/``__exit__``) or, while nobody owns it, in the
    thread that takes it; ``_release`` is set by :meth:`close_or_hand_over` and taken by the
    owner's last ``__exit__``.

    Example:
        >>> drive, done = Drive(), []
        >>> with drive:
        ...     with drive:  # re-entrant
        ...         pass
        >>> drive.close_or_hand_over(lambda: done.append(1), wait_s=0.1) is None, done
        (True, [1])
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.owner: int | None = None  # the ident of the driving thread
        self._depth = 0
        self._release: Callable[[], None] | None = None  # run by the owner as it leaves

    def __enter__(self) -> Drive:
        me = threading.get_ident()
        with self._cond:
            while self.owner is not None and self.owner != me:
                self._cond.wait()
            self.owner = me
            self._depth += 1
        return self

    def __exit__(self, kind: type[BaseException] | None = None, exc: BaseException | None = None,
                 tb: TracebackType | None = None) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth:
                return
            release, self._release = self._release, None
            if release is None:
                self.owner = None
                self._cond.notify_all()
                return
        # Still the owner: the release runs holding the drive, like a close() that got it.
        try:
            release()
        finally:
            with self._cond:
                self.owner = None
                self._cond.notify_all()

    def close_or_hand_over(self, release: Callable[[], None], wait_s: float) -> int | None:
        """Run ``release`` holding the drive, waiting up to ``wait_s`` for the driver to leave;
        if it does not, hand ``release`` to it and return its thread's ident (else ``None``)."""
        me = threading.get_ident()
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self.owner is not None and self.owner != me:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._release = release
                    return self.owner
                self._cond.wait(left)
            self.owner = me
            self._depth += 1
        try:
            release()
        finally:
            self.__exit__()
        return None
