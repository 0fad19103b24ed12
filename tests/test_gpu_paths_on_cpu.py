"""CPU tests of the CUDA orchestration of ``torch_prefetch`` and ``cupy_prefetch``, with fakes.

This machine has no GPU, so ``_CudaPlacement`` and ``_CupyPlacement`` never ran for real and
their GPU tests in test_adapters.py skip. Everything around CUDA that does not need it runs
here: finding and page-locking the loader's ring (``mapping_of``, ``PinnedRegistry``), the
read-ahead and lease keeping of ``InFlight``, and the calls each placement makes, in order, on
fake ``torch`` and ``cupy`` objects that log them (which stream was current during a copy,
when the event was recorded, who waits on it, what ``close`` does first).

What these tests cannot show is real CUDA semantics: that a ``non_blocking`` copy from
registered memory is truly asynchronous, that ``wait_event`` orders the consumer's kernels
after the copy, that ``record_stream`` keeps the caching allocator from reusing memory too
early, that ``cudaHostRegister`` accepts the ring's memfd mapping, or how fast any of it is.
The fakes encode our reading of those APIs; if that reading is wrong, these tests still pass.
Only the skipped GPU tests, run on a CUDA machine, can settle that.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import mmap
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import pytest

import agnostic_prefetch as ap
from agnostic_prefetch.adapters import _cupy_stage, _torch_stage
from agnostic_prefetch.adapters._cupy_stage import _CupyPlacement, cupy_prefetch
from agnostic_prefetch.adapters._inflight import InFlight
from agnostic_prefetch.adapters._pinned import PinnedRegistry, mapping_of
from agnostic_prefetch.adapters._torch_stage import _CudaPlacement, torch_prefetch

# ---- helpers ----------------------------------------------------------------------------


def small_loader(rows: int = 10, batch_size: int = 2, **kwargs) -> ap.Loader:
    source = ap.ArraySource({"x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)})
    return ap.Loader(source, batch_size, workers=0, **kwargs)


class NamedRows:
    """Rows with a file name each: batches carry a list of strings next to the array."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        return {"x": np.full(3, i, np.float32), "name": f"row{i}.jpg"}


def ring_address_and_length(m: mmap.mmap) -> tuple[int, int]:
    """The mapping's start address, found another way than the library's ``_address``."""
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view), len(m)
    finally:
        del view  # a live buffer export would keep the ring from closing


def lease_holder(leaf: np.ndarray) -> np.ndarray:
    """For a loader batch, the uint8 array over its ring slot, whose death ends the slot's
    lease (see _lease.py); for any other array, the array itself."""
    return leaf.base if isinstance(leaf.base, np.ndarray) else leaf


def of(log: list[tuple], name: str) -> list[tuple]:
    return [entry for entry in log if entry[0] == name]


def index_of(log: list[tuple], name: str) -> list[int]:
    return [i for i, entry in enumerate(log) if entry[0] == name]


def host_syncs(log: list[tuple]) -> list[tuple]:
    return [entry for entry in log if "synchronize" in entry[0]]


# ---- mapping_of -------------------------------------------------------------------------


def test_mapping_of_a_loader_batch_is_the_rings_mmap():
    with small_loader() as loader:
        batch = next(iter(loader))
        m = mapping_of(batch["x"])
        assert isinstance(m, mmap.mmap)
        assert m is loader._ring.map
        assert len(m) == loader.stats()["ring_bytes"]
        start, length = ring_address_and_length(m)
        assert start <= batch["x"].ctypes.data < start + length


def test_mapping_of_slices_and_views_of_a_batch_is_still_the_ring():
    with small_loader() as loader:
        x = next(iter(loader))["x"]
        ring = mapping_of(x)
        for view in (x[1:], x[:, ::2], x.T, x.reshape(-1), x.view(np.uint8), x[0]):
            assert mapping_of(view) is ring


def test_mapping_of_arrays_not_in_a_ring_is_none():
    with small_loader() as loader:
        x = next(iter(loader))["x"]
        assert mapping_of(x.copy()) is None
    assert mapping_of(np.arange(8.0)) is None
    assert mapping_of(np.frombuffer(b"12345678", np.uint8)) is None
    assert mapping_of("row0.jpg") is None


