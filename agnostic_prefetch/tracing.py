"""Chrome trace-event JSON of a pipeline: one track per worker, the caller, the stage's thread.

``with ap.trace("run.json"):`` records every live ``Loader`` and prefetcher (and those built
inside the block); ``Loader(..., trace=path)`` or ``Prefetcher(..., trace=path)`` records
one from construction until ``close()``. Traces may overlap: every trace open over a loader
or prefetcher records it (a block nested in another, or one over a loader's own ``trace=``),
and each keeps recording until its own end. Perfetto (ui.perfetto.dev) and
``chrome://tracing`` open the file. docs/diagnose.md says how to read it.

Spans are complete (``"X"``) events with a pid and tid, and ``thread_name`` /
``process_name`` metadata events name the tracks. Timestamps are microseconds since the
trace began, all on ``perf_counter``, which is the system-wide monotonic clock on Linux, so
worker processes and the trainer share one time line.

Workers read their trace level from the ring's accounting block once per batch, so a trace
reaches workers that were already running, from their next batch on. They send their spans
with each batch's "done" message, only while a trace records.

The size is bounded by ``max_events``: per-item spans (read, transform, write) may take
three quarters of it; past that the workers are told to stop sending them and only batch
spans are kept; past ``max_events`` nothing more is kept. What was dropped is counted in
the file's ``otherData``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from agnostic_prefetch._accounts import TRACE_BATCHES, TRACE_ITEMS, TRACE_OFF

__all__ = ["TraceLink", "Tracer", "trace"]

MAX_EVENTS = 250_000  # about 30 MB of JSON
_LIVE: weakref.WeakSet[TraceLink] = weakref.WeakSet()  # the loaders and stages a trace can reach
_ACTIVE: list[Tracer] = []  # the traces of `with trace(...)` blocks now open


class Tracer:
    """Collects spans from loaders and prefetchers; :meth:`write` saves them.

    Args:
        path: where :meth:`write` saves the JSON.
        max_events: the most events kept (see the module).
    """

    def __init__(self, path: str | os.PathLike[str], max_events: int = MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write a trace to {self.path!r}: the directory {folder!r} "
                                    "does not exist; create it first, or trace to another path")
        self.max_events = max_events
        self.item_budget = max_events * 3 // 4
        self.t0 = time.perf_counter()
        self.events: list[dict[str, Any]] = []
        self.item_spans = 0
        self.dropped_item_spans = 0
        self.dropped_events = 0
        self._names: dict[tuple[int, int], str] = {}
        self._processes: dict[int, str] = {os.getpid(): f"trainer (pid {os.getpid()})"}
        self._lock = threading.Lock()
        self._links: list[TraceLink] = []  # the loaders and stages this trace records
        self.level = TRACE_ITEMS  # what it asks of workers: TRACE_BATCHES once item spans are spent
        self.closed = False

    # ---- what loaders and prefetchers call --------------------------------------------

    def span(self, name: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        """A span of the calling thread (its track is named after the thread)."""
        key = (os.getpid(), threading.get_native_id())
        if key not in self._names:
            thread = threading.current_thread()
            self._names[key] = (f"trainer: {thread.name}" if thread is threading.main_thread()
                                else thread.name)
        self._add(name, key, start, end, args)

    def worker_batch(self, worker: Any, epoch: int, number: int, trace: tuple) -> None:
        """A worker's batch: its fill span and, if sent, each item's read/transform/write."""
        started, ended, spans = trace
        key, name = _track_of(worker)
        if key not in self._names:
            self._names[key] = name
            if key[0] != os.getpid():
                self._processes[key[0]] = f"{name}"
        self._add("fill", key, started, ended, {"epoch": epoch, "batch": number})
        if spans is None:
            return
        if self.item_spans + 3 * len(spans) > self.item_budget:
            self.dropped_item_spans += 3 * len(spans)
            if self.level == TRACE_ITEMS:  # from their next batch on, workers send batch spans only
                self.level = TRACE_BATCHES
                for link in list(self._links):
                    link.refresh()
            return
        self.item_spans += 3 * len(spans)
        for index, t0, t1, t2, t3 in spans:
            args = {"record": index}
            self._add("read", key, t0, t1, args)
            self._add("transform", key, t1, t2, args)
            self._add("write", key, t2, t3, args)


    # ---- the file -----------------------------------------------------------------------

    def write(self) -> str:
        """Stop recording (workers stop sending spans unless another trace records them) and
        save the JSON; returns the path."""
        with self._lock:
            events = list(self.events)
            self.closed = True
        self.level = TRACE_OFF
        for link in list(self._links):
            link.detach(self)
        meta: list[dict[str, Any]] = []
        for pid, name in self._processes.items():
            meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
        for (pid, tid), name in self._names.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        document = {
            "traceEvents": meta + events,
            "displayTimeUnit": "ms",
            "otherData": {"max_events": self.max_events, "dropped_item_spans": self.dropped_item_spans,
                          "dropped_events": self.dropped_events, "clock": "perf_counter (CLOCK_MONOTONIC), "
                          "microseconds since the trace began"},
        }
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(document, f, separators=(",", ":"))
        return self.path

    def _add(self, name: str, key: tuple[int, int], start: float, end: float,
             args: dict[str, Any] | None) -> None:
        if end < self.t0:
            return  # over before this trace began (a batch it reached while in flight)
        start = max(start, self.t0)  # the part of it this trace saw
        event = {"name": name, "ph": "X", "pid": key[0], "tid": key[1],
                 "ts": round((start - self.t0) * 1e6, 3), "dur": round(max(0.0, end - start) * 1e6, 3)}
        if args:
            event["args"] = args
        with self._lock:
            if self.closed or len(self.events) >= self.max_events:
                self.dropped_events += 1
                return
            self.events.append(event)


def _track_of(worker: Any) -> tuple[tuple[int, int], str]:
    process = getattr(worker, "process", None)
    if process is not None:
        return (process.pid, process.pid), f"loader worker {worker.worker_id} (pid {process.pid})"
    thread = getattr(worker, "thread", None)
    if thread is not None:
        return (os.getpid(), thread.native_id or 0), f"loader worker thread {worker.worker_id}"
    return (os.getpid(), threading.get_native_id()), "caller (workers=0 loads here)"


class TraceLink:
    """The traces recording one loader or prefetch stage; every one of them records it.

    The loader's scheduler and iterator, or the stage's threads, call :meth:`span` and
    :meth:`worker_batch` (after a cheap ``if link.tracers:``); :meth:`attach` and
    :meth:`detach` may come from any thread: ``tracers`` is replaced whole (a tuple), never
    changed in place, and ``_lock`` orders the replacements. The workers' trace level (in
    the ring's accounting block, ``board``) is the highest any of the traces asks for.

    Args:
        board: the accounting block whose workers send spans (``None`` for a prefetch stage).
    """

    def __init__(self, board: Any = None) -> None:
        self.tracers: tuple[Tracer, ...] = ()
        self._board = board
        self._lock = threading.Lock()
        self._closed = False

    def attach(self, tracer: Tracer) -> None:
        """Have ``tracer`` record this loader or stage too (nothing once either is closed)."""
        with self._lock:
            if self._closed or tracer.closed or tracer in self.tracers:
                return
            self.tracers = (*self.tracers, tracer)
            tracer._links.append(self)
        self.refresh()

    def detach(self, tracer: Tracer) -> None:
        with self._lock:
            self.tracers = tuple(t for t in self.tracers if t is not tracer)
            if self in tracer._links:
                tracer._links.remove(self)
        self.refresh()

    def close(self) -> None:
        """At close of the loader or stage: no trace records it any more."""
        with self._lock:
            self._closed = True
        for tracer in self.tracers:
            self.detach(tracer)
        self._board = None  # the accounting block goes with the ring

    def refresh(self) -> None:
        """Set the workers' trace level to the highest the traces ask for."""
        board = self._board
        if board is not None:
            board.set_trace_level(max((t.level for t in self.tracers), default=TRACE_OFF))

    def span(self, name: str, start: float, end: float) -> None:
        for tracer in self.tracers:
            tracer.span(name, start, end)

    def worker_batch(self, worker: Any, epoch: int, number: int, trace: tuple) -> None:
        for tracer in self.tracers:
            tracer.worker_batch(worker, epoch, number, trace)


def register(link: TraceLink) -> None:
    """A new loader or prefetcher: reachable by traces started later; traced by those open now."""
    _LIVE.add(link)
    for tracer in _ACTIVE:
        link.attach(tracer)


@contextlib.contextmanager
def trace(path: str | os.PathLike[str], *, max_events: int = MAX_EVENTS) -> Iterator[Tracer]:
    """Record every live loader and prefetcher (and those built inside) into ``path``.

    Example:
        >>> import json, os, tempfile, numpy as np, agnostic_prefetch as ap
        >>> path = os.path.join(tempfile.mkdtemp(), "trace.json")
        >>> with ap.Loader(ap.ArraySource({"x": np.arange(8)}), 4, workers=1) as loader:
        ...     with ap.trace(path):
        ...         _ = [b for b in loader]
        >>> names = {e["name"] for e in json.load(open(path))["traceEvents"]}
        >>> {"fill", "read", "next", "thread_name"} <= names
        True
    """
    tracer = Tracer(path, max_events)
    links = list(_LIVE)
    _ACTIVE.append(tracer)
    try:
        for link in links:
            link.attach(tracer)
        yield tracer
    finally:
        _ACTIVE.remove(tracer)
        tracer.write()  # detaches it from every loader and stage it recorded
