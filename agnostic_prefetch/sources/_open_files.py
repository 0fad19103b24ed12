"""A process's open file handles (files, readers) for a source: at most a few, least recently
used closed first, so a read over more files than the descriptor limit never runs out.

Example:
    >>> import io
    >>> handles = OpenFiles(2)
    >>> for key in ("a", "b", "c"):
    ...     with handles.lease(key, lambda key: io.BytesIO(key.encode())) as f:
    ...         _ = f.read()
    >>> handles.keys()
    ['b', 'c']
    >>> handles.close_all()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DEFAULT_MAX_OPEN", "OpenFiles"]

DEFAULT_MAX_OPEN = 64  # well under the usual descriptor limits (1024, or 256 on macOS)


class _Entry:
    __slots__ = ("handle", "users", "retired")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.users = 0  # leases not yet ended
        self.retired = False  # dropped by close_all while leased: closed when the last lease ends


class OpenFiles:
    """Handles by key, opened on their first lease, at most ``capacity`` kept open.

    A leased handle is never closed under its user: when every handle is leased at once the
    cache holds more than ``capacity`` until the leases end. ``drop(key)``, if given, says
    which idle handles to close early (those of a thread that ended). Belongs to one
    process; any thread may call :meth:`lease` and :meth:`close_all`, and ``_lock`` guards
    ``_entries`` (least recently used first) and every entry's counters.
    """

    def __init__(self, capacity: int, *, drop: Callable[[Any], bool] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"max_open_files must be at least 1, got {capacity}")
        self.capacity = capacity
        self._drop = drop
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}

    @contextmanager
    def lease(self, key: Hashable, open_handle: Callable[[Any], Any]) -> Iterator[Any]:
        """The handle for ``key``, open (``open_handle(key)`` now if need be) until the ``with`` ends."""
        idle: list[_Entry] = []
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                entry = _Entry(open_handle(key))  # under the lock: one handle per key
                if self._drop is not None:
                    idle += self._take(lambda k, e: self._drop(k))
            self._entries[key] = entry
            entry.users += 1
            excess = len(self._entries) - self.capacity
            if excess > 0:
                idle += self._take(lambda k, e: True, excess)
        self._close(idle)
        try:
            yield entry.handle
        finally:
            with self._lock:
                entry.users -= 1
                done = entry.retired and entry.users == 0
            if done:
                self._close([entry])

    def _take(self, which: Callable[[Any, _Entry], bool], most: int | None = None) -> list[_Entry]:
        """Up to ``most`` idle entries that ``which`` picks, oldest first, out of the cache."""
        taken = []
        for key, entry in list(self._entries.items()):
            if most is not None and len(taken) >= most:
                break
            if entry.users == 0 and which(key, entry):
                taken.append(self._entries.pop(key))
        return taken

    @staticmethod
    def _close(entries: list[_Entry]) -> None:
        for entry in entries:
            entry.handle.close()

    def keys(self) -> list[Any]:
        """The keys whose handles are open, least recently used first."""
        with self._lock:
            return list(self._entries)

    def close_all(self) -> None:
        """Close every handle (a leased one when its lease ends)."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
            for entry in entries:
                entry.retired = True
            idle = [e for e in entries if e.users == 0]
        self._close(idle)
