"""``torch_prefetch``: loader batches as torch tensors, on the CPU without a copy, on CUDA ahead of time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch.adapters._dlpack import array_kind, to_torch
from agnostic_prefetch.adapters._inflight import InFlight
from agnostic_prefetch.adapters._pinned import PinnedRegistry


def torch_prefetch(iterator: Iterable[Any], device: Any = "cpu", size: int = 2) -> InFlight:
    """Yield the batches of ``iterator`` as torch tensors on ``device``, ``size`` batches ahead.

    On the CPU every array leaf becomes a tensor sharing the loader's memory (DLPack, no
    copy); the ring slot stays leased while you hold the tensor, so it never changes
    under you.

    On CUDA the loader's ring is registered as page-locked memory once
    (``cudaHostRegister``), each batch is copied on a dedicated non-blocking stream as soon
    as it is pulled, and when the batch is handed out the *current* stream is made to wait
    on the copy's event (the host never waits); each tensor is recorded on that stream so
    the caching allocator does not reuse its memory early. The host batch, and so its ring
    slot, stays leased until the copy has completed. Arrays that do not come from a ring
    are copied from pageable memory (correct, slower).

    When it helps: on CUDA, when the copy of a batch takes a noticeable part of a step. On
    the CPU it only converts (and reads ``size`` batches ahead).

    Args:
        iterator: an iterable of pytrees of numpy arrays (a ``Loader``, a generator, ...).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        size: batches kept in flight (>= 1).

    Returns:
        An iterator with ``state_dict()`` (the position of what you received, for
        ``Loader.load_state_dict``) and ``close()``.

    Raises:
        ValueError: ``size < 1``, or a device type other than cpu or cuda.
        RuntimeError: a CUDA device when torch has no CUDA.

    Example:
        >>> import numpy as np
        >>> batches = ({"x": np.full(3, i)} for i in range(2))
        >>> [b["x"].tolist() for b in torch_prefetch(batches, "cpu")]
        [[0, 0, 0], [1, 1, 1]]
    """
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        placement: Any = _CpuPlacement()
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch_prefetch to {device}: this torch build sees no CUDA device")
        placement = _CudaPlacement(device)
    else:
        raise ValueError(f"torch_prefetch supports cpu and cuda devices, got {device}")
    return InFlight(iterator, size, placement)


def _done() -> bool:
    return True


class _CpuPlacement:
    def put(self, host: Any) -> tuple[Any, Callable[[], bool]]:
        return to_torch(host), _done

    def hand_out(self, device: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _CudaPlacement:
    """Copies on a side stream from page-locked ring memory; the consumer waits on an event."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        # PyTorch's pool streams are created non-blocking: no implicit sync with stream 0.
        self.stream = torch.cuda.Stream(device=self.device)
        cudart = torch.cuda.cudart()
        self.pinned = PinnedRegistry(
            register=lambda address, nbytes: cudart.cudaHostRegister(address, nbytes, 0),
            unregister=lambda address: cudart.cudaHostUnregister(address),
        )
        self.events: dict[int, Any] = {}  # id(device tree) -> its copy's event, until handed out

    def put(self, host: Any) -> tuple[Any, Callable[[], bool]]:
        torch = self.torch
        leaves, treedef = flatten(host)
        out = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for leaf in leaves:
                if array_kind(leaf) is None:
                    out.append(leaf)
                    continue
                if array_kind(leaf) == "numpy":
                    self.pinned.ensure(leaf)
                cpu = to_torch(leaf)  # zero-copy view of the slot
                # non_blocking from page-locked memory is a true async DMA on self.stream;
                # from pageable memory torch stages it synchronously (correct, slower).
                out.append(cpu.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self.stream)
        tree = unflatten(treedef, out)
        self.events[id(tree)] = (event, out)
        return tree, event.query

    def hand_out(self, device_tree: Any) -> None:
        event, leaves = self.events.pop(id(device_tree))
        consumer = self.torch.cuda.current_stream(self.device)
        consumer.wait_event(event)  # the consumer's stream waits, the host does not
        for leaf in leaves:
            if isinstance(leaf, self.torch.Tensor):
                # Allocated on the copy stream, used on the consumer's: tell the allocator.
                leaf.record_stream(consumer)

    def close(self) -> None:
        self.stream.synchronize()  # no copy may still read the ring when it is unregistered
        self.events.clear()
        self.pinned.close()
