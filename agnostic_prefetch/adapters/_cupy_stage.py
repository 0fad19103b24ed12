"""``cupy_prefetch``: loader batches as CuPy arrays, copied ahead on a non-blocking CUDA stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch.adapters._dlpack import array_kind, import_cupy, to_numpy
from agnostic_prefetch.adapters._inflight import InFlight
from agnostic_prefetch.adapters._pinned import PinnedRegistry


def cupy_prefetch(iterator: Iterable[Any], size: int = 2, device: int = 0) -> InFlight:
    """Yield the batches of ``iterator`` as CuPy arrays on GPU ``device``, ``size`` batches ahead.

    The same contract as :func:`torch_prefetch` on CUDA: the loader's ring is registered as
    page-locked memory once, each batch is copied on a non-blocking stream as soon as it is
    pulled, the consumer's current stream waits on the copy's event (not the host), and the
    ring slot stays leased until the copy has completed. The arrays are allocated on the
    stream that is current when the batch is pulled (CuPy's pool reuses memory per stream),
    and their copy starts after the work already queued on that stream: use the batches on
    that stream.

    Args:
        iterator: an iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
        size: batches kept in flight (>= 1).
        device: CUDA device ordinal.

    Returns:
        An iterator with ``state_dict()`` and ``close()``.

    Raises:
        ImportError: CuPy is not installed. RuntimeError: no CUDA device (CuPy needs an
            NVIDIA GPU). TypeError: a bfloat16 leaf (CuPy has no bfloat16).

    Example:
        >>> for batch in cupy_prefetch(loader, size=2):  # doctest: +SKIP
        ...     step(batch["image"])
    """
    cupy = import_cupy()
    return InFlight(iterator, size, _CupyPlacement(cupy, device))


class _CupyPlacement:
    def __init__(self, cupy: Any, device: int) -> None:
        self.cupy = cupy
        self.device = cupy.cuda.Device(device)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        runtime = cupy.cuda.runtime

        def register(address: int, nbytes: int) -> int:
            try:
                runtime.hostRegister(address, nbytes, 0)
                return 0
            except runtime.CUDARuntimeError as exc:
                return int(getattr(exc, "status", -1))

        def unregister(address: int) -> int:
            runtime.hostUnregister(address)
            return 0

        self.pinned = PinnedRegistry(register, unregister)
        self.events: dict[int, Any] = {}

    def put(self, host: Any) -> tuple[Any, Callable[[], bool]]:
        cupy = self.cupy
        leaves, treedef = flatten(host)
        out: list[Any] = []
        copies: list[tuple[Any, np.ndarray]] = []
        with self.device:
            # CuPy's pool keeps one arena per stream. Allocated on the side stream, an array
            # the consumer drops would go back to the side stream's arena and could be
            # overwritten by the next copy while the consumer's kernels still read it. So
            # allocate on the consumer's stream (where the batch is used and freed), and
            # start the copies once the consumer's work queued so far is done.
            for leaf in leaves:
                kind = array_kind(leaf)
                if kind is None:
                    out.append(leaf)
                    continue
                a = np.asarray(leaf) if kind == "numpy" else to_numpy(leaf)
                if a.dtype.name == "bfloat16":
                    raise TypeError("CuPy has no bfloat16 dtype; view the leaf as uint16 in the transform")
                if kind == "numpy":
                    self.pinned.ensure(a)
                if not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)  # a strided host copy cannot be one DMA
                d = cupy.empty(a.shape, a.dtype)
                copies.append((d, a))
                out.append(d)
            consumer_ready = cupy.cuda.get_current_stream().record()
            with self.stream:
                self.stream.wait_event(consumer_ready)  # on the GPU; the host does not wait
                for d, a in copies:
                    d.set(a, stream=self.stream)  # async from page-locked memory
                event = self.stream.record()
        tree = unflatten(treedef, out)
        self.events[id(tree)] = event
        return tree, lambda: event.done

    def hand_out(self, device_tree: Any) -> None:
        event = self.events.pop(id(device_tree))
        with self.device:
            self.cupy.cuda.get_current_stream().wait_event(event)

    def close(self) -> None:
        self.stream.synchronize()
        self.events.clear()
        self.pinned.close()