# ---- PinnedRegistry ---------------------------------------------------------------------


class FakeDriver:
    """cudaHostRegister / cudaHostUnregister that record their calls."""

    def __init__(self, register_code: int = 0) -> None:
        self.register_code = register_code
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, address: int, nbytes: int) -> int:
        self.registered.append((address, nbytes))
        return self.register_code

    def unregister(self, address: int) -> int:
        self.unregistered.append(address)
        return 0


def test_every_batch_of_a_loader_registers_the_ring_once_whole():
    driver = FakeDriver()
    registry = PinnedRegistry(driver.register, driver.unregister)
    with small_loader(rows=40) as loader:
        ring = ring_address_and_length(loader._ring.map)
        batches = 0
        for batch in loader:
            assert registry.ensure(batch["x"]) is True
            assert registry.ensure(batch["x"][:, 1:]) is True
            batches += 1
        assert batches == 20
        assert driver.registered == [ring]  # the address and the full length, once
        registry.close()
    assert driver.unregistered == [ring[0]]


def test_a_failed_registration_is_logged_once_and_never_retried(caplog):
    driver = FakeDriver(register_code=2)
    registry = PinnedRegistry(driver.register, driver.unregister)
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"), small_loader() as loader:
        results = [registry.ensure(batch["x"]) for batch in loader]
        ring_bytes = loader.stats()["ring_bytes"]
        registry.close()
    assert results == [False] * 5
    assert len(driver.registered) == 1
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "agnostic_prefetch" and "cudaHostRegister" in r.getMessage()]
    assert len(warnings) == 1
    assert "cudaError 2" in warnings[0] and f"{ring_bytes}-byte" in warnings[0]
    assert driver.unregistered == []  # nothing was registered, nothing to undo


def test_close_unregisters_each_live_mapping_once():
    driver = FakeDriver()
    registry = PinnedRegistry(driver.register, driver.unregister)
    with small_loader() as first, small_loader() as second:
        a, b = next(iter(first))["x"], next(iter(second))["x"]
        assert registry.ensure(a) and registry.ensure(b) and registry.ensure(a)
        addresses = {ring_address_and_length(mapping_of(x))[0] for x in (a, b)}
        assert len(driver.registered) == 2
        registry.close()
        registry.close()
        assert sorted(driver.unregistered) == sorted(addresses)


def test_a_registered_ring_stays_mapped_until_unregistered_even_after_the_loader_closes():
    # CUDA must never hold page-locked memory that was unmapped under it.
    driver = FakeDriver()
    registry = PinnedRegistry(driver.register, driver.unregister)
    with small_loader() as loader:
        batch = next(iter(loader))["x"]
        ring = loader._ring.map
        address, _ = ring_address_and_length(ring)
        assert registry.ensure(batch)
    del batch
    gc.collect()
    assert not ring.closed  # the loader is closed, but the registry keeps the ring mapped
    registry.close()
    assert driver.unregistered == [address]
    del registry
    gc.collect()
    ring.close()  # nothing views it any more: it can be unmapped now
    assert ring.closed


def test_plain_numpy_arrays_are_never_registered():
    driver = FakeDriver()
    registry = PinnedRegistry(driver.register, driver.unregister)
    with small_loader() as loader:
        copied = next(iter(loader))["x"].copy()
    assert registry.ensure(np.zeros((4, 4), np.float32)) is False
    assert registry.ensure(copied) is False
    registry.close()
    assert driver.registered == [] and driver.unregistered == []


# ---- InFlight ---------------------------------------------------------------------------


class FakePlacement:
    """Copies a host batch at ``put``; that copy is done once the test adds it to ``finished``.

    Holds no reference to a host batch (only weak ones), so whatever keeps a host batch alive
    is InFlight's doing.
    """

    def __init__(self) -> None:
        self.finished: set[int] = set()  # numbers of the batches whose copy is done
        self.hosts: list[weakref.ref] = []  # lease_holder of each host batch, by number
        self.handed_out: list[int] = []
        self.closes = 0
        self.alive_at_close: set[int] | None = None

    def put(self, host):
        n = len(self.hosts)
        self.hosts.append(weakref.ref(lease_holder(host["x"])))
        return {"x": host["x"].copy(), "n": n}, lambda: n in self.finished

    def hand_out(self, device) -> None:
        self.handed_out.append(device["n"])

    def close(self) -> None:
        self.closes += 1
        self.alive_at_close = self.alive()

    def alive(self) -> set[int]:
        gc.collect()
        return {n for n, ref in enumerate(self.hosts) if ref() is not None}


