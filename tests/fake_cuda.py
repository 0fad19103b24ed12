"""Fakes of ``torch.cuda`` and ``cupy`` that log every CUDA call, for CPU tests of the CUDA placements.

As in CUDA, the current device and the current stream are per thread (``threading.local``),
so a test can check that a copy issued in the stage's thread ran on the side stream while
the consumer's stream, in the caller's thread, did the waiting. Every log entry ends with
the name of the thread that made the call.

What these fakes cannot show is real CUDA semantics: that a ``non_blocking`` copy from
registered memory is truly asynchronous, that ``wait_event`` orders the consumer's kernels
after the copy, that ``record_stream`` keeps the caching allocator from reusing memory too
early, that ``cudaHostRegister`` accepts the ring's memfd mapping, or how fast any of it is.
They encode our reading of those APIs; the GPU tests (marked ``gpu``) settle the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from dataclasses import dataclass

import numpy as np


def here() -> str:
    return threading.current_thread().name


def of(log: list[tuple], name: str) -> list[tuple]:
    return [entry for entry in log if entry[0] == name]


def index_of(log: list[tuple], name: str) -> list[int]:
    return [i for i, entry in enumerate(log) if entry[0] == name]


def host_syncs(log: list[tuple]) -> list[tuple]:
    return [entry for entry in log if "synchronize" in entry[0]]


def assert_close_synchronizes_then_unregisters(placement, log: list[tuple], register: str) -> None:
    """After one batch, ``close()`` is: synchronise the side stream, then unregister the ring."""
    from sources_for_tests import rows_loader

    with rows_loader() as loader:
        placement.put({"x": next(iter(loader))["x"]})
        [(_, address, _, _)] = of(log, register)
        mark = len(log)
        placement.close()
        after = log[mark:]
        assert [entry[0] for entry in after] == ["stream.synchronize", register.replace("Register", "Unregister")]
        assert after[0][1] is placement.stream and after[1][1] == address


def ring_address_and_length(m: mmap.mmap) -> tuple[int, int]:
    """The mapping's start address, found another way than the library's ``_address``."""
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view), len(m)
    finally:
        del view  # a live buffer export would keep the ring from closing


# ---- torch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeDevice:
    type: str
    index: int | None = None


class FakeStream:
    def __init__(self, log: list[tuple], name: str, device: FakeDevice) -> None:
        self.log, self.name, self.device = log, name, device

    def wait_event(self, event) -> None:
        self.log.append(("wait_event", self, event, here()))

    def synchronize(self) -> None:
        self.log.append(("stream.synchronize", self, here()))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, log: list[tuple], enable_timing: bool = False) -> None:
        self.log = log
        self.completed = False
        self.enable_timing = enable_timing

    def record(self, stream=None) -> None:
        self.log.append(("record", self, stream, here()))

    def query(self) -> bool:
        return self.completed

    def elapsed_time(self, end: FakeEvent) -> float:
        return 1.0  # milliseconds, as torch's


class FakeTensor:
    def __init__(self, torch: FakeTorch, values: np.ndarray, device: FakeDevice) -> None:
        self.torch, self.values, self.device = torch, values, device

    def to(self, device, non_blocking: bool = False) -> FakeTensor:
        cuda = self.torch.cuda
        # logs no reference to the host memory: the log must not keep a ring slot leased
        self.torch.log.append(("copy", device, non_blocking, cuda.current_stream(), cuda.current_index, here()))
        return FakeTensor(self.torch, self.values.copy(), device)

    def record_stream(self, stream) -> None:
        self.torch.log.append(("record_stream", self, stream, here()))


class FakeCudart:
    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:  # noqa: N802
        self.log.append(("cudaHostRegister", address, nbytes, flags))
        return 0

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802
        self.log.append(("cudaHostUnregister", address))
        return 0


class FakeTorchCuda:
    """``torch.cuda`` with two devices; in every thread each device's current stream starts as
    that device's default stream (``consumer[i]``)."""

    def __init__(self, torch: FakeTorch) -> None:
        self.torch = torch
        self.available = True
        self.consumer = {i: FakeStream(torch.log, f"consumer:{i}", FakeDevice("cuda", i)) for i in (0, 1)}
        self._local = threading.local()
        self._cudart = FakeCudart(torch.log)

    @property
    def current_index(self) -> int:
        return getattr(self._local, "index", 0)

    @current_index.setter
    def current_index(self, index: int) -> None:
        self._local.index = index

    @property
    def current(self) -> dict[int, FakeStream]:
        if not hasattr(self._local, "current"):
            self._local.current = dict(self.consumer)
        return self._local.current

    def is_available(self) -> bool:
        return self.available

    def current_device(self) -> int:
        return self.current_index

    def Stream(self, device=None) -> FakeStream:  # noqa: N802
        return FakeStream(self.torch.log, "side", device)

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # noqa: N802
        return FakeEvent(self.torch.log, enable_timing)

    def cudart(self) -> FakeCudart:
        return self._cudart

    def current_stream(self, device=None) -> FakeStream:
        return self.current[self.current_index if device is None else device.index]

    @contextlib.contextmanager
    def device(self, device):
        saved, self.current_index = self.current_index, device.index
        try:
            yield
        finally:
            self.current_index = saved

    @contextlib.contextmanager
    def stream(self, stream):
        index = stream.device.index
        saved, self.current[index] = self.current[index], stream
        try:
            yield
        finally:
            self.current[index] = saved

    def finish_waited_copies(self) -> None:
        """The GPU catches up with the copies the consumer has waited on (not the ones ahead)."""
        for entry in of(self.torch.log, "wait_event"):
            entry[2].completed = True


