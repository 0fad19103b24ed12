"""Which slice of every global batch a JAX process loads, read off a ``jax.sharding.Sharding``.

The loader's shard ``s`` of ``S`` is rows ``[s * G / S, (s + 1) * G / S)`` of each global
batch of ``G`` items. Which rows a process must load follows from where its addressable
devices sit in the sharding, not from ``jax.process_index()``: on a mesh whose batch axis
spans fewer hosts than there are processes, several processes hold the same rows (they are
replicas of each other) and must load the same slice. JAX is imported only when called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["process_rows", "shard_for"]


def process_rows(sharding: Any, global_batch_size: int, shape: tuple[int, ...] | None = None) -> dict[int, tuple[int, int]]:
    """Per JAX process, the rows ``(start, stop)`` of a global batch that its devices hold.

    Raises:
        ValueError: a process's devices hold rows that are not one contiguous run.
    """
    g = int(global_batch_size)
    spans: dict[int, list[tuple[int, int]]] = {}
    batch_sharding, global_shape = _batch_axis(sharding, g, shape)
    for device, index in batch_sharding.devices_indices_map(global_shape).items():
        start, stop, _ = index[0].indices(g)
        spans.setdefault(device.process_index, []).append((start, stop))
    rows = {}
    for process, parts in sorted(spans.items()):
        parts.sort()
        lo, hi = parts[0]
        for start, stop in parts[1:]:
            if start > hi:
                raise ValueError(
                    f"the devices of JAX process {process} hold rows {sorted(set(parts))} of a global "
                    f"batch of {g}, not one contiguous run, so no loader slice matches them. "
                    "Order the mesh's devices so that each process's devices are adjacent on the "
                    "batch axis (jax.experimental.mesh_utils.create_device_mesh does this).")
            hi = max(hi, stop)
        rows[process] = (lo, hi)
    return rows


def shard_for(sharding: Any, global_batch_size: int, *, process_index: int | None = None,
              shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """``shard_index`` and ``shard_count`` for this process's ``Loader``, from a sharding.

    The distinct row runs that processes hold must cut the global batch into equal
    contiguous slices; the slice this process's devices hold is its shard. Processes that
    hold the same rows get the same ``shard_index``.

    Args:
        sharding: the sharding of the batch's leaves (the batch axis first).
        global_batch_size: items per global batch (``G``).
        process_index: whose slice; default ``jax.process_index()``.
        shape: a leaf's global shape, for a sharding other than a ``NamedSharding`` that
            needs more than the batch axis (default ``(G,)``).

    Raises:
        ValueError: the processes' rows do not form equal contiguous slices, naming them.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
        >>> shard_for(sharding, 8)  # one process holds every row
        {'shard_index': 0, 'shard_count': 1}
        >>> # ap.Loader(source, global_batch_size=8, **shard_for(sharding, 8))
    """
    if process_index is None:
        import jax

        process_index = jax.process_index()
    g = int(global_batch_size)
    rows = process_rows(sharding, g, shape)
    slices = sorted(set(rows.values()))
    count = len(slices)
    if g % count or slices != [(k * g // count, (k + 1) * g // count) for k in range(count)]:
        held = ", ".join(f"process {p}: rows [{lo}, {hi})" for p, (lo, hi) in rows.items())
        raise ValueError(
            f"the processes' devices hold {held} of a global batch of {g}; a loader shard is one "
            f"of equal contiguous slices, and these are not. Use a sharding that splits the "
            "batch axis evenly over the processes (or over groups of replicas).")
    if process_index not in rows:
        raise ValueError(f"JAX process {process_index} holds no device of this sharding")
    return {"shard_index": slices.index(rows[process_index]), "shard_count": count}


def _batch_axis(sharding: Any, g: int, shape: tuple[int, ...] | None) -> tuple[Any, tuple[int, ...]]:
    """The sharding and a global shape to read the batch axis's split from.

    A ``NamedSharding`` is reduced to its batch axis (so other axes' splits, which need their
    own sizes, do not matter); any other sharding needs ``shape``, or is asked with ``(G,)``.
    """
    if shape is not None:
        if not shape or shape[0] != g:
            raise ValueError(f"shape={shape} must start with the global batch size {g}")
        return sharding, tuple(shape)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is not None and mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None)), (g,)
    return sharding, (g,)
