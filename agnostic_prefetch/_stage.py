"""The prefetch stage's machinery: pulling and placing, the thread and its bounded queue, or the
same work inline in ``next()``, and the host batches held until their copies are done.

``Prefetcher`` (prefetch.py) is the public face; one of the two stages here runs behind it
(:class:`ThreadedStage` or :class:`InlineStage`, one interface) and is what its finalizer
closes, holding no reference back to it, so dropping a prefetcher stops its thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from agnostic_prefetch._channel import END, Channel, Entry
from agnostic_prefetch._placement import Placement
from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch._warn import warn
from agnostic_prefetch.tracing import TraceLink

__all__ = ["END", "Entry", "InlineStage", "ThreadedStage"]

_THREAD_NAME = "agnostic_prefetch-device"
# How long close() waits for its thread. A thread told to stop (the queue closed, a Loader
# iterator cancelled) leaves within microseconds; one inside a source that cannot be
# interrupted (a workers=0 Loader, a plain generator) is reported instead of waited for.
_JOIN_CANCELLED_S = 2.0
_JOIN_UNCANCELLABLE_S = 0.1


class _Reader:
    """Pulls the next batch, notes the source iterator's position right after it, places it.

    ``pull`` runs in the thread that reads (the stage's, or the caller's inline).
    ``place_lock`` is held around ``placement.put`` (and the wait for its copy) and around
    ``placement.close``, so a placement is never closed under a put. ``placing`` (the ident
    of the thread inside ``put``) and ``close_after_put`` let a close that comes from that
    very thread (a finalizer run by a garbage collection inside ``put``) wait for the put
    instead of deadlocking on the lock it holds.
    """

    def __init__(self, source: Iterator[Any], placement: Placement, stats: dict[str, Any],
                 trace: TraceLink, wait_for_copies: bool) -> None:
        self.source = source
        self.state_of = getattr(source, "state_dict", None)
        self.placement = placement
        self.stats = stats
        self.trace = trace
        # In the stage's own thread, waiting for each copy to complete costs the caller
        # nothing and measures the transfer; in the caller's thread it would stall the step.
        self.wait_for_copy = getattr(placement, "wait", None) if wait_for_copies else None
        self.place_lock = threading.Lock()
        self.stopped = False
        # A placement that would alias host batches and may copy them instead (JAX on the
        # CPU): copy a batch when its source's ring runs short (a Loader iterator says).
        max_held = getattr(source, "max_held", None)
        self.pressed: Callable[[], bool] | None = None
        if getattr(placement, "copies_when_pressed", False) and max_held is not None and hasattr(source, "held"):
            self.pressed = lambda: source.held >= max_held  # the next batch would be copied out
        self.placing: int | None = None
        self.close_after_put: Callable[[], None] | None = None

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
        if self.pressed is not None and self.pressed():
            host = _own_copy(host)  # the ring slot goes back as soon as ``host`` is dropped
        with self.place_lock:
            if self.stopped:
                return None
            self.placing = threading.get_ident()
            try:
                device, token = self.placement.put(host)
                placed = done = time.perf_counter()
                stats["place_s"] += placed - pulled
                if self.wait_for_copy is not None:
                    self.wait_for_copy(token)
                    done = time.perf_counter()
                    stats["transfer_s"] += done - placed
            finally:
                self.placing = None
        if self.placement.done(token):
            host = None  # copied already (or the arrays view it themselves): its slot may go
        close, self.close_after_put = self.close_after_put, None
        if close is not None:
            close()
            return None
        trace = self.trace
        if trace.tracers:
            trace.span("pull", started, pulled)
            trace.span("place", pulled, placed)
            if done > placed:
                trace.span("transfer", placed, done)
        return Entry(device, host, state, token)


def _own_copy(tree: Any) -> Any:
    """``tree`` with every numpy array leaf copied (into memory of its own)."""
    leaves, treedef = flatten(tree)
    return unflatten(treedef, [np.array(leaf) if isinstance(leaf, np.ndarray) else leaf for leaf in leaves])


class _Stage:
    """What both stages share: the placement, the reader, the host batches held until their
    copies are done (``retired``), and closing.

    ``retired`` is a deque: appends and pops from two threads are atomic. ``closed`` is set
    once, by :meth:`close`, from any thread.
    """

    threaded = False

    def __init__(self, placement: Placement, size: int, name: str, trace: TraceLink) -> None:
        self.placement = placement
        self.size = size
        self.name = name
        self.trace = trace
        self.retired: collections.deque[Entry] = collections.deque()
        self.reader: _Reader | None = None
        self.closed = False
        self.placement_closed = False  # set under the reader's lock: copies synced, safe to drop
        self.transfer_time = getattr(placement, "transfer_time", None)  # looked up once: per batch
        self.own_tracer: Any = None  # the one ``trace=`` started: written at close()

    def _reader_for(self, source: Iterator[Any], stats: dict[str, Any]) -> _Reader:
        self.reader = _Reader(source, self.placement, stats, self.trace, wait_for_copies=self.threaded)
        return self.reader

    def free_retired(self) -> None:
        """Drop the retired entries whose copies are done."""
        retired, done = self.retired, self.placement.done
        timed = self.transfer_time
        for _ in range(len(retired)):
            entry = retired.popleft()
            if not done(entry.token):
                retired.append(entry)
            elif timed is not None and self.reader is not None and entry.token is not None:
                self.reader.stats["transfer_s"] += timed(entry.token)

    def stop_reading(self) -> None:
        """Stop reading and drop the read-ahead (kept in ``retired`` until its copies are done)."""
        raise NotImplementedError

    def holds(self) -> int:
        """Host batches (ring slots) the stage holds now, queued, kept after the hand-out or
        retired until their copies are done: those whose host batch it still keeps, or whose
        arrays view it (an estimate, read from any thread)."""
        aliases = getattr(self.placement, "aliases_host", True)
        return sum(1 for e in [*self.retired, *self._entries()]
                   if e.host is not None or (aliases and e.device is not None))

    def _entries(self) -> list[Entry]:
        return []

    def close(self) -> None:
        """Stop reading, wait for pending copies, then let every host batch go (from any thread)."""
        if self.closed:
            return
        self.closed = True
        reader = self.reader
        if reader is not None and reader.placing == threading.get_ident():
            # A finalizer run by a garbage collection inside this thread's own put, which
            # holds the placement lock: finish once the put returns.
            reader.stopped = True
            reader.close_after_put = lambda: self._close(reader)
            return
        self._close(reader)

    def _close(self, reader: _Reader | None) -> None:
        self.stop_reading()
        # placement.close() first: it waits for the copies still reading host batches, so
        # their ring slots go back to the loader only after that.
        lock = reader.place_lock if reader is not None else threading.Lock()
        with lock:
            self.placement.close()
            self.placement_closed = True
            self.retired.clear()
        self.trace.close()
        if self.own_tracer is not None:
            self.own_tracer.write()


class ThreadedStage(_Stage):
    """Pulls and places in a background thread; ``next()`` takes a placed batch off a queue.

    Threads: :meth:`start`, :meth:`get`, :meth:`handed_out` and :meth:`stop_reading` run in
    the caller's thread; ``_run`` (pull, place, queue, free retired batches) in the stage's
    thread; :meth:`close` in either, or in a finalizer. ``last`` belongs to the caller's
    thread; ``reader``, ``thread`` and ``channel`` are replaced by the caller's thread
    (``start``, ``stop_reading``), and the stage's thread uses its own references to them.
    """

    threaded = True

    def __init__(self, placement: Placement, size: int, name: str, trace: TraceLink) -> None:
        super().__init__(placement, size, name, trace)
        # Handed out and moved past by the caller; dropped once their copies are done, in the
        # stage's thread: freeing a jax.Array releases the GIL, and the thread would take it in
        # the middle of the caller's loop if the caller's ``batch = next(it)`` freed it.
        self.last: Entry | None = None  # the batch the caller holds
        self.thread: threading.Thread | None = None
        self.channel: Channel | None = None

    def start(self, source: Iterator[Any], stats: dict[str, Any]) -> None:
        reader = self._reader_for(source, stats)
        self.channel = Channel(self.size, stats)
        self.thread = threading.Thread(target=self._run, args=(reader, self.channel),
                                       name=_THREAD_NAME, daemon=True)
        self.thread.start()

    def _run(self, reader: _Reader, channel: Channel) -> None:
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

    def get(self) -> Any:
        """The next entry, ``END``, or the exception the source raised."""
        return self.channel.get() if self.channel is not None else END

    def _entries(self) -> list[Entry]:
        channel, last = self.channel, self.last
        return [*(channel.entries() if channel is not None else ()), *((last,) if last is not None else ())]

    def handed_out(self, entry: Entry) -> None:
        """``entry`` went to the caller: keep the whole batch, device arrays too, until the
        caller moves past it; then the caller's ``batch = next(it)`` frees nothing, and the
        thread frees it."""
        last, self.last = self.last, entry
        if last is not None:
            self.retired.append(last)

    def stop_reading(self) -> None:
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
        if self.last is not None:
            self.retired.append(self.last)
            self.last = None


class InlineStage(_Stage):
    """The same work in the caller's ``next()``: it pulls and places ``size`` batches ahead.

    Threads: everything runs in the caller's thread, except :meth:`close` from a finalizer,
    which may run in any thread (``place_lock`` keeps it from closing the placement under a
    put). ``queue`` and ``error`` belong to the caller's thread.
    """

    def __init__(self, placement: Placement, size: int, name: str, trace: TraceLink) -> None:
        super().__init__(placement, size, name, trace)
        self.queue: collections.deque[Entry] = collections.deque()
        self.error: BaseException | None = None  # raised once the queue drains

    def start(self, source: Iterator[Any], stats: dict[str, Any]) -> None:
        self._reader_for(source, stats)
        self.error = None
        self._fill(self.size)

    def _entries(self) -> list[Entry]:
        return list(self.queue)

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
        self.free_retired()  # before the pull: a slot whose copy is done can take it
        if not self.queue:
            error, self.error = self.error, None
            return END if error is None or isinstance(error, StopIteration) else error
        entry = self.queue.popleft()
        self._fill(1)  # start the next transfer before handing this batch out: it overlaps the step
        return entry

    def handed_out(self, entry: Entry) -> None:
        """``entry`` went to the caller, who holds its device arrays; the host batch waits
        for its copy."""
        entry.device = None
        self.retired.append(entry)

    def stop_reading(self) -> None:
        reader, self.reader = self.reader, None
        if reader is None:
            return
        reader.stopped = True
        cancel = getattr(reader.source, "cancel", None)
        if cancel is not None:
            cancel()
        self.retired.extend(self.queue)
        self.queue.clear()
