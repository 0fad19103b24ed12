"""``torch_prefetch``: the prefetch stage's torch placements (CPU without a copy, CUDA on a side stream)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch.adapters._dlpack import array_kind, to_torch
from agnostic_prefetch.adapters._pinned import PinnedRegistry
from agnostic_prefetch.prefetch import Prefetcher


def torch_prefetch(iterable: Iterable[Any], size: int = 2, *, device: Any = "cpu",
                   stream: Any = None, thread: bool = True) -> Prefetcher:
    """Yield the batches of ``iterable`` as torch tensors on ``device``, ``size`` batches ahead.

    The same stage as :func:`~agnostic_prefetch.prefetch_to_device` (read-ahead thread,
    ``state_dict()``, ``load_state_dict()``, ``len()``, ``stats()``, ``close()``), with a
    torch placement.

    On the CPU every array leaf becomes a tensor sharing the loader's memory (DLPack, no
    copy); the ring slot stays leased while you hold the tensor, so it never changes under
    you.

    On CUDA the loader's ring is registered as page-locked memory once
    (``cudaHostRegister``), each batch is copied on a dedicated non-blocking stream as soon
    as it is pulled (in the stage's thread), and in your ``next()`` the consumer stream is
    made to wait on the copy's event (the host never waits); each tensor is
    ``record_stream``-ed on that stream so the caching allocator does not reuse its memory
    early. The consumer stream is ``stream=``, or else the stream current in your thread
    when you call ``next()``. The host batch, and so its ring slot, stays leased until the
    copy has completed. Arrays that do not come from a ring are copied from pageable
    memory (correct, slower).

    When it helps: on CUDA, when the copy of a batch takes a noticeable part of a step. On
    the CPU it only converts (and reads ``size`` batches ahead).

    Args:
        iterable: an iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
        size: batches kept in flight (>= 1).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        stream: the ``torch.cuda.Stream`` your step runs on (CUDA only).
        thread: pull and copy in a background thread (the default); ``False`` does it in
            ``next()``.

    Returns:
        A :class:`~agnostic_prefetch.prefetch.Prefetcher`.

    Raises:
        ValueError: ``size < 1``, or a device type other than cpu or cuda.
        RuntimeError: a CUDA device when torch has no CUDA.

    Example:
        >>> import numpy as np
        >>> batches = ({"x": np.full(3, i)} for i in range(2))
        >>> [b["x"].tolist() for b in torch_prefetch(batches, device="cpu")]
        [[0, 0, 0], [1, 1, 1]]
    """
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        placement: Any = _CpuPlacement()
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch_prefetch to {device}: this torch build sees no CUDA device")
        placement = _CudaPlacement(device, stream)
    else:
        raise ValueError(f"torch_prefetch supports cpu and cuda devices, got {device}")
    return Prefetcher(iterable, size, placement, thread=thread, name="torch_prefetch")


class _CpuPlacement:
    aliases_host = True  # the tensors view the ring slot (DLPack)

    def put(self, host: Any) -> tuple[Any, None]:
        return to_torch(host), None

    def hand_out(self, device: Any, token: Any) -> None:
        pass

    def done(self, token: Any) -> bool:
        return True  # the tensors view the host batch: their own references keep its slot

    def close(self) -> None:
        pass


class _CudaPlacement:
    """Copies on a side stream from page-locked ring memory; the consumer stream waits on an event."""

    aliases_host = False  # device copies: the ring slot goes back once the copy is done

    def __init__(self, device: Any, stream: Any = None) -> None:
        import torch

        self.torch = torch
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.consumer = stream  # None: the caller's current stream, asked in its own next()
        # PyTorch's pool streams are created non-blocking: no implicit sync with stream 0.
        self.stream = torch.cuda.Stream(device=self.device)
        cudart = torch.cuda.cudart()
        self.pinned = PinnedRegistry(
            register=lambda address, nbytes: cudart.cudaHostRegister(address, nbytes, 0),
            unregister=lambda address: cudart.cudaHostUnregister(address),
        )

    def put(self, host: Any) -> tuple[Any, tuple[Any, list[Any], Any]]:
        torch = self.torch
        leaves, treedef = flatten(host)
        out = []
        tensors = []
        # The current device and stream are per thread: set both here, in the stage's thread.
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            started = torch.cuda.Event(enable_timing=True)
            started.record(self.stream)
            for leaf in leaves:
                kind = array_kind(leaf)
                if kind is None:
                    out.append(leaf)
                    continue
                if kind == "numpy":
                    self.pinned.ensure(leaf)
                cpu = to_torch(leaf)  # zero-copy view of the slot
                # non_blocking from page-locked memory is a true async DMA on self.stream;
                # from pageable memory torch stages it synchronously (correct, slower).
                tensor = cpu.to(self.device, non_blocking=True)
                out.append(tensor)
                tensors.append(tensor)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        return unflatten(treedef, out), (event, tensors, started)

    def hand_out(self, device_tree: Any, token: tuple[Any, list[Any], Any]) -> None:
        event, tensors, _ = token
        consumer = self.consumer or self.torch.cuda.current_stream(self.device)
        consumer.wait_event(event)  # the consumer's stream waits, the host does not
        for tensor in tensors:
            # Allocated on the copy stream, used on the consumer's: tell the allocator.
            tensor.record_stream(consumer)

    def done(self, token: tuple[Any, list[Any], Any]) -> bool:
        return bool(token[0].query())

    def transfer_time(self, token: tuple[Any, list[Any], Any]) -> float:
        """Seconds the copies took on the GPU (timing events; once ``done``)."""
        return float(token[2].elapsed_time(token[0])) / 1000.0

    def close(self) -> None:
        self.stream.synchronize()  # no copy may still read the ring when it is unregistered
        self.pinned.close()
