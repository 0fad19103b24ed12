"""The loader: configuration, the ring and workers it owns, and its public surface.

The loader owns its workers and its ring, like a scope: leaving it by any path (``close``,
``with``, an exception it raises, garbage collection, interpreter exit) stops both. It
never decodes anything itself (except with ``workers=0``, where the iterating thread is the
worker). The parts it puts together: ``_sizing`` (ring size), ``_ring`` and ``_slots`` (the
memory and each slot's state), ``_pool`` and ``_supervisor`` (workers), ``_schedule``
(orders and results), ``_iterator`` (position and delivery), ``_resume`` (state dicts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from agnostic_prefetch._assemble import assemble
from agnostic_prefetch._describe import describe
from agnostic_prefetch._iterator import LoaderIterator
from agnostic_prefetch._layout import Layout
from agnostic_prefetch._lengths import MEASURE_BATCH
from agnostic_prefetch._settings import LoaderOptions
from agnostic_prefetch._stream_core import StreamCore
from agnostic_prefetch._stream_iterator import StreamIterator
from agnostic_prefetch.batching import Bucket, Pack, Pad
from agnostic_prefetch.sources.huggingface import from_huggingface
from agnostic_prefetch.streams import as_stream

__all__ = ["Loader", "LoaderIterator"]


class Loader:
    """Loads batches in worker processes into a shared-memory ring and hands out views.

    Batches have the tree structure of one example, each array leaf with a leading batch
    axis; arrays are writable numpy views into the ring (no copy), valid for as long as you
    hold them. Non-array leaves (strings, paths) arrive as lists.

    Args:
        source: a map-style source: ``len(source)`` and ``source[i]`` returning a pytree
            (dicts, lists, tuples) of arrays and scalars. Sent to workers with cloudpickle;
            it should open files lazily. It may define ``__getitems__`` (one call per
            batch) and ``batch_order`` (see :class:`~agnostic_prefetch.BatchOrderSource`).
            A Hugging Face ``datasets.Dataset`` is taken as it is and read from its Arrow
            table (:class:`~agnostic_prefetch.HuggingFaceSource`; docs/sources.md). Or a
            stream: a torch ``IterableDataset``, :class:`~agnostic_prefetch.Stream` or
            :class:`~agnostic_prefetch.Fetcher`, each worker reading its own part, batches
            from the workers in turn (docs/streams.md).
        batch_size: items per batch on this shard (this process).
        global_batch_size: instead of ``batch_size``: items per global batch, over all
            ``shard_count`` shards (``batch_size = global_batch_size / shard_count``).
        workers: worker count; 0 loads in the thread that iterates (for debugging); ``"auto"``:
            one per CPU this process may use for a short probe, then enough to keep those CPUs
            busy, up to 8 per CPU (the ring is reserved for that many; docs/design.md).
            ``repr``, ``stats()["auto"]`` and one INFO log line say what it picked and why.
        backend: ``"process"`` (off the GIL), ``"thread"`` (your word that the source and
            transform are thread-safe), or with ``workers="auto"`` ``"auto"``: threads only
            for items that mostly wait (I/O) and only if the source, and the transform if
            any, declare ``thread_safe = True`` (class or instance attribute; ours do).
        slots: ring slots; default ``workers + 6`` (``8 * workers + 6`` for slots of at most
            64 KiB): one per worker, plus the 5 a loop behind a prefetch stage of ``size=2``
            holds at its peak (``Prefetcher.held_at_peak``), plus one. At least ``workers +
            1``. Hold more than the ring allows and batches are copied out (a prefetch stage
            that would warns, naming the ``slots=`` to pass).
        shuffle, seed: permute items per epoch from ``(seed, epoch)``; ``seed`` is a
            non-negative integer (Python or numpy), checked here.
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
            (:func:`~agnostic_prefetch.shard_for` derives them from a JAX sharding); a
            ``state_dict`` resumes on any shard count that divides the global batch
            (docs/elastic.md).
        on_error: ``"raise"`` or ``"skip"`` (bad records are left out, counted, logged).
        timeout: seconds a worker may go without progress before it is an error
            (``LoaderTimeoutError`` with the record and the worker's stack); ``None``: never.
        stall_warning: seconds a worker may go without progress before a WARNING is logged
            with the record it is on and its Python stack (once per stall; the loader keeps
            waiting); ``None``: no warning.
        max_worker_deaths: a worker process that dies (killed, out of memory, a crash in a
            decoder) is replaced and the batches it was filling are filled again, the same
            items with the same draws, so nothing is lost or repeated; a WARNING names each
            death and ``stats()["worker_deaths"]`` counts them. A record that kills every
            worker reading it is found and follows ``on_error`` (named, or left out). More
            than this many deaths in any 60 s stop the loader, naming every one; 0: the
            first death does (``WorkerDiedError``). Threads, ``workers=0`` and streams
            cannot be replaced: a death there stops the loader.
        worker_init: ``worker_init(worker_id)`` run once in each worker.
        spec: an explicit example tree (arrays, or objects with ``shape`` and ``dtype``)
            for the slot layout instead of reading one example in the parent; with
            ``shapes="per_batch"``, each leaf's largest shape (or a bound on it).
        shapes: ``"fixed"`` (every batch has the layout's shapes) or ``"per_batch"``: items
            may differ in shape, each batch takes the shapes of its first item (as Caffe's
            reshape does) and an item that differs from it is an error naming both
            records. Slots are sized from ``spec=`` (each leaf's largest shape) or else from
            the first example; a batch larger than that still arrives, through its worker's
            pipe (a copy, counted in ``stats()["outside_ring"]`` and logged once). One shard
            only (every process must feed one shape); JAX compiles a step once per new shape.
        batching: how items of varying length become a batch (docs/sequences.md):
            :class:`~agnostic_prefetch.Pad` (each item a row, padded), :class:`~agnostic_prefetch.Bucket`
            (batches of one length bucket) or :class:`~agnostic_prefetch.Pack` (rows of a fixed
            length holding several items); each sequence leaf ``key`` gets ``key_segment_ids``
            and ``key_positions``. Planned from every item's length before the epoch, so
            order, resume and any shard or worker count stay exact. Default: items of one
            shape, stacked.
        log_every: every this many seconds, log a line (INFO, logger ``agnostic_prefetch``):
            throughput, the step's wait, the workers' load, the bound (:func:`~agnostic_prefetch.diagnose`).
        trace: a path: a Chrome trace of this loader until ``close()`` (:func:`~agnostic_prefetch.trace`).

    Iterating: ``iter(loader)`` returns a :class:`LoaderIterator`, which owns its position
    (``state_dict()``). A second ``iter()`` ends the first iterator (its next ``next()``
    raises ``StopIteration``) and continues where ``loader.state_dict()`` says: the end of
    an iteration that was broken off, or else the next epoch.

    Threads and forks: loaders are independent, and may be built, read and closed from any
    thread. In a child made by ``os.fork()``, a loader of the parent's refuses to load
    (``LoaderError``; build a new one there) and its ``close()`` leaves the parent's alone
    (docs/design.md).

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
        workers: int | str = 2,
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
        stall_warning: float | None = 60.0,
        max_worker_deaths: int = 8,
        worker_init: Callable[[int], None] | None = None,
        spec: Any = None,
        shapes: str = "fixed",
        batching: Pad | Bucket | Pack | None = None,
        log_every: float | None = None,
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        self.options = LoaderOptions.from_arguments(
            batch_size=batch_size, global_batch_size=global_batch_size, shuffle=shuffle, seed=seed,
            epochs=epochs, drop_remainder=drop_remainder, remainder=remainder, mask_key=mask_key,
            ordered=ordered, shard_index=shard_index, shard_count=shard_count, workers=workers,
            backend=backend, slots=slots, timeout=timeout, stall_warning=stall_warning,
            max_worker_deaths=max_worker_deaths, worker_init=worker_init,
            transform=transform, on_error=on_error, spec=spec, shapes=shapes, batching=batching,
            log_every=log_every, trace=trace)
        source = from_huggingface(source) or as_stream(source) or source
        self._core = assemble(source, self.options, _measuring_pass(workers, backend))
        # What diagnose() reads: the core's timed snapshots of stats().
        self._snapshots = self._core.snapshots

    # ---- public surface ---------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches one epoch yields (global batches: the same on every shard); over a
        stream, its ``batches_per_epoch``, ``None`` where it has none (known at its end)."""
        core = self._core
        if isinstance(core, StreamCore):
            return core.stream.batches_per_epoch  # type: ignore[no-any-return]
        return core.bpe

    @property
    def batch_size(self) -> int:
        """Rows of each batch this shard loads (``global_batch_size / shard_count``)."""
        return self._core.sampler.batch_size

    @property
    def global_batch_size(self) -> int:
        """Items per global batch, over all shards."""
        return self._core.sampler.global_batch_size

    @property
    def shard_index(self) -> int:
        return self._core.sampler.shard_index

    @property
    def shard_count(self) -> int:
        return self._core.sampler.shard_count

    @property
    def epochs(self) -> int | None:
        """Epochs one iteration covers (``None``: endless)."""
        return self._core.epochs

    @property
    def ordered(self) -> bool:
        return self._core.ordered

    @property
    def timeout(self) -> float | None:
        return self.options.pool.timeout

    @property
    def layout(self) -> Layout:
        """Where each leaf of a batch sits in a ring slot (``repr`` lists the leaves)."""
        return self._core.layout

    @property
    def slots(self) -> int:
        """Slots in the ring."""
        return len(self._core.scheduler.table)

    @property
    def max_held(self) -> int:
        """Batches a consumer may hold at once before further ones are copied out of the ring
        (``slots`` less one per worker)."""
        return self._core.scheduler.table.max_held

    @property
    def workers(self) -> int:
        """Workers loading now (with ``workers="auto"``: the probe's, then what it picked)."""
        return self._core.scheduler.members.count

    @property
    def backend(self) -> str:
        """The workers' backend now (``"process"`` or ``"thread"``)."""
        return self._core.scheduler.members.backend

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes now serving (none with threads or ``workers=0``)."""
        return self._core.scheduler.members.pids

    def __len__(self) -> int:
        """Batches the next iteration yields (from where ``state_dict()`` says)."""
        return self._core.next_length()

    def __iter__(self) -> LoaderIterator:
        kind = StreamIterator if isinstance(self._core, StreamCore) else LoaderIterator
        return kind(self._core, self._core.begin(None, None))

    def state_dict(self) -> dict[str, Any]:
        """The latest iterator's position (where the next ``iter()`` starts): small, JSON-able."""
        core = self._core
        return core.state_of(core.position(), core.epochs is None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` yields exactly the batches not yet delivered.

        A live iterator ends (its next ``next()`` raises ``StopIteration``). A state that is
        refused changes nothing.

        The state may come from any shard of a run with another shard count, worker count
        or backend, as long as the global batch is the same (docs/elastic.md).

        Raises:
            ValueError: the state cannot be continued exactly here: another seed, shuffle,
                source length or global batch (or one this shard count does not divide),
                another shard of an ``ordered=False`` run, or a version 1 state saved with
                several shards. The message names both values and the remedy.
        """
        self._core.load(state)

    def stats(self) -> dict[str, Any]:
        """Counters and per-stage times since the loader was built (docs/diagnose.md).

        Delivery: ``batches``, ``items`` (with ``batching=``, rows: a packed row counts
        once however many items it holds), ``padded`` (rows of padding), ``skipped``,
        ``copied_out`` (batches copied out of the ring because the consumer held too many);
        ``held_peak``, the most batches the consumer held at once (the prefetch stage's and
        your code's), and ``slots_needed``, the ``slots=`` that would have copied none;
        ``items_per_source`` for a source that counts them (a :class:`~agnostic_prefetch.Mixture`).

        The caller: ``wait_s`` (time in ``next()``), of which ``blocked_s`` waiting for a
        worker and ``handoff_s`` the loader's own work (ordering, taking, handing out views);
        ``held_s``: worker-seconds without an order because every slot was taken (the
        consumer holds them, or has not taken the batches ready in them).

        The workers, summed over them: ``items_read`` (source items read; an item split
        across batches is read once for each), ``read_s`` / ``read_cpu_s`` (wall and CPU time in the
        source's ``__getitem__``: wall well above CPU means waiting on I/O), ``transform_s`` /
        ``transform_cpu_s``, ``write_s`` / ``write_cpu_s`` (into the slot), ``fill_s`` (their
        sum), ``worker_idle_s`` (waiting for an order); ``per_worker``: items, batches,
        ``busy_s`` and ``idle_s`` of each. CPU times are estimated from one item in 16.

        Also ``ring_bytes``, ``slots``, ``workers``, ``backend``; with ``workers="auto"``,
        ``auto``: what it picked, why, and the figures it picked from.
        """
        return self._core.stats_dict()

    def close(self) -> None:
        """Stop the workers and release the ring (views you hold stay valid).

        A thread waiting inside the loader (a prefetch stage's, say) is woken and raises
        ``LoaderError``; the release happens once it has left.
        """
        self._core.close()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return describe(self._core)


def _measuring_pass(workers: int | str, backend: str) -> Callable[[Any], Iterator[Any]]:
    """A pass of a loader with these workers over a source, yielding its batches in order
    (``batching=`` measures sequence lengths with it when nothing else gives them)."""
    count = 2 if workers == "auto" else int(workers)  # type: ignore[arg-type]

    def run(source: Any) -> Iterator[Any]:
        with Loader(source, MEASURE_BATCH, workers=count, backend="process" if backend == "auto" else backend,
                    stall_warning=None) as loader:
            yield from loader

    return run
