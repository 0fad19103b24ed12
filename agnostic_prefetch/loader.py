"""The loader: configuration, the ring and workers it owns, and its public surface.

The loader owns its workers and its ring, like a scope: leaving it by any path (``close``,
``with``, an exception it raises, garbage collection, interpreter exit) stops both. It
never decodes anything itself (except with ``workers=0``, where the iterating thread is the
worker). The parts it puts together: ``_sizing`` (ring size), ``_ring`` and ``_slots`` (the
memory and each slot's state), ``_pool`` and ``_supervisor`` (workers), ``_schedule``
(orders and results), ``_iterator`` (position and delivery), ``_resume`` (state dicts).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from agnostic_prefetch import _pool
from agnostic_prefetch._accounts import board_bytes, per_worker, worker_totals
from agnostic_prefetch._iterator import LoaderIterator
from agnostic_prefetch._layout import Layout, layout_from_example, with_mask
from agnostic_prefetch._options import check_shapes, let_go, local_batch_size, remainder_of
from agnostic_prefetch._resume import START, Position, decode, encode, iteration_end, order_settings
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._schedule import Scheduler
from agnostic_prefetch._sizing import plan_ring
from agnostic_prefetch._slots import SlotTable
from agnostic_prefetch._window import Snapshots
from agnostic_prefetch._worker import Job
from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import Sampler, item_rng

__all__ = ["Loader", "LoaderIterator"]


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
        batch_size: items per batch on this shard (this process).
        global_batch_size: instead of ``batch_size``: items per global batch, over all
            ``shard_count`` shards (``batch_size = global_batch_size / shard_count``).
        workers: worker count; 0 loads in the thread that iterates, on demand (for debugging).
        backend: ``"process"`` (fresh processes, off the GIL) or ``"thread"``.
        slots: ring slots; default ``workers + 6`` (``8 * workers + 6`` for slots of at most
            64 KiB): one per worker, plus what a training loop behind a prefetch stage of
            the default ``size=2`` holds at its peak (5, see ``Prefetcher.held_at_peak``),
            plus one. At least ``workers + 1``; a plain ``for`` loop is zero-copy from
            ``max(workers, 1) + 2`` on (it still holds the previous batch while the next one
            is handed over). Hold more than the ring allows and batches are copied out; a
            prefetch stage that would hold more warns, naming the ``slots=`` to pass.
        shuffle, seed: permute items per epoch from ``(seed, epoch)``.
        epochs: epochs one iteration covers; ``None`` never ends (no drain between epochs).
        drop_remainder: leave out a last global batch that would be short
            (``remainder="drop"``).
        remainder: what happens to a last global batch with fewer items than
            ``batch_size * shard_count``: ``"short"`` (the default with one shard: a shorter
            last batch), ``"pad"`` (every shard yields full batches, with a boolean leaf
            ``mask_key`` marking real rows; padding rows are zeros; examples must be dicts)
            or ``"drop"``. With several shards an uneven last batch needs ``"pad"`` or
            ``"drop"``: processes must feed equal shapes. ``"pad"`` also keeps shapes equal
            when ``on_error="skip"`` leaves records out (needed then with several shards).
        mask_key: the mask leaf's key with ``remainder="pad"``.
        transform: ``transform(example, rng) -> example``, run in the workers; ``rng`` is a
            ``numpy.random.Generator`` seeded from ``(seed, epoch, position)``. A transform
            with ``writes_into_slot = True`` is called with ``out=``, this item's place in
            the ring (a tree like the example, ``None`` for list leaves); an array it writes
            there is not copied again (``CaffeTransform`` does this).
        ordered: ``False`` delivers batches as they complete; contents stay the same.
        shard_index, shard_count: which slice of every global batch this process loads
            (slice ``s`` of ``S`` equal ones; :func:`~agnostic_prefetch.shard_for` derives
            them from a JAX sharding). The global batches do not depend on the shard count,
            so a ``state_dict`` saved with ``S`` shards resumes on any ``S'`` that divides
            the global batch (docs/elastic.md).
        on_error: ``"raise"`` or ``"skip"`` (bad records are left out, counted, logged).
        timeout: seconds a worker may go without progress before it is reported as hung.
        worker_init: ``worker_init(worker_id)`` run once in each worker.
        spec: an explicit example tree (arrays, or objects with ``shape`` and ``dtype``)
            for the slot layout instead of reading one example in the parent; with
            ``shapes="per_batch"``, each leaf's largest shape.
        shapes: ``"fixed"`` (every batch has the layout's shapes) or ``"per_batch"``: items
            may differ in shape, each batch takes the shapes of its first item (as Caffe's
            reshape does) and an item that differs from it is an error naming both
            records. Slots are sized from ``spec=``, never from a scan of the source. One
            shard only (every process must feed one shape); JAX compiles a step once per
            new shape.
        log_every: every this many seconds, log one line at INFO on the
            ``agnostic_prefetch`` logger: throughput, how long the step waited, how busy
            the workers were and what bounds throughput (see :func:`~agnostic_prefetch.diagnose`).

    Iterating: ``iter(loader)`` returns a :class:`LoaderIterator`, which owns its position
    (``state_dict()``). A second ``iter()`` ends the first iterator (its next ``next()``
    raises ``StopIteration``) and continues where ``loader.state_dict()`` says: the end of
    an iteration that was broken off, or else the next epoch.

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
        batch_size: int | None = None,
        *,
        global_batch_size: int | None = None,
        workers: int = 2,
        backend: str = "process",
        slots: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        drop_remainder: bool = False,
        remainder: str | None = None,
        mask_key: str = "mask",
        transform: Callable[[Any, np.random.Generator], Any] | None = None,
        ordered: bool = True,
        shard_index: int = 0,
        shard_count: int = 1,
        on_error: str = "raise",
        timeout: float | None = None,
        worker_init: Callable[[int], None] | None = None,
        spec: Any = None,
        shapes: str = "fixed",
        log_every: float | None = None,
    ) -> None:
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
        if log_every is not None and not log_every > 0:
            raise ValueError(f"log_every must be positive seconds or None, got {log_every}")
        batch_size = local_batch_size(batch_size, global_batch_size, shard_count)
        remainder = remainder_of(remainder, drop_remainder, on_error, shard_count)
        check_shapes(shapes, spec, shard_count, remainder)
        self._sampler = Sampler(source, batch_size, shuffle=shuffle, seed=seed,
                                remainder=remainder, shard_index=shard_index,
                                shard_count=shard_count)
        self._bpe = self._sampler.batches_per_epoch
        self.workers = workers
        self.backend = backend
        self.epochs = epochs
        self.ordered = ordered
        self.timeout = timeout
        self._skip = on_error == "skip"
        example = spec if spec is not None else self._read_example(source, transform)
        self._mask_key = mask_key if remainder == "pad" else None
        if self._mask_key is not None:
            example = with_mask(example, self._mask_key)
        self.layout: Layout = layout_from_example(example, self._sampler.batch_size)
        self._plan = plan_ring(workers, self.layout.slot_bytes, slots)
        self.slots = self._plan.slots
        self._settings = order_settings(self._sampler, ordered)
        self._settings["source_order"] = getattr(source, "order_fingerprint", None)
        self._by_source = getattr(source, "items_by_source", None)
        self._stats: dict[str, Any] = {"batches": 0, "items": 0, "padded": 0, "wait_s": 0.0,
                                       "skipped": 0, "copied_out": 0}
        if self._by_source is not None:
            self._stats["items_per_source"] = self._by_source(np.zeros(0, np.int64))
        self._warned_copy = False
        self._snapshots = Snapshots(weakref.ref(self), log_every)
        self._latest: LoaderIterator | None = None
        self._start: Position = START  # where the next iter() starts when there is no latest
        board_rows = max(1, workers)
        self._ring = Ring(self.slots, self.layout.slot_bytes, board_bytes(board_rows))
        workers_started: list[_pool.Worker] = []
        try:
            job = Job(source, transform, self.layout, self._sampler.seed, self._skip, worker_init,
                      self._mask_key, shapes == "per_batch", self._ring.extra_offset)
            workers_started = _pool.start(workers, backend, job, self._ring, self._plan.orders_per_worker)
            self._scheduler = Scheduler(self._sampler, self._ring, SlotTable(self.slots, self._plan.max_held),
                                        workers_started, timeout, lookahead=self.slots,
                                        board_rows=board_rows)
        except BaseException:
            _pool.stop(workers_started, 0.0)
            self._ring.close()
            raise
        self._workers = [w for w in workers_started if not isinstance(w, _pool.InProcessWorker)]
        self._finalizer = weakref.finalize(self, self._scheduler.close)

    # ---- public surface ---------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Batches one epoch yields (global batches: the same on every shard)."""
        return self._bpe

    @property
    def batch_size(self) -> int:
        """Rows of each batch this shard loads (``global_batch_size / shard_count``)."""
        return self._sampler.batch_size

    @property
    def global_batch_size(self) -> int:
        """Items per global batch, over all shards."""
        return self._sampler.global_batch_size

    @property
    def shard_index(self) -> int:
        return self._sampler.shard_index

    @property
    def shard_count(self) -> int:
        return self._sampler.shard_count

    def __len__(self) -> int:
        """Batches the next iteration yields (from where ``state_dict()`` says)."""
        if self.epochs is None:
            raise TypeError("a Loader with epochs=None never ends and has no length")
        position = self._position()
        return position.remaining(iteration_end(position, self.epochs, self._bpe))

    def __iter__(self) -> LoaderIterator:
        return self._begin(None, None)

    def _begin(self, iterator: LoaderIterator | None, position: Position | None) -> LoaderIterator:
        """Start an iteration from ``position`` (default: where the latest stands), run by
        ``iterator`` (default: a new one); the iterator it takes over from ends."""
        self._check_open()
        latest = self._latest
        if latest is not None and latest is not iterator:
            latest.cancel()  # its thread, if one waits inside, wakes and leaves
        scheduler = self._scheduler
        with scheduler.drive:
            self._check_open()
            latest = self._latest  # another thread may have started one meanwhile
            if latest is not None and latest is not iterator:
                latest.cancel()
            start = self._position() if position is None else position
            end = iteration_end(start, self.epochs, self._bpe)
            if iterator is None:
                iterator = LoaderIterator(self, scheduler, start._replace(end=end))
            else:
                iterator._restart(start._replace(end=end))
            scheduler.restart(iterator._position, end)
            self._latest = iterator
        scheduler.left()
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """The latest iterator's position (where the next ``iter()`` starts): small, JSON-able."""
        return encode(self._position(), self._settings, endless=self.epochs is None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` yields exactly the batches not yet delivered.

        A live iterator ends (its next ``next()`` raises ``StopIteration``).

        The state may come from any shard of a run with another shard count, worker count
        or backend, as long as the global batch is the same (docs/elastic.md).

        Raises:
            ValueError: the state cannot be continued exactly here: another seed, shuffle,
                source length or global batch (or one this shard count does not divide),
                another shard of an ``ordered=False`` run, or a version 1 state saved with
                several shards. The message names both values and the remedy.
        """
        self._check_open()
        position = decode(state, self._settings)
        latest = self._latest
        if latest is not None:
            latest.cancel()
        with self._scheduler.drive:
            if self._latest is not None:
                self._latest.cancel()  # one another thread started meanwhile
            self._latest = None
            self._start = position
        self._scheduler.left()

    def stats(self) -> dict[str, Any]:
        """Counters and per-stage times since the loader was built (docs/diagnose.md).

        Delivery: ``batches``, ``items``, ``padded`` (rows of padding), ``skipped``,
        ``copied_out``; ``items_per_source`` for a source that counts them (a
        :class:`~agnostic_prefetch.Mixture`).

        The caller: ``wait_s`` (time in ``next()``), of which ``blocked_s`` waiting for a
        worker and ``handoff_s`` the loader's own work (ordering, taking, handing out views);
        ``held_s``: worker-seconds without an order because every slot was taken (the
        consumer holds them, or has not taken the batches ready in them).

        The workers, summed over them: ``read_s`` / ``read_cpu_s`` (wall and CPU time in the
        source's ``__getitem__``: wall well above CPU means waiting on I/O), ``transform_s`` /
        ``transform_cpu_s``, ``write_s`` / ``write_cpu_s`` (into the slot), ``fill_s`` (their
        sum), ``worker_idle_s`` (waiting for an order); ``per_worker``: items, batches,
        ``busy_s`` and ``idle_s`` of each. CPU times are estimated from one item in 8.

        Also ``ring_bytes``, ``slots``, ``workers``, ``backend``.
        """
        scheduler = self._scheduler
        stats = {**self._stats, "ring_bytes": self._ring.nbytes, "slots": self.slots,
                 "workers": self.workers, "backend": self.backend}
        if "items_per_source" in stats:
            stats["items_per_source"] = dict(stats["items_per_source"])
        stats["blocked_s"] = scheduler.blocked_s
        stats["handoff_s"] = max(0.0, stats["wait_s"] - scheduler.blocked_s)
        stats["held_s"] = scheduler.held_s
        table = scheduler.board.table()
        stats.update(worker_totals(table))
        stats["fill_s"] = stats["read_s"] + stats["transform_s"] + stats["write_s"]
        stats["per_worker"] = per_worker(table)
        return stats

    def _snapshot_stats(self) -> dict[str, Any]:
        return self.stats()

    def close(self) -> None:
        """Stop the workers and release the ring (views you hold stay valid).

        A thread waiting inside the loader (a prefetch stage's, say) is woken and raises
        ``LoaderError``; the release happens once it has left.
        """
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._scheduler.closed

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader(batch_size={self._sampler.batch_size}, batches_per_epoch={self._bpe}, "
            f"{self._shard_repr()}workers={self.workers}, backend={self.backend!r}, ring={self.slots} slots x "
            f"{self.layout.slot_bytes:,} B + {self._ring.nbytes - self._ring.extra_offset:,} B of counters = "
            f"{self._ring.nbytes:,} B [{self.layout.describe()}]"
            f"{', closed' if self.closed else ''})"
        )

    # ---- helpers ------------------------------------------------------------------------

    def _shard_repr(self) -> str:
        sampler = self._sampler
        parts = []
        if sampler.shard_count > 1:
            parts.append(f"shard {sampler.shard_index} of {sampler.shard_count} of global batches of "
                         f"{sampler.global_batch_size}")
        if sampler.remainder != "short":
            parts.append(f"remainder={sampler.remainder!r}")
        return "".join(f"{p}, " for p in parts)

    def _position(self) -> Position:
        return self._latest._position if self._latest is not None else self._start

    def _close(self, grace: float) -> None:
        if self._finalizer.alive:
            self._finalizer.detach()
            self._scheduler.close(grace)

    def _check_open(self) -> None:
        if self.closed:
            raise LoaderError("this Loader is closed; build a new one (load_state_dict resumes exactly)")

    def _read_example(self, source: Any, transform: Any) -> Any:
        # From the whole global batch: this shard's slice of it may be empty (padding).
        try:
            return self._first_example(source, transform)
        finally:
            let_go(source)

    def _first_example(self, source: Any, transform: Any) -> Any:
        errors = []
        for position, index in enumerate(self._sampler.global_batch(0, 0).tolist()):
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

