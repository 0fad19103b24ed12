"""``cupy_prefetch``: the prefetch stage's CuPy placement, copying on a non-blocking CUDA stream."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch.adapters._dlpack import array_kind, import_cupy, to_numpy
from agnostic_prefetch.adapters._pinned import PinnedRegistry
from agnostic_prefetch.prefetch import Prefetcher


def cupy_prefetch(iterable: Iterable[Any], size: int = 2, *, device: int = 0, stream: Any = None,
                  thread: bool = True) -> Prefetcher:
    """Yield the batches of ``iterable`` as CuPy arrays on GPU ``device``, ``size`` batches ahead.

    The same contract as :func:`~agnostic_prefetch.adapters.torch_prefetch` on CUDA: the
    loader's ring is registered as page-locked memory once, each batch is copied on a
    non-blocking stream as soon as it is pulled (in the stage's thread), the consumer
    stream waits on the copy's event in your ``next()`` (not the host), and the ring slot
    stays leased until the copy has completed.

    CuPy's memory pool keeps one arena per stream and has no ``record_stream``, so each
    batch is allocated on the *consumer* stream — ``stream=``, or else the stream current
    when ``cupy_prefetch`` is called — and its copy starts after the work already queued
    there: use the batches on that stream.

    Args:
        iterable: an iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
        size: batches kept in flight (>= 1).
        device: CUDA device ordinal.
        stream: the ``cupy.cuda.Stream`` your step runs on.
        thread: pull and copy in a background thread (the default); ``False`` does it in
            ``next()``.

    Returns:
        A :class:`~agnostic_prefetch.prefetch.Prefetcher`.

    Raises:
        ImportError: CuPy is not installed. RuntimeError: no CUDA device (CuPy needs an
            NVIDIA GPU). TypeError: a bfloat16 leaf (CuPy has no bfloat16).

    Example:
        >>> for batch in cupy_prefetch(loader, size=2):  # doctest: +SKIP
        ...     step(batch["image"])
    """
    cupy = import_cupy()
    return Prefetcher(iterable, size, _CupyPlacement(cupy, device, stream), thread=thread,
                      name="cupy_prefetch")


class _CupyPlacement:
    aliases_host = False  # device copies: the ring slot goes back once the copy is done

    def __init__(self, cupy: Any, device: int, stream: Any = None) -> None:
        self.cupy = cupy
        self.device = cupy.cuda.Device(device)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
            # The consumer's stream, captured in the caller's thread: the stage's thread has
            # its own current stream.
            self.consumer = stream if stream is not None else cupy.cuda.get_current_stream()
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

    def put(self, host: Any) -> tuple[Any, Any]:
        cupy = self.cupy
        leaves, treedef = flatten(host)
        out: list[Any] = []
        copies: list[tuple[Any, np.ndarray]] = []
        # CuPy's pool keeps one arena per stream. Allocated on the side stream, an array the
        # consumer drops would go back to the side stream's arena and could be overwritten by
        # the next copy while the consumer's kernels still read it. So allocate on the
        # consumer's stream (where the batch is used and freed), and start the copies once
        # the consumer's work queued so far is done.
        with self.device, self.consumer:
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
            consumer_ready = self.consumer.record()
        with self.device, self.stream:
            self.stream.wait_event(consumer_ready)  # on the GPU; the host does not wait
            for d, a in copies:
                d.set(a, stream=self.stream)  # async from page-locked memory
            event = self.stream.record()
        return unflatten(treedef, out), event

    def hand_out(self, device_tree: Any, event: Any) -> None:
        with self.device:
            self.consumer.wait_event(event)

    def done(self, event: Any) -> bool:
        return bool(event.done)

    # No ``wait``: a copy here starts only after the consumer's queued work, so waiting for
    # it would time the training step, and hold the stage's thread behind it.

    def close(self) -> None:
        self.stream.synchronize()
        self.pinned.close()