def host_batches(n: int, counter: list[int] | None = None):
    for i in range(n):
        if counter is not None:
            counter.append(i)
        yield {"x": np.full((2, 3), i, np.float32)}  # no local name: the generator keeps none


def test_host_batch_keeps_its_ring_slot_until_its_copy_is_done():
    placement = FakePlacement()
    with small_loader() as loader, InFlight(loader, 1, placement) as it:
        first = next(it)
        slot = placement.hosts[0]()
        assert slot is not None and slot.dtype == np.uint8 and mapping_of(slot) is loader._ring.map
        del first, slot  # the caller is done with the device batch; the copy is not
        next(it)
        next(it)
        assert 0 in placement.alive()
        placement.finished.add(0)
        next(it)  # leases are checked on the next pull
        assert 0 not in placement.alive()


def test_host_batches_whose_copy_is_done_are_let_go_at_once():
    placement = FakePlacement()
    placement.finished.update(range(5))
    with small_loader() as loader, InFlight(loader, 1, placement) as it:
        for _ in it:
            pass
        assert placement.alive() == set()
        assert loader.stats()["copied_out"] == 0


def test_pending_copies_hold_their_slots_so_later_batches_are_copied_out():
    # 3 slots, workers=0: the caller may hold 2; a pending copy and the one read ahead do.
    placement = FakePlacement()
    with small_loader(slots=3) as loader, InFlight(loader, 1, placement) as it:
        next(it)
        assert loader.stats()["copied_out"] == 0
        next(it)  # batch 0's copy is pending: batch 2 cannot take a third slot
        assert loader.stats()["copied_out"] == 1
        placement.finished.update({0, 1, 2})
        next(it)
        next(it)
        assert loader.stats()["copied_out"] == 1


def test_hand_out_is_called_once_per_batch_in_order_before_the_caller_gets_it():
    placement = FakePlacement()
    placement.finished.update(range(7))
    received = []
    with InFlight(host_batches(7), 3, placement) as it:
        for device in it:
            assert placement.handed_out[-1] == device["n"]
            received.append(device["n"])
    assert received == list(range(7))
    assert placement.handed_out == list(range(7))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_reads_at_most_size_batches_ahead_of_the_caller(size):
    pulled: list[int] = []
    placement = FakePlacement()
    with InFlight(host_batches(8, pulled), size, placement) as it:
        assert len(pulled) == size
        for received in range(1, 9):
            next(it)
            assert len(pulled) == min(received + size, 8)
            assert len(placement.hosts) == len(pulled)  # each pulled batch is put at once
        with pytest.raises(StopIteration):
            next(it)


def test_state_dict_is_the_loaders_position_after_what_the_caller_received():
    with small_loader(rows=14, shuffle=True, seed=3) as reference:
        expected = [reference.state_dict()]
        for _ in reference:
            expected.append(reference.state_dict())
    placement = FakePlacement()
    with small_loader(rows=14, shuffle=True, seed=3) as loader, InFlight(loader, 2, placement) as it:
        assert it.state_dict() == expected[0]
        for received in range(1, 8):
            next(it)
            assert it.state_dict() == expected[received]
            if received < 6:  # the loader itself is two batches further on
                assert loader.state_dict() == expected[received + 2]


def test_state_dict_is_none_for_a_source_without_one():
    with InFlight(host_batches(3), 2, FakePlacement()) as it:
        next(it)
        assert it.state_dict() is None


def test_close_calls_placement_close_exactly_once():
    placement = FakePlacement()
    with InFlight(host_batches(5), 2, placement) as it:
        next(it)
        it.close()
        it.close()
    assert placement.closes == 1


def test_garbage_collection_calls_placement_close_exactly_once():
    placement = FakePlacement()
    it = InFlight(host_batches(5), 2, placement)
    next(it)
    del it
    gc.collect()
    assert placement.closes == 1


