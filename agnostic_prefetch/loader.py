"""Orchestration: orders to idle workers, results back in order, leases, resume, shutdown.

The loader owns its workers and its ring, like a scope: leaving it by any path (``close``,
``with``, an exception it raises, garbage collection, interpreter exit) stops both. It
never decodes anything itself (except with ``workers=0``, where the caller is the worker).

Slot states: free -> ordered (a worker fills it) -> ready (waiting its turn) -> leased (the
caller holds arrays viewing it) -> free when the last such array dies. If the caller holds
so many batches that the workers would have no slot left, further batches are copied out.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agnostic_prefetch import _pool
from agnostic_prefetch._layout import (
    H_COUNT,
    H_EPOCH,
    H_MAGIC,
    H_NUMBER,
    H_PROGRESS,
    HEADER_BYTES,
    MAGIC,
    Layout,
    layout_from_example,
)
from agnostic_prefetch._lease import Leases
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._tree import unflatten
from agnostic_prefetch._worker import Filler, Job, Order, pack_orders
from agnostic_prefetch.errors import LoaderError, LoaderTimeoutError, WorkerDiedError, WorkerError
from agnostic_prefetch.sampler import Sampler, item_rng

log = logging.getLogger("agnostic_prefetch")

_STATE_VERSION = 1
_SMALL_SLOT = 64 << 10  # slots this small get more of them: the per-batch cost is the pipe
# Batches a training loop holds at its peak behind prefetch_to_device(size=2): the step's,
# two in flight, one being pulled, one its thread frees a moment later; plus one spare.
_HELD_BY_CALLER = 6
# How long a wait for workers may go without checking that no other thread closed the loader.
_CLOSE_CHECK_S = 0.25


@dataclass
class _Order:
    seq: int  # global batch sequence number: epoch * batches_per_epoch + number
    slot: int
    worker: _pool.WorkerHandle | None
    indices: np.ndarray
    stale: bool = False  # issued before load_state_dict(): its result is thrown away
    progress: int = -1
    progress_at: float = field(default_factory=time.monotonic)


@dataclass
class _Ready:
    slot: int
    count: int
    objects: list[list[Any]]
    skipped: list[tuple[int, str]]  # counted and logged when the batch is delivered


class _Resources:
    """What must be let go at shutdown; holds no reference to the Loader (so GC can run)."""

    def __init__(self) -> None:
        self.workers: list[_pool.WorkerHandle] = []
        self.ring: Ring | None = None
        self.headers: np.ndarray | None = None  # int64 header fields of every slot
        self.selector = selectors.DefaultSelector()
        self.grace = 0.5  # seconds an idle worker gets to exit on end of file

    def close(self) -> None:
        workers, self.workers = self.workers, []
        _pool.stop(workers, self.grace)
        self.selector.close()
        self.headers = None  # our own view of the ring: drop it so the mapping can close
        if self.ring is not None:
            self.ring.close()


class _Cancelled(Exception):
    """Raised inside a loader iterator whose ``cancel()`` was called; it then ends."""


class _LoaderIterator:
    """What ``iter(loader)`` returns: the batches, plus ``cancel()`` for another thread.

    ``cancel()`` makes an iterator that another thread is driving end (``StopIteration``)
    within a fraction of a second, even while it waits for a worker; the device stage
    uses it to stop its thread. A cancelled iterator takes no further batch.
    """

    def __init__(self, batches: Iterator[Any], cancelled: threading.Event) -> None:
        self._batches = batches
        self._cancelled = cancelled

    def __iter__(self) -> _LoaderIterator:
        return self

    def __next__(self) -> Any:
        return next(self._batches)

    def cancel(self) -> None:
        """End this iterator from any thread (within ``_CLOSE_CHECK_S``)."""
        self._cancelled.set()

    def close(self) -> None:
        """End this iterator (from the thread that drives it), like a generator's ``close()``."""
        self._batches.close()  # type: ignore[attr-defined]


