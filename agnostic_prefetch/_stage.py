"""The prefetch stage's machinery: the thread, the bounded queue, and the host batches it holds.

``Prefetcher`` (prefetch.py) is the public face; this is what runs behind it and what its
finalizer closes, holding no reference back to it, so dropping a prefetcher stops its
thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agnostic_prefetch._warn import warn

if TYPE_CHECKING:
    from agnostic_prefetch.prefetch import Placement

_THREAD_NAME = "agnostic_prefetch-device"
END = object()
# How long close() waits for its thread. A thread told to stop (the queue closed, a Loader
# iterator cancelled) leaves within microseconds; one inside a source that cannot be
# interrupted (a workers=0 Loader, a plain generator) is reported instead of waited for.
_JOIN_CANCELLED_S = 2.0
_JOIN_UNCANCELLABLE_S = 0.1


class Entry:
    """A batch in flight: its device tree, the host batch it came from, the source's position."""

    __slots__ = ("device", "host", "state", "token")

    def __init__(self, device: Any, host: Any, state: Any, token: Any) -> None:
        self.device = device
        self.host = host  # keeps the ring slot while a copy may still read it
        self.state = state
        self.token = token


class _Channel:
    """A bounded queue whose ``close()`` wakes both a blocked ``put`` and a blocked ``get``."""

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

    def close(self) -> list[Any]:
        """Close, wake both ends, and return what was queued."""
        with self._cond:
            self._closed = True
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items


class _Reader:
    """Pulls the next batch, notes the source iterator's position right after it, places it."""

    def __init__(self, source: Iterator[Any], placement: Placement, stats: dict[str, Any],
                 wait_for_copies: bool) -> None:
        self.source = source
        self.state_of = getattr(source, "state_dict", None)
        self.placement = placement
        self.stats = stats
        # In the stage's own thread, waiting for each copy to complete costs the caller
        # nothing and measures the transfer; in the caller's thread it would stall the step.
        self.wait_for_copy = getattr(placement, "wait", None) if wait_for_copies else None
        self.tracer: Any = None
        self.place_lock = threading.Lock()  # placement.close() never runs during a put()
        self.stopped = False

    def pull(self) -> Entry | None:
        """The next batch placed, or ``None`` at the end of the source (or once stopped)."""
        stats = self.stats
        started = time.perf_counter()
        try:
            host = next(self.source)
        except StopIteration:
            return None
        finally:
            pulled = time.perf_counter()
            stats["pull_s"] += pulled - started
        state = self.state_of() if self.state_of is not None else None
        with self.place_lock:
            if self.stopped:
                return None
            device, token = self.placement.put(host)
            placed = done = time.perf_counter()
            stats["place_s"] += placed - pulled
            if self.wait_for_copy is not None:
                self.wait_for_copy(token)
                done = time.perf_counter()
                stats["transfer_s"] += done - placed
        tracer = self.tracer
        if tracer is not None:
            tracer.span("pull", started, pulled)
            tracer.span("place", pulled, placed)
            if done > placed:
                tracer.span("transfer", placed, done)
        return Entry(device, host, state, token)


