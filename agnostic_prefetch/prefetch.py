"""One read-ahead stage for every framework: pull, place, queue, hand out, and the caller's position.

``prefetch_to_device`` (JAX), ``torch_prefetch`` and ``cupy_prefetch`` are this stage with
different *placements*. A placement turns a host batch into device arrays (``put``, in the
stage's thread), finishes the hand-over in the caller's thread (``hand_out``: on CUDA, the
consumer's stream waits on the copy's event), says when a copy no longer reads the host
batch (``done``), and releases what it holds (``close``). Everything else is written once
here: the background thread, the bounded queue, which host batches must stay alive (their
ring slots), the position of what the caller received, ``close()`` and stats.

Nothing here imports a framework.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from agnostic_prefetch._warn import warn

__all__ = ["Placement", "Prefetcher"]

_THREAD_NAME = "agnostic_prefetch-device"
_END = object()
# How long close() waits for its thread. A thread told to stop (the queue closed, a Loader
# iterator cancelled) leaves within microseconds; one inside a source that cannot be
# interrupted (a workers=0 Loader, a plain generator) is reported instead of waited for.
_JOIN_CANCELLED_S = 2.0
_JOIN_UNCANCELLABLE_S = 0.1


class Placement(Protocol):
    """How one batch reaches a device. ``put`` runs in the stage's thread, the rest in the caller's."""

    def put(self, host: Any) -> tuple[Any, Any]:
        """Start moving ``host``; return the device tree and a token for :meth:`done`."""
        ...

    def hand_out(self, device: Any, token: Any) -> None:
        """Called in the caller's ``next()`` just before ``device`` is returned."""
        ...

    def done(self, token: Any) -> bool:
        """Whether the copy no longer reads the host batch (its ring slot may then be reused)."""
        ...

    def close(self) -> None:
        """Wait for pending copies and release what the placement holds (page-locking, streams)."""
        ...


class _Entry:
    """A batch in flight: its device tree, the host batch it came from, the source's position."""

    __slots__ = ("device", "host", "state", "token")

    def __init__(self, device: Any, host: Any, state: Any, token: Any) -> None:
        self.device = device
        self.host = host  # keeps the ring slot while a copy may still read it
        self.state = state
        self.token = token


