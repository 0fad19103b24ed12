"""The JAX device stage: ``prefetch_to_device`` keeps the next batches already on device.

It pulls batches ahead of its caller, so whatever it reads from (a :class:`Loader`) is
further along than the training loop; its iterator's ``state_dict()`` reports the position
of what the caller actually received. JAX is imported when the stage is first used, never
by ``import agnostic_prefetch``.
"""

from __future__ import annotations

import collections
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["DevicePrefetcher", "prefetch_to_device"]

_PASS_THROUGH = (str, bytes, type(None))  # leaves that never go to a device (e.g. file names)


def prefetch_to_device(
    iterator: Iterable[Any],
    size: int = 2,
    *,
    devices: Sequence[Any] | None = None,
    sharding: Any = None,
    thread: bool = True,
) -> DevicePrefetcher:
    """Yield the batches of ``iterator`` as ``jax.Array`` s, keeping ``size`` more on device.

    Every array leaf of every batch is transferred as soon as the batch is pulled, so while
    your step runs on batch *k*, batches *k+1 … k+size* are already being copied. At most
    ``size + 1`` batches are pulled from ``iterator`` ahead of the one you hold (``size``
    queued, one more being placed by the background thread).

    When it helps: on GPUs and TPUs, where a host-to-device copy takes real time and can
    overlap the step (``size=2`` is usually enough). On the CPU backend a transfer is nearly
    free — JAX usually aliases the numpy buffer instead of copying — so the stage mostly
    just converts; the loader's worker processes are what keep a CPU loop fed. Because JAX
    may alias the host buffer for the array's whole life, a batch from a :class:`Loader`
    keeps its ring slot leased while you hold the ``jax.Array``: it never changes under you,
    but hold many and the loader copies batches out instead (it logs that once).

    Placement:

    * default: every leaf goes to ``jax.local_devices()[0]``;
    * ``devices=[d0, d1, ...]`` (flax's convention): every leaf has a leading axis of
      length ``len(devices)``, and row *i* lands on device *i* (the same placement as
      ``flax.jax_utils.prefetch_to_device``);
    * ``sharding=``: a ``jax.sharding.Sharding`` for global arrays, e.g.
      ``NamedSharding(mesh, P("data"))`` splits the batch axis over a mesh. With several
      JAX processes each passes its own part of the batch (load with
      ``shard_index=jax.process_index(), shard_count=jax.process_count()``) and the stage
      assembles global arrays with ``jax.make_array_from_process_local_data``. Every
      process must then feed the same local shape every step, or the collective that
      follows hangs: load with ``drop_remainder=True``.

    Resume: if ``iterator`` has ``state_dict()`` (a :class:`Loader`), the returned
    iterator's ``state_dict()`` is the position after the batches *you* have received,
    ready for ``Loader.load_state_dict``: the batches sitting in the prefetch queue are
    neither skipped nor repeated.

    Args:
        iterator: any iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
            String, bytes and ``None`` leaves pass through unchanged.
        size: batches kept in flight (>= 1).
        devices: a list of devices for the flax convention (see above).
        sharding: a ``jax.sharding.Sharding`` applied to every leaf.
        thread: pull and dispatch from a background thread (the default), so that
            ``next()`` only takes a batch off a queue: the loader's hand-off and
            ``jax.device_put`` (about 0.3 ms a batch here) overlap the step instead of
            adding to it. In benchmark S3 it cut the step's data wait from 4.6-10.3 %
            to 0.3-2.5 % of wall time (docs/device.md). ``thread=False`` does that work
            in the caller's ``next()``; the source is then only touched from your thread.

    Returns:
        A :class:`DevicePrefetcher`: iterate it; ``state_dict()``; ``close()``.

    Raises:
        ValueError: both ``devices`` and ``sharding``; ``size < 1``; a leaf whose leading
            axis does not match ``len(devices)`` or does not divide over ``sharding``; a
            local batch shape that differs from the first one when several processes feed
            one global array. Each message names the leaf, its shape and the remedy.

    Example:
        >>> import numpy as np
        >>> batches = ({"x": np.full((4, 2), i, np.float32)} for i in range(3))
        >>> [float(b["x"].sum()) for b in prefetch_to_device(batches, size=2)]
        [0.0, 8.0, 16.0]
    """
    return DevicePrefetcher(iterator, size, devices=devices, sharding=sharding, thread=thread)