@pytest.mark.parametrize("how", ["close", "gc"])
def test_a_handed_out_batch_whose_copy_is_pending_outlives_placement_close(how):
    # placement.close() waits for the copies (stream.synchronize); only then may the host
    # batches they read from go back to the loader.
    placement = FakePlacement()
    it = InFlight(host_batches(5), 1, placement)
    next(it)
    if how == "close":
        it.close()
    del it
    gc.collect()
    assert placement.closes == 1
    assert 0 in placement.alive_at_close
    assert placement.alive() == set()  # and after it, nothing is kept


@pytest.mark.parametrize("how", ["close", "gc"])
def test_read_ahead_batches_outlive_placement_close(how):
    placement = FakePlacement()
    it = InFlight(host_batches(6), 2, placement)
    next(it)  # batch 0 handed out (copy pending), batches 1 and 2 queued (copies started)
    if how == "close":
        it.close()
    del it
    gc.collect()
    assert placement.alive_at_close == {0, 1, 2}


def test_size_below_one_is_an_error():
    with pytest.raises(ValueError, match="size must be >= 1"):
        InFlight(host_batches(1), 0, FakePlacement())


# ---- fake torch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeDevice:
    type: str
    index: int | None = None


class FakeStream:
    def __init__(self, log: list[tuple], name: str, device: FakeDevice) -> None:
        self.log, self.name, self.device = log, name, device

    def wait_event(self, event) -> None:
        self.log.append(("wait_event", self, event))

    def synchronize(self) -> None:
        self.log.append(("stream.synchronize", self))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.completed = False

    def record(self, stream=None) -> None:
        self.log.append(("record", self, stream))

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.log.append(("event.synchronize", self))


class FakeTensor:
    def __init__(self, torch: FakeTorch, values: np.ndarray, device: FakeDevice) -> None:
        self.torch, self.values, self.device = torch, values, device

    def to(self, device, non_blocking: bool = False) -> FakeTensor:
        cuda = self.torch.cuda
        # logs no reference to the host memory: the log must not keep a ring slot leased
        self.torch.log.append(("copy", device, non_blocking, cuda.current_stream(), cuda.current_index))
        return FakeTensor(self.torch, self.values.copy(), device)

    def record_stream(self, stream) -> None:
        self.torch.log.append(("record_stream", self, stream))


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
    """``torch.cuda`` with two devices; each device has a current stream, the consumer's."""

    def __init__(self, torch: FakeTorch) -> None:
        self.torch = torch
        self.available = True
        self.current_index = 0
        self.consumer = {i: FakeStream(torch.log, f"consumer:{i}", FakeDevice("cuda", i)) for i in (0, 1)}
        self.current = dict(self.consumer)
        self._cudart = FakeCudart(torch.log)

    def is_available(self) -> bool:
        return self.available

    def current_device(self) -> int:
        return self.current_index

    def Stream(self, device=None) -> FakeStream:  # noqa: N802
        return FakeStream(self.torch.log, "side", device)

    def Event(self) -> FakeEvent:  # noqa: N802
        return FakeEvent(self.torch.log)

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

    def synchronize(self, device=None) -> None:
        self.torch.log.append(("cuda.synchronize", device))

    def finish_waited_copies(self) -> None:
        """The GPU catches up with the copies the consumer has waited on (not the ones ahead)."""
        for _, _, event in of(self.torch.log, "wait_event"):
            event.completed = True


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


@pytest.fixture
def fake_torch(monkeypatch) -> FakeTorch:
    torch = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", torch)  # what `import torch` in the stage finds
    monkeypatch.setattr(_torch_stage, "to_torch", torch.cpu_view)
    return torch


CUDA1 = FakeDevice("cuda", 1)


def spy_on_ensure(placement, log: list[tuple], monkeypatch) -> None:
    real = placement.pinned.ensure

    def ensure(a):
        log.append(("ensure", a.ctypes.data))
        return real(a)

    monkeypatch.setattr(placement.pinned, "ensure", ensure)


# ---- _CudaPlacement -----------------------------------------------------------------------