class _Channel:
    """A bounded queue whose ``close()`` wakes both a blocked ``put`` and a blocked ``get``."""

    def __init__(self, size: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._size = size
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, item: Any) -> bool:
        """Append, waiting for room; ``False`` if the channel was closed (nothing appended)."""
        with self._cond:
            while len(self._items) >= self._size and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> Any:
        """The oldest item, waiting for one; ``_END`` once closed."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return _END
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

    def __init__(self, source: Iterator[Any], placement: Placement, stats: dict[str, Any]) -> None:
        self.source = source
        self.state_of = getattr(source, "state_dict", None)
        self.placement = placement
        self.stats = stats
        self.place_lock = threading.Lock()  # placement.close() never runs during a put()
        self.stopped = False

    def pull(self) -> _Entry | None:
        """The next batch placed, or ``None`` at the end of the source (or once stopped)."""
        try:
            host = next(self.source)
        except StopIteration:
            return None
        state = self.state_of() if self.state_of is not None else None
        with self.place_lock:
            if self.stopped:
                return None
            started = time.perf_counter()
            device, token = self.placement.put(host)
            self.stats["place_s"] += time.perf_counter() - started
        return _Entry(device, host, state, token)


class _Stage:
    """What a prefetcher runs and holds; closed by it or its finalizer (no reference back to it)."""

    def __init__(self, placement: Placement, size: int, threaded: bool, name: str) -> None:
        self.placement = placement
        self.size = size
        self.threaded = threaded
        self.name = name
        # Handed out and moved past by the caller; dropped once their copies are done, in the
        # stage's thread: freeing a jax.Array releases the GIL, and the thread would take it in
        # the middle of the caller's loop if the caller's ``batch = next(it)`` freed it.
        self.retired: collections.deque[_Entry] = collections.deque()
        self.last: _Entry | None = None  # with the thread: the batch the caller holds
        self.reader: _Reader | None = None
        self.thread: threading.Thread | None = None
        self.channel: _Channel | None = None
        self.queue: collections.deque[_Entry] = collections.deque()  # without a thread
        self.error: BaseException | None = None  # without a thread: raised once the queue drains
        self.closed = False

    def start(self, source: Iterator[Any], stats: dict[str, Any]) -> None:
        reader = self.reader = _Reader(source, self.placement, stats)
        self.error = None
        if self.threaded:
            self.channel = _Channel(self.size)
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
                item = _END
            if not channel.put(item):
                if isinstance(item, _Entry):
                    self.retired.append(item)  # its copy may be running: freed once done
                return
            if not isinstance(item, _Entry):
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
        """The next entry, ``_END``, or the exception the source raised."""
        if self.channel is not None:
            return self.channel.get()
        self.free_retired()  # before the pull: a slot whose copy is done can take it
        if not self.queue:
            error, self.error = self.error, None
            return _END if error is None or isinstance(error, StopIteration) else error
        entry = self.queue.popleft()
        self._fill(1)  # start the next transfer before handing this batch out: it overlaps the step
        return entry

    def handed_out(self, entry: _Entry) -> None:
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
        for _ in range(len(retired)):
            entry = retired.popleft()
            if not done(entry.token):
                retired.append(entry)

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
            self.retired.extend(e for e in channel.close() if isinstance(e, _Entry))
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
        if reader is not None:
            with reader.place_lock:
                self.placement.close()
        else:
            self.placement.close()
        self.retired.clear()
        self.last = None


class Prefetcher:
    """Reads batches ahead of its caller and places them on a device; see ``prefetch_to_device``.

    The returned iterator of :func:`~agnostic_prefetch.prefetch_to_device`,
    :func:`~agnostic_prefetch.adapters.torch_prefetch` and
    :func:`~agnostic_prefetch.adapters.cupy_prefetch`.

    * ``state_dict()``: the source iterator's position after the batches *you* received
      (``None`` if the source has none), ready for ``Loader.load_state_dict``;
    * ``load_state_dict(state)``: drops the read-ahead and restarts its source (a
      ``Loader``) from ``state``;
    * ``len()``: batches still to come, where the source has a length;
    * ``stats()``: ``batches``, ``wait_s`` (time you waited in ``next()``), ``place_s``
      (time spent placing: for asynchronous copies, the time to issue them);
    * ``close()``, a ``with`` block, or garbage collection stop the thread and let go of
      every batch in flight.

    At its peak it holds :meth:`held_at_peak` batches of the source at once (see there).

    Args:
        iterable: host batches (a ``Loader``, a generator, ...).
        size: batches kept placed ahead of the caller (>= 1).
        placement: how a batch reaches the device (see :class:`Placement`).
        thread: pull and place in a background thread (the default), so ``next()`` only
            takes a placed batch off a queue; ``False`` does that work in ``next()``.
        name: what error messages call this stage.

    Example:
        >>> class OnHost:
        ...     def put(self, host): return host, None
        ...     def hand_out(self, device, token): pass
        ...     def done(self, token): return True
        ...     def close(self): pass
        >>> [b for b in Prefetcher(range(3), 2, OnHost())]
        [0, 1, 2]
    """

    def __init__(self, iterable: Iterable[Any], size: int, placement: Placement, *,
                 thread: bool = True, name: str = "prefetch") -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (batches kept in flight), got {size}")
        self.size = int(size)
        self.thread = bool(thread)
        self._name = name
        self._iterable = iterable
        self._placement = placement
        self._stats: dict[str, Any] = {"batches": 0, "wait_s": 0.0, "place_s": 0.0}
        self._stage = _Stage(placement, self.size, self.thread, name)
        self._finalizer = weakref.finalize(self, self._stage.close)
        self._warned_ring = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def held_at_peak(size: int, thread: bool = True) -> int:
        """Source batches a prefetcher holds at its peak, the caller's own included.

        With the thread: ``size`` queued, one being placed, the one the caller holds, and
        the one before it, which the caller's ``batch = next(it)`` still references while
        the call runs (and which, on the CPU, a ``jax.Array`` or tensor may alias): ``size
        + 3``. Without it, nothing is being placed in between: ``size + 2``. On CUDA add any
        batch whose copy is still running when the caller moves on (normally none).
        """
        return size + 3 if thread else size + 2

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        stage = self._stage
        if stage.closed:
            raise StopIteration
        started = time.perf_counter()
        item = stage.get()
        if not isinstance(item, _Entry):
            self.close()  # the end, or an error: let every host batch go now
            if item is _END:
                raise StopIteration
            raise item
        device = item.device
        self._placement.hand_out(device, item.token)
        stage.handed_out(item)
        self._state = item.state
        self._handed += 1
        self._stats["batches"] += 1
        self._stats["wait_s"] += time.perf_counter() - started
        return device

    def __len__(self) -> int:
        """Batches still to come (the source's length when it started, less those handed out)."""
        if self._length is None:
            raise TypeError(f"{self._name}: its source ({type(self._iterable).__name__}) has no length")
        return max(0, self._length - self._handed)

    def state_dict(self) -> dict[str, Any] | None:
        """The source's position after the batches handed out so far (``None`` without one)."""
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop the read-ahead and restart the source from ``state`` (``Loader.load_state_dict``).

        Raises:
            TypeError: the source cannot load a state (pass the ``Loader`` itself, not an
                iterator of it).
            RuntimeError: the prefetcher is closed.
        """
        load = getattr(self._iterable, "load_state_dict", None)
        if load is None:
            raise TypeError(
                f"{self._name}: its source ({type(self._iterable).__name__}) has no "
                "load_state_dict(). Pass the Loader itself (not iter(loader)) to resume in "
                "place, or resume the Loader and build a new prefetcher over it.")
        if self._stage.closed:
            raise RuntimeError(f"{self._name}: this prefetcher is closed; build a new one")
        self._stage.stop_reading()
        load(state)
        self._start()

    def stats(self) -> dict[str, Any]:
        """``batches`` handed out, ``wait_s`` the caller waited, ``place_s`` spent placing."""
        return {**self._stats, "size": self.size, "thread": self.thread}

    def close(self) -> None:
        """Stop the thread (if any), wait for pending copies, drop the batches in flight."""
        self._finalizer()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        source = iter(self._iterable)
        state_of = getattr(source, "state_dict", None)
        self._state = state_of() if state_of is not None else None
        self._length = _length_of(source, self._iterable)
        self._handed = 0
        self._check_ring(source)
        self._stage.start(source, self._stats)

    def _check_ring(self, source: Any) -> None:
        max_held = getattr(source, "max_held", None)
        peak = self.held_at_peak(self.size, self.thread)
        if max_held is None or peak <= max_held or self._warned_ring:
            return
        self._warned_ring = True
        slots = getattr(source, "slots", None)
        remedy = f"pass slots={slots - max_held + peak} to the Loader" if slots else "give the Loader more slots"
        warn(
            f"{self._name}(size={self.size}, thread={self.thread}) holds up to {peak} batches at "
            f"its peak, but its Loader lets a consumer hold {max_held}"
            f"{f' of its {slots} ring slots' if slots else ''} (the rest stay for the workers): "
            f"further batches would be copied out of the ring. To keep them zero-copy, {remedy}.")


def _length_of(source: Any, iterable: Any) -> int | None:
    for candidate in (source, iterable):
        if hasattr(candidate, "__len__"):
            try:
                return len(candidate)
            except TypeError:  # a Loader with epochs=None
                return None
    return None