class Stage:
    """What a prefetcher runs and holds; closed by it or its finalizer (no reference back to it)."""

    def __init__(self, placement: Placement, size: int, threaded: bool, name: str) -> None:
        self.placement = placement
        self.size = size
        self.threaded = threaded
        self.name = name
        # Handed out and moved past by the caller; dropped once their copies are done, in the
        # stage's thread: freeing a jax.Array releases the GIL, and the thread would take it in
        # the middle of the caller's loop if the caller's ``batch = next(it)`` freed it.
        self.retired: collections.deque[Entry] = collections.deque()
        self.last: Entry | None = None  # with the thread: the batch the caller holds
        self.reader: _Reader | None = None
        self.thread: threading.Thread | None = None
        self.channel: _Channel | None = None
        self.queue: collections.deque[Entry] = collections.deque()  # without a thread
        self.error: BaseException | None = None  # without a thread: raised once the queue drains
        self.closed = False
        self.placement_closed = False  # set under the reader's lock: copies synced, safe to drop
        self.tracer: Any = None  # the trace recording this stage, if any
        self.transfer_time = getattr(placement, "transfer_time", None)  # looked up once: per batch
        self.own_tracer: Any = None  # the one ``trace=`` started: written at close()

    def start(self, source: Iterator[Any], stats: dict[str, Any]) -> None:
        reader = self.reader = _Reader(source, self.placement, stats, wait_for_copies=self.threaded)
        reader.tracer = self.tracer
        self.error = None
        if self.threaded:
            self.channel = _Channel(self.size, stats)
            self.thread = threading.Thread(target=self._run, args=(reader, self.channel),
                                           name=_THREAD_NAME, daemon=True)
            self.thread.start()
        else:
            self._fill(self.size)

    def _run(self, reader: _Reader, channel: _Channel) -> None:
        while not reader.stopped:
            self.free_retired()
            try:
                item: Any = reader.pull()
            except BaseException as exc:  # handed to the caller, who re-raises it in order
                item = exc
            if item is None:
                item = END
            if not channel.put(item):
                if isinstance(item, Entry):
                    with reader.place_lock:  # close() clears ``retired`` under this lock
                        if not self.placement_closed:
                            self.retired.append(item)  # its copy may be running: freed once done
                return
            if not isinstance(item, Entry):
                break
        self.free_retired()

    def _fill(self, n: int) -> None:
        while n > 0 and self.error is None and self.reader is not None:
            try:
                entry = self.reader.pull()
            except Exception as exc:  # raised after the batches pulled before it, as with the thread
                self.error = exc
                return
            if entry is None:
                self.error = StopIteration()
                return
            self.queue.append(entry)
            n -= 1

    def get(self) -> Any:
        """The next entry, ``END``, or the exception the source raised."""
        if self.channel is not None:
            return self.channel.get()
        self.free_retired()  # before the pull: a slot whose copy is done can take it
        if not self.queue:
            error, self.error = self.error, None
            return END if error is None or isinstance(error, StopIteration) else error
        entry = self.queue.popleft()
        self._fill(1)  # start the next transfer before handing this batch out: it overlaps the step
        return entry

    def handed_out(self, entry: Entry) -> None:
        """``entry`` went to the caller: keep what must outlive the hand-out."""
        if self.threaded:
            # Keep the whole batch, device arrays too, until the caller moves past it: then
            # the caller's ``batch = next(it)`` frees nothing, and the thread frees it.
            last, self.last = self.last, entry
            if last is not None:
                self.retired.append(last)
        else:
            entry.device = None  # the caller holds it; the host batch waits for its copy
            self.retired.append(entry)

    def free_retired(self) -> None:
        """Drop the retired entries whose copies are done (in the stage's thread, if any)."""
        retired, done = self.retired, self.placement.done
        timed = self.transfer_time
        for _ in range(len(retired)):
            entry = retired.popleft()
            if not done(entry.token):
                retired.append(entry)
            elif timed is not None and self.reader is not None and entry.token is not None:
                self.reader.stats["transfer_s"] += timed(entry.token)

    def stop_reading(self) -> None:
        """Stop the thread and drop the read-ahead (kept in ``retired`` until its copies are done)."""
        reader, self.reader = self.reader, None
        if reader is None:
            return
        reader.stopped = True
        cancel = getattr(reader.source, "cancel", None)
        if cancel is not None:
            cancel()  # a Loader iterator: a thread waiting inside it for workers wakes and leaves
        interruptible = cancel is not None and getattr(reader.source, "interruptible", False)
        channel, thread = self.channel, self.thread
        self.channel = self.thread = None
        if channel is not None:
            self.retired.extend(e for e in channel.close() if isinstance(e, Entry))
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_CANCELLED_S if interruptible else _JOIN_UNCANCELLABLE_S)
            if thread.is_alive():
                warn(
                    f"{self.name}: close() could not stop its thread {thread.name!r} (ident "
                    f"{thread.ident}): it is inside the source's __next__, which cannot be "
                    "interrupted (a Loader with workers=0 or a plain generator runs in that "
                    "thread). It ends, holding nothing, when the source returns its next batch.")
        self.retired.extend(self.queue)
        self.queue.clear()
        if self.last is not None:
            self.retired.append(self.last)
            self.last = None

    def close(self) -> None:
        """Stop reading, wait for pending copies, then let every host batch go."""
        if self.closed:
            return
        self.closed = True
        reader = self.reader
        self.stop_reading()
        # placement.close() first: it waits for the copies still reading host batches, so
        # their ring slots go back to the loader only after that.
        lock = reader.place_lock if reader is not None else threading.Lock()
        with lock:
            self.placement.close()
            self.placement_closed = True
            self.retired.clear()
        self.last = None
        if self.own_tracer is not None:
            self.own_tracer.write()