class Loader:
    """Loads batches in worker processes into a shared-memory ring and hands out views.

    Batches have the tree structure of one example, each array leaf with a leading batch
    axis; arrays are writable numpy views into the ring (no copy), valid for as long as you
    hold them. Non-array leaves (strings, paths) arrive as lists.

    Args:
        source: a map-style source: ``len(source)`` and ``source[i]`` returning a pytree
            (dicts, lists, tuples) of arrays and scalars. Sent to workers with cloudpickle;
            it should open files lazily. It may define ``batch_order`` (see
            :class:`~agnostic_prefetch.BatchOrderSource`).
        batch_size: items per batch.
        workers: worker count; 0 loads in the calling thread (for debugging).
        backend: ``"process"`` (fresh processes, off the GIL) or ``"thread"``.
        slots: ring slots; default ``workers + 6``: one per worker, plus what a training
            loop over ``prefetch_to_device(loader, size=2)`` holds at its peak (the step's
            batch, two in flight, one being pulled, one JAX is about to release), plus one.
            At least ``workers + 1``; a plain ``for`` loop is zero-copy from
            ``max(workers, 1) + 2`` on (it still holds the previous batch while the next one
            is handed over). Hold more than the ring allows and batches are copied out.
        shuffle, seed: permute items per epoch from ``(seed, epoch)``.
        epochs: epochs one iteration covers; ``None`` never ends (no drain between epochs).
        drop_remainder: every batch full and every shard the same length.
        transform: ``transform(example, rng) -> example``, run in the workers; ``rng`` is a
            ``numpy.random.Generator`` seeded from ``(seed, epoch, position)``. A transform
            with ``writes_into_slot = True`` is called with ``out=``, this item's place in
            the ring (a tree like the example, ``None`` for list leaves); an array it writes
            there is not copied again (``CaffeTransform`` does this).
        ordered: ``False`` delivers batches as they complete; contents stay the same.
        shard_index, shard_count: this process's part of every epoch.
        on_error: ``"raise"`` or ``"skip"`` (bad records are left out, counted, logged).
        timeout: seconds a worker may go without progress before it is reported as hung.
        worker_init: ``worker_init(worker_id)`` run once in each worker.
        spec: an explicit example tree (arrays, or objects with ``shape`` and ``dtype``)
            for the slot layout instead of reading one example in the parent.

    Raises:
        ValueError: bad arguments, naming the remedy.
        RingTooLargeError: the ring does not fit in memory.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> source = ap.ArraySource({"x": np.arange(10.0), "y": np.arange(10)})
        >>> with ap.Loader(source, batch_size=4, workers=0) as loader:
        ...     [b["y"].tolist() for b in loader]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        workers: int = 2,
        backend: str = "process",
        slots: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        drop_remainder: bool = False,
        transform: Callable[[Any, np.random.Generator], Any] | None = None,
        ordered: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
        on_error: str = "raise",
        timeout: float | None = None,
        worker_init: Callable[[int], None] | None = None,
        spec: Any = None,
    ) -> None:
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close)
        try:
            self._setup(source, batch_size, workers, backend, slots, shuffle, seed, epochs,
                        drop_remainder, transform, ordered, shard_index, shard_count, on_error,
                        timeout, worker_init, spec)
        except BaseException:
            self.close()
            raise

    def _setup(self, source: Any, batch_size: int, workers: int, backend: str, slots: int | None,
               shuffle: bool, seed: int, epochs: int | None, drop_remainder: bool,
               transform: Any, ordered: bool, shard_index: int, shard_count: int,
               on_error: str, timeout: float | None, worker_init: Any, spec: Any) -> None:
        if backend not in ("process", "thread"):
            raise ValueError(f"backend must be 'process' or 'thread', got {backend!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
        self._sampler = Sampler(source, batch_size, shuffle=shuffle, seed=seed,
                                drop_remainder=drop_remainder, shard_index=shard_index,
                                shard_count=shard_count)
        self._bpe = self._sampler.batches_per_epoch
        self.workers = workers
        self.backend = backend
        self.epochs = epochs
        self.ordered = ordered
        self.timeout = timeout
        self._skip = on_error == "skip"
        example = spec if spec is not None else self._read_example(source, transform)
        self.layout: Layout = layout_from_example(example, self._sampler.batch_size)
        if slots is None:
            # Small slots cost little, and more of them let each worker take several orders
            # per pipe write (tiny batches are bound by those writes, not by the copying).
            per_worker = 8 if self.layout.slot_bytes <= _SMALL_SLOT else 1
            slots = workers * per_worker + _HELD_BY_CALLER
        self.slots = int(slots)
        if self.slots < max(2, workers + 1):
            raise ValueError(
                f"slots={self.slots} is too few for {workers} workers: need at least "
                f"{max(2, workers + 1)} (one per worker plus one for the batch you hold)."
            )
        # Slots the caller may hold before batches are copied out instead: keep one per worker.
        # Orders a worker holds at once (one filling, the rest queued), topped up in one write.
        self._per_worker = max(2, min(8, (self.slots - _HELD_BY_CALLER) // max(1, workers)))

        ring = Ring(self.slots, self.layout.slot_bytes)
        self._resources.ring = ring
        self._ring = ring
        self._resources.headers = np.frombuffer(ring.map, np.int64, ring.nbytes // 8).reshape(
            self.slots, -1)[:, : HEADER_BYTES // 8]
        job = Job(source, transform, self.layout, self._sampler.seed, self._skip, worker_init)
        # The caller may hold all but one slot per worker before batches are copied out.
        self._book = Leases(self.slots, self.slots - max(1, min(workers, self.slots - 1)))
        self._orders: dict[int, _Order] = {}
        self._order_ids = itertools.count()
        self._ready: dict[int, _Ready] = {}
        self._failed: dict[int, WorkerError] = {}
        self._filler: Filler | None = None
        if workers == 0:
            self._filler = Filler(job, ring.slot_view)
            if worker_init is not None:
                worker_init(0)
        elif backend == "thread":
            self._resources.workers = _pool.start_threads(workers, job, ring)
        else:
            self._resources.workers = _pool.start_processes(workers, job, ring)
        self._workers = self._resources.workers
        for w in self._workers:
            self._resources.selector.register(w.results, selectors.EVENT_READ, (w, "results"))
            if w.sentinel is not None:
                self._resources.selector.register(w.sentinel, selectors.EVENT_READ, (w, "sentinel"))

        self._next_seq = 0  # lowest batch not yet delivered to the caller
        self._delivered_ahead: set[int] = set()  # delivered out of order (ordered=False)
        self._dispatch_seq = 0  # next batch to order from a worker
        self._open_end: int | None = None  # end of an iteration begun and not finished
        self._iterator_generation = 0
        self._take_lock = threading.Lock()  # iterator hand-over vs a newer iter()/load_state_dict()
        self._warned_copy = False
        self._warned_frameworks = False
        self._stats = {"batches": 0, "items": 0, "wait_s": 0.0, "fill_s": 0.0, "skipped": 0, "copied_out": 0}

    # ---- public surface ---------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Batches one epoch yields on this shard."""
        return self._bpe

    def __len__(self) -> int:
        """Batches the next iteration yields (from the current position)."""
        if self.epochs is None:
            raise TypeError("a Loader with epochs=None never ends and has no length")
        return self._iteration_end() - self._next_seq - len(self._delivered_ahead)

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        with self._take_lock:
            self._iterator_generation += 1
            self._open_end = self._iteration_end()
            cancelled = threading.Event()
            return _LoaderIterator(self._iterate(self._iterator_generation, self._open_end, cancelled), cancelled)

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches delivered so far: small and JSON-able."""
        epoch, number = divmod(self._next_seq, self._bpe)
        return {
            "version": _STATE_VERSION,
            "seed": self._sampler.seed,
            "epoch": epoch,
            "batch": number,
            "delivered_ahead": [list(divmod(s, self._bpe)) for s in sorted(self._delivered_ahead)],
            # An interrupted iteration (epochs > 1, or a break) resumes up to its own end.
            "end_epoch": None if self._open_end is None or self.epochs is None else self._open_end // self._bpe,
            "batch_size": self._sampler.batch_size,
            "batches_per_epoch": self._bpe,
            "shard_index": self._sampler.shard_index,
            "shard_count": self._sampler.shard_count,
            "shuffle": self._sampler.shuffle,
            "drop_remainder": self._sampler.drop_remainder,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batches are exactly those not yet delivered.

        Raises:
            ValueError: the state was taken with another seed, batch size, shard or
                shuffle setting (the batches would differ), naming both values.
        """
        self._check_open()
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown state version {state.get('version')!r}; expected {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "batch_size", "batches_per_epoch", "shard_index", "shard_count", "shuffle", "drop_remainder"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={mine[key]!r}; build the loader with the same settings to resume."
                )
        with self._take_lock:
            for order in self._orders.values():
                order.stale = True
            for ready in self._ready.values():
                self._book.free.append(ready.slot)
            self._ready.clear()
            self._failed.clear()
            self._next_seq = state["epoch"] * self._bpe + state["batch"]
            self._delivered_ahead = {e * self._bpe + b for e, b in state["delivered_ahead"]}
            self._advance()
            self._dispatch_seq = self._next_seq
            end_epoch = state.get("end_epoch")
            self._open_end = None if end_epoch is None else end_epoch * self._bpe
            self._iterator_generation += 1  # an iterator from before the reload stops

    def stats(self) -> dict[str, Any]:
        """Counters: batches, items, wait_s (caller waited), fill_s (worker time), ring_bytes,
        skipped, copied_out, slots, workers."""
        return {**self._stats, "ring_bytes": self._ring.nbytes, "slots": self.slots, "workers": self.workers}

    def close(self) -> None:
        """Stop the workers and release the ring (views you hold stay valid)."""
        self._filler = None  # with workers=0 its slot writers view the ring: first let go of them
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader(batch_size={self._sampler.batch_size}, batches_per_epoch={self._bpe}, "
            f"workers={self.workers}, backend={self.backend!r}, ring={self.slots} slots x "
            f"{self.layout.slot_bytes:,} B = {self._ring.nbytes:,} B [{self.layout.describe()}]"
            f"{', closed' if self.closed else ''})"
        )

    # ---- iteration ----------------------------------------------------------------------

    def _iteration_end(self) -> int:
        """Where the next iteration stops: the end of an interrupted one, else ``epochs`` on."""
        if self.epochs is None:
            return 1 << 62
        if self._open_end is not None and self._open_end > self._next_seq:
            return self._open_end
        first_epoch = self._next_seq // self._bpe
        return (first_epoch + self.epochs) * self._bpe

    def _iterate(self, generation: int, end: int, cancelled: threading.Event) -> Iterator[Any]:
        while True:
            self._check_current(generation)
            self._advance()
            if self._next_seq >= end:
                self._open_end = None
                return
            started = time.perf_counter()
            try:
                seq, ready = self._await_batch(end, generation, cancelled)
            except _Cancelled:
                return
            except BaseException as exc:
                if isinstance(exc, LoaderError):
                    # A failed pipeline stops with its error, at once: nothing left running.
                    self._resources.grace = 0.0
                    self.close()
                raise
            finally:
                self._stats["wait_s"] += time.perf_counter() - started
            self._advance()
            for index, reason in ready.skipped:
                log.warning("skipped record %d (on_error='skip'): %s", index, reason)
            self._stats["skipped"] += len(ready.skipped)
            if ready.count == 0:  # every record of this batch was skipped
                self._book.free.append(ready.slot)
                continue
            self._stats["batches"] += 1
            self._stats["items"] += ready.count
            yield self._deliver(ready)

    def _advance(self) -> None:
        """Move the frontier over batches already delivered: it never points at one."""
        while self._next_seq in self._delivered_ahead:
            self._delivered_ahead.discard(self._next_seq)
            self._next_seq += 1

    def _await_batch(self, end: int, generation: int, cancelled: threading.Event) -> tuple[int, _Ready]:
        while True:
            self._check_open()
            if cancelled.is_set():
                raise _Cancelled
            self._book.reclaim()
            # Top the workers up first, even when a batch is ready: otherwise they idle while
            # the caller drains ready batches, and the caller then waits a whole fill.
            self._dispatch(end)
            # Under the lock: an iterator superseded meanwhile (another thread's iter() or
            # load_state_dict()) must not take, and so lose, a batch of the new position.
            with self._take_lock:
                self._check_current(generation)
                found = self._take_ready(end)
                if found is not None:
                    self._delivered_ahead.add(found[0])
                    return found
            if not self._orders:
                raise LoaderError("internal: nothing in flight and nothing ready")  # pragma: no cover
            self._wait()

    def _take_ready(self, end: int) -> tuple[int, _Ready] | None:
        candidates = [self._next_seq] if self.ordered else sorted(
            s for s in itertools.chain(self._ready, self._failed) if self._next_seq <= s < end
        )
        for seq in candidates:
            if seq in self._failed:
                raise self._failed.pop(seq)
            if seq in self._ready:
                return seq, self._ready.pop(seq)
        return None

    def _dispatch(self, end: int) -> None:
        """Order batches, lowest first, while a slot is free and a worker has room.

        A worker is topped up to ``_per_worker`` orders in one write once it is down to half
        of that: each write wakes a sleeping worker, which costs more than a tiny batch.
        """
        self._dispatch_seq = max(self._dispatch_seq, self._next_seq)
        pending: dict[_pool.WorkerHandle, list[Order]] = {}
        filler = self._filler  # close() from another thread may drop it meanwhile
        while self._book.free:
            seq = self._dispatch_seq
            if self.epochs is not None and seq >= end + self.slots:  # a little past: no drain
                break
            if seq in self._delivered_ahead:
                self._dispatch_seq += 1
                continue
            if filler is not None:
                if self._ready or self._failed:
                    break  # workers=0: fill only what the caller is waiting for
                self._dispatch_seq += 1
                self._on_message(None, filler.fill(self._order(seq, None)))
                continue
            worker = min(self._workers, key=lambda w: len(w.outstanding))
            load = len(worker.outstanding)
            if load >= self._per_worker or (worker not in pending and load > self._per_worker // 2):
                break
            self._dispatch_seq += 1
            pending.setdefault(worker, []).append(self._order(seq, worker))
        for worker, orders in pending.items():
            try:
                worker.orders.send_bytes(pack_orders(orders))
            except (BrokenPipeError, OSError):
                self._raise_died(worker)

    def _order(self, seq: int, worker: _pool.WorkerHandle | None) -> Order:
        epoch, number = divmod(seq, self._bpe)
        batch = self._sampler.batch(epoch, number)
        slot = self._book.free.pop()
        order_id = next(self._order_ids)
        self._orders[order_id] = _Order(seq, slot, worker, batch.indices)
        if worker is not None:
            worker.outstanding.append(order_id)
        return Order(order_id, slot, epoch, number, batch.indices, batch.first_position)

    def _wait(self) -> None:
        """Block (using no CPU) until a worker reports, dies, or it is time to check progress."""
        # Bounded even with nothing to check: a close() from another thread (the device
        # stage's, say) closes the pipes this waits on, and a closed pipe never wakes it.
        wait_s = _CLOSE_CHECK_S
        if self.timeout is not None:
            wait_s = min(self.timeout, wait_s)
        if any(w.sentinel is None and w.process is not None for w in self._workers):
            wait_s = min(wait_s, 0.1)  # no pidfd on this OS: poll for dead workers
        events = self._resources.selector.select(wait_s)
        self._check_open()
        for key, _ in events:
            worker, kind = key.data
            if kind == "results":
                try:
                    message = worker.results.recv()
                except (EOFError, OSError):
                    self._raise_died(worker)
                self._on_message(worker, message)
        for key, _ in events:
            worker, kind = key.data
            if kind == "sentinel" and worker.exit_reason() is not None:
                self._raise_died(worker)
        if self.timeout is not None:
            self._check_progress()
        if not events:
            for w in self._workers:
                if w.exit_reason() is not None:
                    self._raise_died(w)

    def _on_message(self, worker: _pool.WorkerHandle | None, message: tuple) -> None:
        kind = message[0]
        if kind == "warn":
            if not self._warned_frameworks:
                self._warned_frameworks = True
                log.warning(message[1])
            return
        order_id = message[1]
        if order_id == -1:  # the worker could not start
            _, _, _, exc, description, tb = message
            error = WorkerError(
                f"{worker.describe() if worker else 'worker'} failed to start: {description}\n\n"
                f"Worker traceback:\n{tb}", index=None, epoch=-1, batch=-1, worker_traceback=tb)
            error.__cause__ = exc
            raise error
        order = self._orders.pop(order_id)
        if worker is not None:
            worker.outstanding.remove(order_id)
        if kind == "done":
            _, _, count, objects, skipped, fill_s = message
            self._stats["fill_s"] += fill_s
            self._check_header(order, count)
            if order.stale:
                self._book.free.append(order.slot)
                return
            self._ready[order.seq] = _Ready(order.slot, count, objects, skipped)
            return
        _, _, index, exc, description, tb = message
        self._book.free.append(order.slot)
        if order.stale:
            return
        epoch, number = divmod(order.seq, self._bpe)
        where = f"record {index}" if index is not None else "a batch"
        who = worker.describe() if worker is not None else "the caller (workers=0)"
        error = WorkerError(
            f"{where} (epoch {epoch}, batch {number}) failed in {who}: {description}\n\n"
            f"Worker traceback:\n{tb}\nUse on_error='skip' to leave bad records out (they are "
            "counted in stats()['skipped']).", index=index, epoch=epoch, batch=number, worker_traceback=tb)
        if exc is not None:
            error.__cause__ = exc
        self._failed[order.seq] = error

    def _check_header(self, order: _Order, count: int) -> None:
        header = self._resources.headers[order.slot]
        epoch, number = divmod(order.seq, self._bpe)
        if (header[H_MAGIC], header[H_EPOCH], header[H_NUMBER], header[H_COUNT]) != (MAGIC, epoch, number, count):
            raise LoaderError(  # pragma: no cover - guards the slot protocol itself
                f"slot {order.slot} header {header[:5].tolist()} does not match batch {number} of "
                f"epoch {epoch} with {count} items: the ring was written out of turn"
            )

    def _check_progress(self) -> None:
        assert self.timeout is not None
        now = time.monotonic()
        for order in self._orders.values():
            if order.worker is None or not order.worker.outstanding or order.worker.outstanding[0] is None:
                continue
            if self._orders.get(order.worker.outstanding[0]) is not order:
                continue  # queued behind another order: not started yet
            progress = int(self._resources.headers[order.slot, H_PROGRESS])
            if progress != order.progress:
                order.progress, order.progress_at = progress, now
                continue
            if now - order.progress_at >= self.timeout:
                worker = order.worker
                epoch, number = divmod(order.seq, self._bpe)
                index = int(order.indices[min(progress, len(order.indices) - 1)])
                stack = worker.stack()
                raise LoaderTimeoutError(
                    f"{worker.describe()} made no progress for {now - order.progress_at:.1f} s "
                    f"(timeout={self.timeout}) on record {index} of batch {number}, epoch {epoch}. "
                    f"Its stack:\n{stack}\nRaise timeout= if records are this slow, or fix "
                    "the source where it blocks."
                )

    def _raise_died(self, worker: _pool.WorkerHandle) -> None:
        reason = worker.exit_reason()
        if worker.process is not None and reason is None:
            try:
                worker.process.wait(1.0)
            except Exception:
                pass
            reason = worker.exit_reason() or "closed its pipe"
        raise WorkerDiedError(
            f"{worker.describe()} {reason} unexpectedly while loading. The loader has stopped; "
            "build a new one to continue (load_state_dict resumes exactly)."
        )

    def _deliver(self, ready: _Ready) -> Any:
        arrays, copied = self._book.hand_out(self._ring, self.layout, ready.slot, ready.count)
        if copied:
            self._stats["copied_out"] += 1
            if not self._warned_copy:
                self._warned_copy = True
                log.warning(
                    "the caller holds %d of %d ring slots, so the workers would starve; further "
                    "batches are copied out of the ring until batches are released (raise slots= "
                    "or hold fewer batches).", len(self._book.leased), self.slots)
        array_leaves = iter(arrays)
        objects = iter(ready.objects)
        leaves = [next(array_leaves) if kind == "array" else next(objects) for kind in self.layout.kinds]
        return unflatten(self.layout.treedef, leaves)

    # ---- helpers ------------------------------------------------------------------------

    def _check_current(self, generation: int) -> None:
        if generation != self._iterator_generation:
            raise RuntimeError("this iterator was superseded by a newer iter() or load_state_dict()")

    def _check_open(self) -> None:
        if self.closed:
            raise LoaderError("this Loader is closed; build a new one (load_state_dict resumes exactly)")

    def _read_example(self, source: Any, transform: Any) -> Any:
        first = self._sampler.batch(0, 0)
        errors = []
        for index, position in zip(first.indices.tolist(), first.positions.tolist(), strict=True):
            try:
                example = source[index]
                if transform is not None:
                    example = transform(example, item_rng(self._sampler.seed, 0, position))
                return example
            except Exception as exc:
                if not self._skip:
                    raise LoaderError(
                        f"reading record {index} in the parent to lay out the ring failed: "
                        f"{type(exc).__name__}: {exc}. Fix the record, pass on_error='skip', or "
                        "give spec= explicitly."
                    ) from exc
                errors.append(f"record {index}: {exc}")
        raise LoaderError("every record of the first batch failed; cannot lay out the ring:\n" + "\n".join(errors))
