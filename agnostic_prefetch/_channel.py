"""The prefetch stage's bounded queue: ``put`` in the stage's thread, ``get`` in the caller's, and
a ``close()`` that wakes both (``_stage.py``)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

__all__ = ["END", "Channel", "Entry"]

END = object()  # what ``get`` returns once the channel is closed


class Entry:
    """A batch in flight: its device tree, the host batch it came from, the source's position."""

    __slots__ = ("device", "host", "state", "token")

    def __init__(self, device: Any, host: Any, state: Any, token: Any) -> None:
        self.device = device
        self.host = host  # keeps the ring slot while a copy may still read it
        self.state = state
        self.token = token


class Channel:
    """A bounded queue whose ``close()`` wakes both a blocked ``put`` and a blocked ``get``.

    ``put`` runs in the stage's thread, ``get`` in the caller's, ``close`` in either (or a
    finalizer's); ``_cond``'s lock guards every field.
    """

    def __init__(self, size: int, stats: dict[str, Any]) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._size = size
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._stats = stats  # full_s: time a put waited for room

    def put(self, item: Any) -> bool:
        """Append, waiting for room; ``False`` if the channel was closed (nothing appended)."""
        with self._cond:
            if len(self._items) >= self._size and not self._closed:
                started = time.perf_counter()
                while len(self._items) >= self._size and not self._closed:
                    self._cond.wait()
                self._stats["full_s"] += time.perf_counter() - started
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> Any:
        """The oldest item, waiting for one; ``END`` once closed."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return END
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def entries(self) -> list[Entry]:
        """The entries queued now."""
        with self._cond:
            return [e for e in self._items if isinstance(e, Entry)]

    def close(self) -> list[Any]:
        """Close, wake both ends, and return what was queued."""
        with self._cond:
            self._closed = True
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items
