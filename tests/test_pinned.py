"""Page-locking the ring: finding the mapping behind a batch, registering it once, keeping it mapped."""

from __future__ import annotations

import gc
import logging
import mmap

import numpy as np
from fake_cuda import ring_address_and_length
from sources_for_tests import rows_loader

from agnostic_prefetch._testing import internals
from agnostic_prefetch.adapters._pinned import PinnedRegistry, mapping_of

# ---- mapping_of -------------------------------------------------------------------------


def test_mapping_of_a_loader_batch_is_the_rings_mmap():
    with rows_loader() as loader:
        batch = next(iter(loader))
        m = mapping_of(batch["x"])
        assert isinstance(m, mmap.mmap)
        assert m is internals(loader).ring.map
        assert len(m) == loader.stats()["ring_bytes"]
        start, length = ring_address_and_length(m)
        assert start <= batch["x"].ctypes.data < start + length


def test_mapping_of_slices_and_views_of_a_batch_is_still_the_ring():
    with rows_loader() as loader:
        x = next(iter(loader))["x"]
        ring = mapping_of(x)
        for view in (x[1:], x[:, ::2], x.T, x.reshape(-1), x.view(np.uint8), x[0]):
            assert mapping_of(view) is ring


def test_mapping_of_arrays_not_in_a_ring_is_none():
    with rows_loader() as loader:
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
    with rows_loader(rows=40) as loader:
        ring = ring_address_and_length(internals(loader).ring.map)
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
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"), rows_loader() as loader:
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
    with rows_loader() as first, rows_loader() as second:
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
    with rows_loader() as loader:
        batch = next(iter(loader))["x"]
        ring = internals(loader).ring.map
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
    with rows_loader() as loader:
        copied = next(iter(loader))["x"].copy()
    assert registry.ensure(np.zeros((4, 4), np.float32)) is False
    assert registry.ensure(copied) is False
    registry.close()
    assert driver.registered == [] and driver.unregistered == []