def test_cuda_placement_defaults_to_the_current_device_and_makes_a_side_stream_there(fake_torch):
    fake_torch.cuda.current_index = 1
    placement = _CudaPlacement(fake_torch.device("cuda"))
    assert placement.device == CUDA1
    assert placement.stream.device == CUDA1
    assert placement.stream is not fake_torch.cuda.consumer[1]


def test_cuda_put_copies_every_array_leaf_non_blocking_while_the_side_stream_is_current(
        fake_torch, monkeypatch):
    placement = _CudaPlacement(CUDA1)
    spy_on_ensure(placement, fake_torch.log, monkeypatch)
    with small_loader() as loader:
        batch = next(iter(loader))
        ring_start, ring_bytes = ring_address_and_length(mapping_of(batch["x"]))
        pageable = np.arange(6, dtype=np.int32)
        host = {"x": batch["x"], "meta": ["a.jpg", batch["x"][:, 0], pageable], "label": "cat", "id": None}
        device, _ = placement.put(host)

        log = fake_torch.log
        copies = of(log, "copy")
        assert len(copies) == 3  # the array leaves, not the strings
        for _, to, non_blocking, current_stream, current_device in copies:
            assert to == CUDA1 and non_blocking is True
            assert current_stream is placement.stream and current_device == 1
        # each numpy leaf is page-locked (ensure) before its copy; the ring once, whole
        ensures, copy_at = index_of(log, "ensure"), index_of(log, "copy")
        assert len(ensures) == 3 and all(e < c for e, c in zip(ensures, copy_at, strict=True))
        assert of(log, "cudaHostRegister") == [("cudaHostRegister", ring_start, ring_bytes, 0)]

        # non-array leaves pass through untouched (the very same objects)
        assert device["label"] is host["label"] and device["meta"][0] is host["meta"][0]
        assert device["id"] is None
        leaves = [device["x"], device["meta"][1], device["meta"][2]]
        for leaf, original in zip(leaves, [batch["x"], batch["x"][:, 0], pageable], strict=True):
            assert isinstance(leaf, FakeTensor) and leaf.device == CUDA1
            np.testing.assert_array_equal(leaf.values, original)
        placement.close()
    assert fake_torch.cuda.current_index == 0 and fake_torch.cuda.current[1] is fake_torch.cuda.consumer[1]


def test_cuda_put_records_one_event_on_the_side_stream_after_the_copies_and_returns_its_query(
        fake_torch):
    placement = _CudaPlacement(CUDA1)
    with small_loader() as loader:
        batch = next(iter(loader))
        _, done = placement.put({"x": batch["x"], "y": batch["x"][1:]})
        log = fake_torch.log
        records = of(log, "record")
        assert len(records) == 1
        _, event, stream = records[0]
        assert stream is placement.stream
        assert index_of(log, "record")[0] > max(index_of(log, "copy"))
        assert done() is False
        event.completed = True
        assert done() is True
        assert host_syncs(log) == []
        placement.close()


def test_cuda_hand_out_makes_the_consumer_stream_wait_and_records_each_tensor_on_it(fake_torch):
    placement = _CudaPlacement(CUDA1)
    training = FakeStream(fake_torch.log, "training", CUDA1)
    fake_torch.cuda.current[1] = training  # the caller's current stream on the placement's device
    with small_loader() as loader:
        batch = next(iter(loader))
        device, _ = placement.put({"x": batch["x"], "y": [batch["x"][0]], "name": "a.jpg"})
        [(_, event, _)] = of(fake_torch.log, "record")
        mark = len(fake_torch.log)
        placement.hand_out(device)
        after = fake_torch.log[mark:]
        assert of(after, "wait_event") == [("wait_event", training, event)]
        recorded = of(after, "record_stream")
        assert len(recorded) == 2
        assert {id(tensor) for _, tensor, _ in recorded} == {id(device["x"]), id(device["y"][0])}
        assert all(stream is training for _, _, stream in recorded)
        assert host_syncs(after) == []  # the host never waits for a copy
        assert placement.events == {}
        placement.close()