class FakeTorch:
    """Just enough of ``torch`` for ``_CudaPlacement``; every CUDA call lands in ``log``."""

    Tensor = FakeTensor

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.cuda = FakeTorchCuda(self)

    def device(self, spec, index: int | None = None) -> FakeDevice:
        if isinstance(spec, FakeDevice):
            return spec
        kind, _, number = str(spec).partition(":")
        return FakeDevice(kind, int(number) if number else index)

    def cpu_view(self, leaf: np.ndarray) -> FakeTensor:
        """Stands in for ``to_torch``: a CPU tensor over the leaf's memory."""
        return FakeTensor(self, leaf, FakeDevice("cpu"))


# ---- cupy ---------------------------------------------------------------------------------


class FakeCupyEvent:
    def __init__(self) -> None:
        self.done = False


class FakeCupyStream:
    def __init__(self, cuda: FakeCupyCuda, name: str, device: int, non_blocking: bool) -> None:
        self.cuda, self.name, self.device, self.non_blocking = cuda, name, device, non_blocking
        self._saved = threading.local()

    def __enter__(self) -> FakeCupyStream:
        self._saved.__dict__.setdefault("stack", []).append(self.cuda.current[self.device])
        self.cuda.current[self.device] = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.current[self.device] = self._saved.stack.pop()

    def record(self) -> FakeCupyEvent:
        event = FakeCupyEvent()
        self.cuda.log.append(("record", self, event, here()))
        return event

    def wait_event(self, event) -> None:
        self.cuda.log.append(("wait_event", self, event, here()))

    def synchronize(self) -> None:
        self.cuda.log.append(("stream.synchronize", self, here()))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeCupyDevice:
    def __init__(self, cuda: FakeCupyCuda, index: int) -> None:
        self.cuda, self.id = cuda, index
        self._saved = threading.local()

    def __enter__(self) -> FakeCupyDevice:
        self._saved.__dict__.setdefault("stack", []).append(self.cuda.current_device)
        self.cuda.current_device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.current_device = self._saved.stack.pop()


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"cudaError {status}")
        self.status = status


class FakeRuntime:
    CUDARuntimeError = CUDARuntimeError

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.fail_status: int | None = None

    def hostRegister(self, address: int, nbytes: int, flags: int) -> None:  # noqa: N802
        self.log.append(("hostRegister", address, nbytes, flags))
        if self.fail_status is not None:
            raise CUDARuntimeError(self.fail_status)

    def hostUnregister(self, address: int) -> None:  # noqa: N802
        self.log.append(("hostUnregister", address))


class FakeCupyCuda:
    """``cupy.cuda`` with two devices; current device and streams are per thread."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.consumer = {i: FakeCupyStream(self, f"consumer:{i}", i, False) for i in (0, 1)}
        self._local = threading.local()
        self.runtime = FakeRuntime(log)

    @property
    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    @current_device.setter
    def current_device(self, index: int) -> None:
        self._local.device = index

    @property
    def current(self) -> dict[int, FakeCupyStream]:
        if not hasattr(self._local, "current"):
            self._local.current = dict(self.consumer)
        return self._local.current

    def Device(self, index: int) -> FakeCupyDevice:  # noqa: N802
        return FakeCupyDevice(self, index)

    def Stream(self, non_blocking: bool = False) -> FakeCupyStream:  # noqa: N802
        return FakeCupyStream(self, "side", self.current_device, non_blocking)

    def get_current_stream(self) -> FakeCupyStream:
        return self.current[self.current_device]

    def finish_waited_copies(self) -> None:
        """The GPU catches up with the copies the consumer has waited on (not the ones ahead)."""
        for entry in of(self.log, "wait_event"):
            entry[2].done = True


class FakeCupyArray:
    def __init__(self, cupy: FakeCupy, shape: tuple[int, ...], dtype) -> None:
        self.cupy, self.shape, self.dtype = cupy, shape, np.dtype(dtype)
        self.device = cupy.cuda.current_device
        self.values: np.ndarray | None = None

    def set(self, a: np.ndarray, stream=None) -> None:
        cuda = self.cupy.cuda
        self.cupy.log.append(("set", a.ctypes.data, a.flags.c_contiguous, stream,
                              cuda.get_current_stream(), cuda.current_device, here()))
        assert a.shape == self.shape and a.dtype == self.dtype
        self.values = a.copy()


class FakeCupy:
    """Just enough of ``cupy`` for ``_CupyPlacement``; every call that matters lands in ``log``."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.cuda = FakeCupyCuda(self.log)

    def empty(self, shape, dtype) -> FakeCupyArray:
        self.log.append(("empty", tuple(shape), np.dtype(dtype), self.cuda.get_current_stream(),
                         self.cuda.current_device, here()))
        return FakeCupyArray(self, tuple(shape), dtype)
