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

import os
import time
import weakref
from collections.abc import Iterable
from typing import Any

from agnostic_prefetch import _fork
from agnostic_prefetch._channel import END, Entry
from agnostic_prefetch._placement import Placement
from agnostic_prefetch._stage import InlineStage, ThreadedStage
from agnostic_prefetch._warn import warn
from agnostic_prefetch._window import Snapshots
from agnostic_prefetch.tracing import TraceLink, Tracer, register

__all__ = ["Placement", "Prefetcher"]

_FORKED = "Build a new Loader and a new prefetcher over it in this process"


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
    * ``stats()``: ``batches``, ``wait_s`` (time you waited in ``next()``), ``pull_s``,
      ``place_s``, ``transfer_s``, ``full_s`` (see :meth:`stats`);
    * ``close()``, a ``with`` block, or garbage collection stop the thread and let go of
      every batch in flight.
    * In a child made by ``os.fork()``, a prefetcher of the parent's raises ``LoaderError``
      (its thread runs in the parent only); build a new one there.

    At its peak it holds :meth:`held_at_peak` batches of the source at once (see there).

    Args:
        iterable: host batches (a ``Loader``, a generator, ...).
        size: batches kept placed ahead of the caller (>= 1).
        placement: how a batch reaches the device (see :class:`Placement`).
        thread: pull and place in a background thread (the default), so ``next()`` only
            takes a placed batch off a queue; ``False`` does that work in ``next()``.
        name: what error messages call this stage.
        trace: a path: record a Chrome trace of this stage (and its caller) until
            ``close()`` (see :func:`~agnostic_prefetch.trace`).

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
                 thread: bool = True, name: str = "prefetch",
                 trace: str | os.PathLike[str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (batches kept in flight), got {size}")
        self.size = int(size)
        self.thread = bool(thread)
        self._name = name
        self._iterable = iterable
        self._placement = placement
        self._stats: dict[str, Any] = {"batches": 0, "wait_s": 0.0, "pull_s": 0.0, "place_s": 0.0,
                                       "transfer_s": 0.0, "full_s": 0.0}
        own_tracer = Tracer(trace) if trace is not None else None
        self._trace = TraceLink()
        stage = ThreadedStage if self.thread else InlineStage
        self._stage = stage(placement, self.size, name, self._trace)
        self._stage.own_tracer = own_tracer
        self._snapshots = Snapshots(weakref.WeakMethod(self._snapshot_stats))
        self._finalizer = weakref.finalize(self, self._stage.close)
        self._pid = _fork.adopt(self._finalizer)  # its thread runs in this process only
        register(self._trace)
        if own_tracer is not None:
            self._trace.attach(own_tracer)
        self._warned_ring = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def held_at_peak(size: int, thread: bool = True, aliases: bool = True) -> int:
        """Source batches (ring slots) a prefetcher and its caller hold at their peak.

        For a placement whose arrays view the host batch (``aliases``: torch tensors on the
        CPU), with the thread: ``size`` queued, one being placed, the one the caller holds,
        and the one before it, which the caller's ``batch = next(it)`` still references while
        the call runs: ``size + 3``; without it, nothing is being placed in between: ``size +
        2``. For one that copies (JAX, on the CPU too, and CUDA copies) a host batch goes as
        soon as its copy is done, whatever the caller keeps: at most the ``size`` queued
        batches whose copies may still run, and the one being placed: ``size + 1``.
        """
        if not aliases:
            return size + 1
        return size + 3 if thread else size + 2

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._pid != _fork.pid:
            _fork.check(self._pid, "prefetcher", _FORKED)
        stage = self._stage
        if stage.closed:
            raise StopIteration
        started = time.perf_counter()
        item = stage.get()
        if not isinstance(item, Entry):
            self.close()  # the end, or an error: let every host batch go now
            if item is END:
                raise StopIteration
            raise item
        device = item.device
        self._placement.hand_out(device, item.token)
        stage.handed_out(item)
        self._state = item.state
        self._handed += 1
        self._stats["batches"] += 1
        now = time.perf_counter()
        self._stats["wait_s"] += now - started
        if self._trace.tracers:
            self._trace.span(f"next ({self._name})", started, now)
        if now >= self._snapshots.next_at:
            self._snapshots.tick(now)
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

        A state the source refuses changes nothing: the prefetcher goes on from the batches
        you received.

        Raises:
            TypeError: the source cannot load a state (a generator, say).
            RuntimeError: the prefetcher is closed.
            LoaderError: this is a forked child's copy of a prefetcher (docs/design.md).
            ValueError: the source refused the state (another seed, say); nothing changed.
        """
        load = getattr(self._iterable, "load_state_dict", None)
        if load is None:
            raise TypeError(
                f"{self._name}: its source ({type(self._iterable).__name__}) has no "
                "load_state_dict(). Pass a Loader (or its iterator) to resume in place, or "
                "resume the source yourself and build a new prefetcher over it.")
        _fork.check(self._pid, "prefetcher", _FORKED)
        if self._stage.closed:
            raise RuntimeError(f"{self._name}: this prefetcher is closed; build a new one")
        self._stage.stop_reading()
        try:
            load(state)
        except BaseException:
            # The read-ahead is gone: go back to what the caller received, then re-raise.
            if self._state is not None:
                load(self._state)
            self._start()
            raise
        self._start()

    def stats(self) -> dict[str, Any]:
        """Counters and per-stage times since the prefetcher was built (docs/diagnose.md).

        ``batches`` handed out; ``wait_s``: time you waited in ``next()``. The stage's work
        (in its thread, or in ``next()`` with ``thread=False``): ``pull_s`` waiting for its
        source's next batch, ``place_s`` placing it (for JAX and CUDA copies, which are
        asynchronous: the time to issue them), ``transfer_s`` (with the thread only) from
        issuing the copies to their completion (JAX: the thread waits for them; torch on
        CUDA: timed on the GPU with events, nothing waits; CuPy: not measured), and
        ``full_s``: time the thread waited for room in the queue (you were slower).
        """
        return {**self._stats, "size": self.size, "thread": self.thread}

    def _snapshot_stats(self) -> dict[str, Any]:
        upstream = getattr(self._iterable, "stats", None)
        loader = upstream() if upstream is not None else None
        return {"prefetch": self.stats(), "loader": loader if isinstance(loader, dict) and "read_s" in loader else None}

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
        count_held_by = getattr(source, "count_held_by", None)
        if count_held_by is not None:  # a Loader iterator: its copy-out warning names our share
            count_held_by(self._holds)
        self._stage.start(source, self._stats)

    def _holds(self) -> int:
        return self._stage.holds()

    def _check_ring(self, source: Any) -> None:
        max_held = getattr(source, "max_held", None)
        peak = self.held_at_peak(self.size, self.thread, getattr(self._placement, "aliases_host", True))
        if max_held is None or peak <= max_held or self._warned_ring:
            return
        if getattr(self._placement, "copies_when_pressed", False):
            return  # the stage copies batches in its thread when the ring runs short
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