def assert_close_synchronizes_then_unregisters(placement, log: list[tuple], prefix: str) -> None:
    """After one batch, ``close()`` is: synchronize the side stream, then unregister the ring."""
    with small_loader() as loader:
        placement.put({"x": next(iter(loader))["x"]})
        [(_, address, _, _)] = of(log, f"{prefix}Register")
        mark = len(log)
        placement.close()
        after = log[mark:]
        assert [entry[0] for entry in after] == ["stream.synchronize", f"{prefix}Unregister"]
        assert after[0][1] is placement.stream and after[1][1] == address


def test_cuda_close_synchronizes_the_side_stream_before_unregistering_the_ring(fake_torch):
    placement = _CudaPlacement(CUDA1)
    assert_close_synchronizes_then_unregisters(placement, fake_torch.log, "cudaHost")


def run_to_the_end(it, log: list[tuple], finish_copies, batches: int = 10):
    """Take ``batches`` batches (the fake GPU finishing what the consumer waited on), then
    the end of the data. Returns what was received, the log up to the end, and the end's log."""
    received = []
    for _ in range(batches):
        batch = next(it)
        received.append((np.array(batch["x"].values, copy=True), batch["name"]))
        finish_copies()
    during = list(log)
    with pytest.raises(StopIteration):  # the end of the data closes the stager
        next(it)
    closing = log[len(during):]
    it.close()
    assert len(log) == len(during) + len(closing)  # a second close does nothing
    return received, during, closing


def test_torch_prefetch_on_fake_cuda_end_to_end(fake_torch):
    source = NamedRows(30)  # 10 batches: more than the 5 slots the caller may hold
    with ap.Loader(source, 3, workers=0) as loader, torch_prefetch(loader, "cuda:1", size=2) as it:
        received, during, closing = run_to_the_end(it, fake_torch.log, fake_torch.cuda.finish_waited_copies)
        assert loader.stats()["copied_out"] == 0
    for i, (x, names) in enumerate(received):
        rows = range(3 * i, 3 * i + 3)
        np.testing.assert_array_equal(x, np.array([np.full(3, r, np.float32) for r in rows]))
        assert names == [f"row{r}.jpg" for r in rows]
    assert len(received) == 10
    assert len(of(during, "cudaHostRegister")) == 1
    assert host_syncs(during) == []
    # each batch's own event is waited on by the consumer, once, in order
    recorded_events = [event for _, event, _ in of(during, "record")]
    waited_events = [event for _, stream, event in of(during, "wait_event")]
    assert waited_events == recorded_events and len(recorded_events) == 10
    assert all(stream is fake_torch.cuda.consumer[1] for _, stream, _ in of(during, "wait_event"))
    assert [entry[0] for entry in closing] == ["stream.synchronize", "cudaHostUnregister"]


def test_torch_prefetch_to_cuda_without_cuda_is_a_clear_error(fake_torch):
    fake_torch.cuda.available = False
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        torch_prefetch(iter([]), "cuda")


# ---- fake cupy ----------------------------------------------------------------------------


class FakeCupyEvent:
    def __init__(self) -> None:
        self.done = False


class FakeCupyStream:
    def __init__(self, cuda: FakeCupyCuda, name: str, device: int, non_blocking: bool) -> None:
        self.cuda, self.name, self.device, self.non_blocking = cuda, name, device, non_blocking

    def __enter__(self) -> FakeCupyStream:
        self._saved = self.cuda.current[self.device]
        self.cuda.current[self.device] = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.current[self.device] = self._saved

    def record(self) -> FakeCupyEvent:
        event = FakeCupyEvent()
        self.cuda.log.append(("record", self, event))
        return event

    def wait_event(self, event) -> None:
        self.cuda.log.append(("wait_event", self, event))

    def synchronize(self) -> None:
        self.cuda.log.append(("stream.synchronize", self))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeCupyDevice:
    def __init__(self, cuda: FakeCupyCuda, index: int) -> None:
        self.cuda, self.id = cuda, index
        self._saved: list[int] = []

    def __enter__(self) -> FakeCupyDevice:
        self._saved.append(self.cuda.current_device)
        self.cuda.current_device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.current_device = self._saved.pop()


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
    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.current_device = 0
        self.consumer = {i: FakeCupyStream(self, f"consumer:{i}", i, False) for i in (0, 1)}
        self.current = dict(self.consumer)
        self.runtime = FakeRuntime(log)

    def Device(self, index: int) -> FakeCupyDevice:  # noqa: N802
        return FakeCupyDevice(self, index)

    def Stream(self, non_blocking: bool = False) -> FakeCupyStream:  # noqa: N802
        return FakeCupyStream(self, "side", self.current_device, non_blocking)

    def get_current_stream(self) -> FakeCupyStream:
        return self.current[self.current_device]

    def finish_waited_copies(self) -> None:
        """The GPU catches up with the copies the consumer has waited on (not the ones ahead)."""
        for _, _, event in of(self.log, "wait_event"):
            event.done = True