class _Placement:
    """How one batch goes to device: single device, the flax device list, or a sharding."""

    def __init__(self, devices: Sequence[Any] | None, sharding: Any) -> None:
        import jax

        self.jax = jax
        self.devices = list(devices) if devices is not None else None
        self.multi_process = False
        self.first_shapes: list[tuple[str, tuple[int, ...]]] | None = None
        self.checked: tuple[Any, list[tuple[int, ...]]] | None = None  # the last layout checked
        if self.devices is not None:
            if not self.devices:
                raise ValueError("devices=[] is empty; pass at least one device, or None")
            mesh = jax.sharding.Mesh(np.array(self.devices), ("devices",))
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        elif sharding is not None:
            self.sharding = sharding
            self.multi_process = jax.process_count() > 1
        else:
            self.sharding = jax.local_devices()[0]

    def put(self, batch: Any) -> Any:
        jax = self.jax
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        moving = [i for i, leaf in enumerate(leaves) if not isinstance(leaf, _PASS_THROUGH)]
        # Checked when the structure or a shape changes, not every batch: this runs per step.
        checked = (treedef, [np.shape(leaves[i]) for i in moving])
        if checked != self.checked:
            self._check(batch, moving)
            self.checked = checked
        out = list(leaves)
        if self.multi_process:
            for i in moving:
                out[i] = jax.make_array_from_process_local_data(self.sharding, leaves[i])
        elif moving:
            # One call for all leaves: JAX dispatches the transfers together.
            placed = jax.device_put([leaves[i] for i in moving], self.sharding)
            for i, array in zip(moving, placed, strict=True):
                out[i] = array
        return jax.tree_util.tree_unflatten(treedef, out)

    def _check(self, batch: Any, moving: list[int]) -> None:
        paths_leaves = self.jax.tree_util.tree_flatten_with_path(batch)[0]
        named = [(self.jax.tree_util.keystr(paths_leaves[i][0]) or "<batch>", paths_leaves[i][1]) for i in moving]
        if self.multi_process:
            self._check_same_local_shapes([(name, np.shape(leaf)) for name, leaf in named])
        for name, leaf in named:
            self._check_leaf(name, leaf)

    def _check_leaf(self, name: str, leaf: Any) -> None:
        shape = np.shape(leaf)
        if self.devices is not None:
            n = len(self.devices)
            if not shape or shape[0] != n:
                raise ValueError(
                    f"leaf {name} has shape {shape}, but with devices= (flax's convention) "
                    f"every leaf needs a leading axis of length len(devices)={n}. Reshape "
                    f"each batch to (n_devices, batch // n_devices, ...), e.g. "
                    f"x.reshape({n}, -1, *x.shape[1:]), or pass sharding= to split the "
                    "batch axis for you."
                )
        elif not isinstance(self.sharding, self.jax.Device) and not self.multi_process:
            try:
                self.sharding.shard_shape(shape)
            except Exception as exc:  # JAX raises ValueError or TypeError depending on version
                raise ValueError(
                    f"leaf {name} with shape {shape} cannot be split by {self.sharding}: "
                    f"{exc}. Make the batch size a multiple of the number of devices on the "
                    "sharded axis, and load with drop_remainder=True so the last batch is "
                    "full too."
                ) from exc

    def _check_same_local_shapes(self, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        if self.first_shapes is None:
            self.first_shapes = shapes
            return
        for (name, shape), (_, first) in zip(shapes, self.first_shapes, strict=False):
            if shape != first:
                raise ValueError(
                    f"leaf {name} has local shape {shape} in process "
                    f"{self.jax.process_index()}, but the first batch had {first}. With "
                    f"{self.jax.process_count()} processes every process must feed the same "
                    "local shape every step, or the step's collectives hang. Load with "
                    "drop_remainder=True (and the same batch_size everywhere)."
                )
        if len(shapes) != len(self.first_shapes):
            raise ValueError(
                f"this batch has {len(shapes)} array leaves but the first had "
                f"{len(self.first_shapes)}; every batch must have the same structure"
            )


class _Puller:
    """Pulls the next batch, notes the source's position right after it, places it."""

    def __init__(self, source: Iterator[Any], state_of: Any, placement: _Placement) -> None:
        self.source = source
        self.state_of = state_of
        self.placement = placement

    def __call__(self) -> _Entry | None:
        """The next batch placed on device, or None at the end of the source."""
        try:
            host = next(self.source)
        except StopIteration:
            return None
        state = self.state_of() if self.state_of is not None else None
        return _Entry(self.placement.put(host), host, state)


class _Entry:
    """A batch in flight: its device arrays, the host batch it came from, the source state."""

    __slots__ = ("device", "host", "state")

    def __init__(self, device: Any, host: Any, state: Any) -> None:
        self.device = device
        # Held until the batch is handed out (and then one step more, see __next__): on an
        # accelerator the transfer may still read the host buffer, i.e. the ring slot.
        self.host = host
        self.state = state


_DONE = object()


class _Feeder:
    """The background thread's side: pulls, places, queues; owned and stopped by the prefetcher.

    Holds no reference to the prefetcher, so dropping the prefetcher lets its finalizer
    stop this thread.
    """

    def __init__(self, pull: Any, size: int) -> None:
        self.pull = pull
        # Bounded: the thread holds at most one entry beyond the queue, so at most
        # size + 1 batches are pulled ahead of the caller.
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        # Batches the caller has moved past, freed here rather than in the caller's thread:
        # freeing a jax.Array releases the GIL, and this thread would take it mid-step.
        self.retired: list[_Entry] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="agnostic_prefetch-device", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.retired.clear()
            try:
                item: Any = self.pull()
            except BaseException as exc:  # handed to the caller, who re-raises it
                item = exc
            if item is None:
                item = _DONE
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _DONE or isinstance(item, BaseException):
                self.retired.clear()
                return

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set() or (not self.thread.is_alive() and self.queue.empty()):
                    return _DONE

    def close(self) -> None:
        self.stop.set()
        # A thread waiting inside the source for its next batch cannot see ``stop``; an
        # iterator that can be told to end (a Loader's) is told to, so the join is short.
        cancel = getattr(self.pull.source, "cancel", None)
        if cancel is not None:
            cancel()
        self.retired.clear()
        while True:  # drop queued batches: their ring slots go back to the loader
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)


