"""The JAX placement of the prefetch stage: ``prefetch_to_device`` keeps the next batches on device.

The stage itself (read-ahead, thread, position, close) is ``prefetch.py``; this module only
says how one batch goes to JAX devices: one device, a device list with flax's leading
device axis, a ``Sharding``, or several processes. JAX is imported when the stage is first
used, never by ``import agnostic_prefetch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from agnostic_prefetch.prefetch import Prefetcher

__all__ = ["prefetch_to_device"]

_PASS_THROUGH = (str, bytes, type(None))  # leaves that never go to a device (e.g. file names)


def prefetch_to_device(
    iterable: Iterable[Any],
    size: int = 2,
    *,
    devices: Sequence[Any] | None = None,
    sharding: Any = None,
    thread: bool = True,
    trace: str | os.PathLike[str] | None = None,
) -> Prefetcher:
    """Yield the batches of ``iterable`` as ``jax.Array`` s, keeping ``size`` more on device.

    Every array leaf of every batch is transferred as soon as the batch is pulled, so while
    your step runs on batch *k*, batches *k+1 … k+size* are already being copied. At most
    ``size + 1`` batches are pulled ahead of the one you hold (``size`` queued, one more
    being placed by the background thread); the stage holds
    ``Prefetcher.held_at_peak(size, thread)`` batches of the source at its peak, and warns
    if the ``Loader``'s ring is too small for that.

    When it helps: on GPUs and TPUs, where a host-to-device copy takes real time and can
    overlap the step (``size=2`` is usually enough). On the CPU backend JAX aliases the
    ring's memory instead of copying (no copy: the array is the batch), and keeps it for as
    long as any step it has queued reads the array. A loop that never waits for a result
    (JAX's asynchronous dispatch) runs ahead and holds ring slots: when the loader's ring
    runs short, the stage gives JAX a copy of each further batch instead (one ``memcpy``,
    in its thread, off your step), so the ring never runs out and nothing is copied out of
    it in your ``next()``. On GPUs the transfer is the copy, and a batch's ring slot goes
    back as soon as it is done.

    Placement:

    * default: every leaf goes to ``jax.local_devices()[0]``;
    * ``devices=[d0, d1, ...]`` (flax's convention): every leaf has a leading axis of
      length ``len(devices)``, and row *i* lands on device *i* (the same placement as
      ``flax.jax_utils.prefetch_to_device``);
    * ``sharding=``: a ``jax.sharding.Sharding`` for global arrays, e.g.
      ``NamedSharding(mesh, P("data"))`` splits the batch axis over a mesh. With several
      JAX processes each passes the rows of the global batch that its devices hold (load
      with ``ap.Loader(..., global_batch_size=G, **ap.shard_for(sharding, G))``; the stage
      checks a Loader's slice against the sharding) and the stage assembles global arrays
      with ``jax.make_array_from_process_local_data``. Every process must then feed the
      same local shape every step, or the collective that follows hangs: load with
      ``remainder="pad"`` (a mask marks the padding) or ``drop_remainder=True``.

    Resume: the returned iterator's ``state_dict()`` is the position after the batches
    *you* have received (the source iterator's position, taken right after each pull),
    ready for ``Loader.load_state_dict``: the batches in the prefetch queue are neither
    skipped nor repeated. ``load_state_dict(state)`` resumes in place when ``iterable`` is
    the ``Loader`` itself.

    Args:
        iterable: any iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
            String, bytes and ``None`` leaves pass through unchanged.
        size: batches kept in flight (>= 1).
        devices: a list of devices for the flax convention (see above).
        sharding: a ``jax.sharding.Sharding`` applied to every leaf.
        thread: pull and dispatch from a background thread (the default), so that
            ``next()`` only takes a batch off a queue: the loader's hand-off and
            ``jax.device_put`` overlap the step instead of adding to it (docs/device.md has
            the measurements). ``thread=False`` does that work in the caller's ``next()``;
            the source is then only touched from your thread.
        trace: a path: record a Chrome trace of this stage until ``close()`` (see
            :func:`~agnostic_prefetch.trace`).

    Returns:
        A :class:`~agnostic_prefetch.prefetch.Prefetcher`: iterate it; ``state_dict()``,
        ``load_state_dict()``, ``len()``, ``stats()``, ``close()``.

    Raises:
        ValueError: both ``devices`` and ``sharding``; ``size < 1``; a leaf whose leading
            axis does not match ``len(devices)`` or does not divide over ``sharding``; a
            local batch shape that differs from the first one when several processes feed
            one global array; a Loader whose slice is not the rows this process's devices
            hold. Each message names the leaf, its shape and the remedy.

    Example:
        >>> import numpy as np
        >>> batches = ({"x": np.full((4, 2), i, np.float32)} for i in range(3))
        >>> [float(b["x"].sum()) for b in prefetch_to_device(batches, size=2)]
        [0.0, 8.0, 16.0]
    """
    if devices is not None and sharding is not None:
        raise ValueError("pass devices= (flax's leading device axis) or sharding=, not both")
    placement = _JaxPlacement(devices, sharding)
    loader = _loader_of(iterable)
    if loader is not None and sharding is not None and not isinstance(sharding, placement.jax.Device):
        placement.check_loader(loader)
    return Prefetcher(iterable, size, placement, thread=thread, name="prefetch_to_device", trace=trace)


def _loader_of(iterable: Any) -> Any:
    """The Loader (or its iterator: it knows its shard too) behind ``iterable``, if any."""
    from agnostic_prefetch.loader import Loader, LoaderIterator

    return iterable if isinstance(iterable, Loader | LoaderIterator) else None


class _JaxPlacement:
    """One batch to JAX: a single device, the flax device list, or a sharding (several processes)."""

    def __init__(self, devices: Sequence[Any] | None, sharding: Any) -> None:
        import jax

        self.jax = jax
        self.devices = list(devices) if devices is not None else None
        self.multi_process = False
        self.first_shapes: list[tuple[str, tuple[int, ...]]] | None = None
        self.checked: tuple[Any, list[tuple[int, ...]]] | None = None  # the last layout checked
        self.global_batch: int | None = None  # known when the source is a Loader
        self.local_rows = 0
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
        targets = self.sharding.device_set if hasattr(self.sharding, "device_set") else {self.sharding}
        # A CPU "transfer" aliases the host buffer (a ring slot) for the array's life; JAX's
        # queued steps keep it. The stage copies such a batch instead when the ring runs short.
        self.aliases_host = self.copies_when_pressed = all(d.platform == "cpu" for d in targets)

    def put(self, batch: Any) -> tuple[Any, list[Any]]:
        jax = self.jax
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        moving = [i for i, leaf in enumerate(leaves) if not isinstance(leaf, _PASS_THROUGH)]
        # Checked when the structure or a shape changes, not every batch: this runs per step.
        checked = (treedef, [np.shape(leaves[i]) for i in moving])
        if checked != self.checked:
            self._check(batch, moving)
            self.checked = checked
        out = list(leaves)
        placed: list[Any] = []
        host = [leaves[i] for i in moving]
        if self.multi_process:
            g = self.global_batch
            placed = [jax.make_array_from_process_local_data(
                self.sharding, leaf, None if g is None else (g, *np.shape(leaf)[1:])) for leaf in host]
        elif moving:
            # One call for all leaves: JAX dispatches the transfers together.
            placed = jax.device_put(host, self.sharding)
        for i, array in zip(moving, placed, strict=True):
            out[i] = array
        return jax.tree_util.tree_unflatten(treedef, out), placed

    def check_loader(self, loader: Any) -> None:
        """Refuse a loader whose slice of each global batch is not the rows this process's
        devices hold (the global arrays would be assembled from the wrong rows)."""
        from agnostic_prefetch.sharding import process_rows, shard_for

        g = loader.global_batch_size
        want = shard_for(self.sharding, g)
        have = {"shard_index": loader.shard_index, "shard_count": loader.shard_count}
        lo, hi = process_rows(self.sharding, g)[self.jax.process_index()]
        if want != have:
            raise ValueError(
                f"this process's devices hold rows [{lo}, {hi}) of each global batch of {g}: "
                f"slice {want['shard_index']} of {want['shard_count']}, but the Loader loads "
                f"slice {have['shard_index']} of {have['shard_count']}. Build it with "
                f"ap.Loader(..., global_batch_size={g}, **ap.shard_for(sharding, {g})).")
        if self.multi_process:  # one process: a short last batch is split as any batch is
            self.global_batch, self.local_rows = g, hi - lo

    def hand_out(self, device: Any, token: Any) -> None:
        pass  # JAX orders its own transfers before any computation that reads them

    def done(self, placed: list[Any]) -> bool:
        # A transfer still in progress may read the host batch (its ring slot).
        return all(a.is_ready() for a in placed if hasattr(a, "is_ready"))

    def wait(self, placed: list[Any]) -> None:
        self.jax.block_until_ready(placed)

    def close(self) -> None:
        pass

    def _check(self, batch: Any, moving: list[int]) -> None:
        paths_leaves = self.jax.tree_util.tree_flatten_with_path(batch)[0]
        named = [(self.jax.tree_util.keystr(paths_leaves[i][0]) or "<batch>", paths_leaves[i][1]) for i in moving]
        if self.multi_process:
            self._check_same_local_shapes([(name, np.shape(leaf)) for name, leaf in named])
        if self.global_batch is not None:
            for name, leaf in named:
                if np.shape(leaf)[:1] != (self.local_rows,):
                    raise ValueError(
                        f"leaf {name} has shape {np.shape(leaf)}, but this process's devices "
                        f"hold {self.local_rows} rows of each global batch of "
                        f"{self.global_batch}. A short last batch cannot be placed: load "
                        "with remainder='pad' or drop_remainder=True.")
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
                    "sharded axis, and load with remainder='pad' or drop_remainder=True so "
                    "the last batch is full too."
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
                    "remainder='pad' or drop_remainder=True (and the same batch_size everywhere)."
                )
        if len(shapes) != len(self.first_shapes):
            raise ValueError(
                f"this batch has {len(shapes)} array leaves but the first had "
                f"{len(self.first_shapes)}; every batch must have the same structure"
            )