class FakeCupyArray:
    def __init__(self, cupy: FakeCupy, shape: tuple[int, ...], dtype) -> None:
        self.cupy, self.shape, self.dtype = cupy, shape, np.dtype(dtype)
        self.device = cupy.cuda.current_device
        self.values: np.ndarray | None = None

    def set(self, a: np.ndarray, stream=None) -> None:
        cuda = self.cupy.cuda
        self.cupy.log.append(("set", a.ctypes.data, a.flags.c_contiguous, stream,
                              cuda.get_current_stream(), cuda.current_device))
        assert a.shape == self.shape and a.dtype == self.dtype
        self.values = a.copy()


class FakeCupy:
    """Just enough of ``cupy`` for ``_CupyPlacement``; every call that matters lands in ``log``."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.cuda = FakeCupyCuda(self.log)

    def empty(self, shape, dtype) -> FakeCupyArray:
        self.log.append(("empty", tuple(shape), np.dtype(dtype), self.cuda.get_current_stream(),
                         self.cuda.current_device))
        return FakeCupyArray(self, tuple(shape), dtype)


@pytest.fixture
def fake_cupy() -> FakeCupy:
    return FakeCupy()


# ---- _CupyPlacement -----------------------------------------------------------------------


def test_cupy_placement_makes_a_non_blocking_stream_on_its_device(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    assert placement.stream.device == 1 and placement.stream.non_blocking is True
    assert fake_cupy.cuda.current_device == 0


def test_cupy_put_copies_with_set_on_the_side_stream_inside_its_device(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with small_loader() as loader:
        batch = next(iter(loader))
        ring_start, ring_bytes = ring_address_and_length(mapping_of(batch["x"]))
        host = {"x": batch["x"], "first": batch["x"][0], "name": "a.jpg", "id": None}
        device, _ = placement.put(host)
        log = fake_cupy.log
        consumer = fake_cupy.cuda.consumer[1]
        for _, _, _, current_stream, current_device in of(log, "empty"):
            # CuPy's pool has an arena per stream: allocate where the batch is used and freed.
            assert current_stream is consumer and current_device == 1
        [(_, recorded_on, consumer_ready), _] = of(log, "record")
        assert recorded_on is consumer
        assert of(log, "wait_event")[0] == ("wait_event", placement.stream, consumer_ready)
        assert max(index_of(log, "empty")) < index_of(log, "wait_event")[0] < min(index_of(log, "set"))
        sets = of(log, "set")
        assert len(sets) == 2
        for (_, address, contiguous, stream, current_stream, current_device), leaf in zip(
                sets, [batch["x"], batch["x"][0]], strict=True):
            assert stream is placement.stream and current_stream is placement.stream
            assert current_device == 1
            assert contiguous and address == leaf.ctypes.data  # straight from the ring
        assert of(log, "hostRegister") == [("hostRegister", ring_start, ring_bytes, 0)]
        np.testing.assert_array_equal(device["x"].values, batch["x"])
        np.testing.assert_array_equal(device["first"].values, batch["x"][0])
        assert device["x"].device == 1
        assert device["name"] is host["name"] and device["id"] is None  # passed through
        placement.close()
    assert fake_cupy.cuda.current_device == 0 and fake_cupy.cuda.current[1] is fake_cupy.cuda.consumer[1]


def test_cupy_put_records_an_event_on_the_side_stream_after_the_copies(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with small_loader() as loader:
        batch = next(iter(loader))
        _, done = placement.put({"x": batch["x"], "y": batch["x"][1:]})
        log = fake_cupy.log
        [(_, consumer, _), (_, stream, event)] = of(log, "record")
        assert consumer is fake_cupy.cuda.consumer[1] and stream is placement.stream
        assert index_of(log, "record")[1] > max(index_of(log, "set"))
        assert done() is False
        event.done = True
        assert done() is True
        placement.close()


def test_cupy_hand_out_makes_the_consumer_stream_of_its_device_wait(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with small_loader() as loader:
        batch = next(iter(loader))
        device, _ = placement.put({"x": batch["x"]})
        [_, (_, _, event)] = of(fake_cupy.log, "record")
        mark = len(fake_cupy.log)
        placement.hand_out(device)  # called with device 0 current
        after = fake_cupy.log[mark:]
        assert after == [("wait_event", fake_cupy.cuda.consumer[1], event)]
        assert placement.events == {}
        placement.close()


def test_cupy_put_makes_non_contiguous_leaves_contiguous_before_the_copy(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 0)
    with small_loader() as loader:
        x = next(iter(loader))["x"]
        device, _ = placement.put({"strided": x[:, ::2], "transposed": x.T})
        assert all(contiguous for _, _, contiguous, *_ in of(fake_cupy.log, "set"))
        np.testing.assert_array_equal(device["strided"].values, x[:, ::2])
        np.testing.assert_array_equal(device["transposed"].values, x.T)
        assert device["transposed"].shape == (4, 2)
        placement.close()


def test_cupy_put_rejects_bfloat16_naming_it(fake_cupy):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    placement = _CupyPlacement(fake_cupy, 0)
    with pytest.raises(TypeError, match="bfloat16"):
        placement.put({"x": np.zeros((2, 2), ml_dtypes.bfloat16)})
    assert of(fake_cupy.log, "set") == []
    placement.close()


def test_cupy_close_synchronizes_the_side_stream_before_unregistering_the_ring(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 0)
    assert_close_synchronizes_then_unregisters(placement, fake_cupy.log, "host")


def test_cupy_failed_registration_is_logged_once_and_copies_still_happen(fake_cupy, caplog):
    fake_cupy.cuda.runtime.fail_status = 217
    placement = _CupyPlacement(fake_cupy, 0)
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"), small_loader() as loader:
        for batch in loader:
            device, _ = placement.put({"x": batch["x"]})
            np.testing.assert_array_equal(device["x"].values, batch["x"])
            placement.hand_out(device)
        placement.close()
    assert len(of(fake_cupy.log, "hostRegister")) == 1
    assert of(fake_cupy.log, "hostUnregister") == []
    warnings = [m for m in caplog.messages if "cudaHostRegister" in m]
    assert len(warnings) == 1 and "cudaError 217" in warnings[0]


def test_cupy_prefetch_on_fake_cuda_end_to_end(fake_cupy, monkeypatch):
    monkeypatch.setattr(_cupy_stage, "import_cupy", lambda: fake_cupy)
    with ap.Loader(NamedRows(30), 3, workers=0) as loader, cupy_prefetch(loader, size=2, device=1) as it:
        received, during, closing = run_to_the_end(it, fake_cupy.log, fake_cupy.cuda.finish_waited_copies)
        assert loader.stats()["copied_out"] == 0
    assert [names for _, names in received] == [[f"row{r}.jpg" for r in range(i, i + 3)] for i in range(0, 30, 3)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in received])[:, 0], np.arange(30.0))
    assert len(of(during, "hostRegister")) == 1
    assert host_syncs(during) == []
    side = [s for s in {id(st): st for _, st, _ in of(during, "record")}.values() if s.name == "side"]
    copy_events = [event for _, stream, event in of(during, "record") if stream in side]
    consumer_events = [event for _, stream, event in of(during, "record") if stream not in side]
    consumer_waits = [event for _, stream, event in of(during, "wait_event") if stream is fake_cupy.cuda.consumer[1]]
    side_waits = [event for _, stream, event in of(during, "wait_event") if stream in side]
    assert consumer_waits == copy_events and len(copy_events) == 10  # each batch waited on, in order
    assert side_waits == consumer_events and len(consumer_events) == 10  # each copy after the consumer
    assert [entry[0] for entry in closing] == ["stream.synchronize", "hostUnregister"]