class DevicePrefetcher:
    """Iterator returned by :func:`prefetch_to_device`; see there.

    ``state_dict()`` is the source's position after the batches this iterator has handed
    out (or the position before the first pull); ``None`` if the source has no
    ``state_dict``. ``close()`` stops the background thread, if any, and drops the batches
    in flight; a ``with`` block or garbage collection does the same.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        size: int = 2,
        *,
        devices: Sequence[Any] | None = None,
        sharding: Any = None,
        thread: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (batches kept in flight), got {size}")
        if devices is not None and sharding is not None:
            raise ValueError("pass devices= (flax's leading device axis) or sharding=, not both")
        self.size = int(size)
        # Checked before iter(): a Loader's state_dict belongs to the Loader, not its iterator.
        state_of = getattr(iterable, "state_dict", None)
        self._state = state_of() if state_of is not None else None
        self._pull = _Puller(iter(iterable), state_of, _Placement(devices, sharding))
        self._queue: collections.deque[_Entry] = collections.deque()
        self._last: _Entry | None = None
        self._exhausted = False
        self._error: Exception | None = None  # from the source, raised once the queue is drained
        self._feeder: _Feeder | None = None
        if thread:
            self._feeder = _Feeder(self._pull, self.size)
            self._finalizer = weakref.finalize(self, self._feeder.close)
        else:
            self._fill(self.size)

    def _fill(self, n: int) -> None:
        while n > 0 and not self._exhausted:
            try:
                entry = self._pull()
            except Exception as exc:  # raised after the batches pulled before it, as with the thread
                self._error = exc
                self._exhausted = True
                return
            if entry is None:
                self._exhausted = True
                return
            self._queue.append(entry)
            n -= 1

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._feeder is not None:
            item = self._feeder.get()
            if item is _DONE:
                self.close()  # the batches the thread had yet to free: their slots go back now
                raise StopIteration
            if isinstance(item, BaseException):
                self.close()
                raise item
            entry = item
        else:
            if not self._queue:
                error, self._error = self._error, None
                self.close()
                if error is not None:
                    raise error
                raise StopIteration
            entry = self._queue.popleft()
            # Start the next transfer before handing this batch out, so it overlaps the step.
            self._fill(1)
        self._state = entry.state
        # Keep the previous batch until now: by the time the caller asks for the next batch,
        # a step has consumed the previous one, so its transfer is long complete. With the
        # thread, the thread frees it: then the caller's own reference is the last one only
        # if it kept the batch, and its ``batch = next(it)`` does not free arrays mid-loop.
        if self._feeder is not None and self._last is not None:
            self._feeder.retired.append(self._last)
        self._last = entry
        return entry.device

    def state_dict(self) -> dict[str, Any] | None:
        """The source's position after the batches handed out so far (``None`` without one)."""
        return self._state

    def close(self) -> None:
        """Stop the background thread (if any) and drop the batches in flight."""
        if self._feeder is not None:
            self._finalizer()
        self._queue.clear()
        self._last = None

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
