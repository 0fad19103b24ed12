"""One copy at most: batches are views of the ring, and a slot lives as long as its views."""

from __future__ import annotations

import gc
import logging
import re

import numpy as np
import pytest
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch._testing import internals


class Images:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"image": np.full((16, 16, 3), i % 256, np.uint8), "label": i}


def inside_ring(loader, array):
    ring = internals(loader).ring
    return ring.address <= array.ctypes.data < ring.address + ring.nbytes


def test_delivered_arrays_point_into_the_ring_and_nothing_is_copied_while_streaming():
    with ap.Loader(Images(), 8, workers=2, epochs=3) as loader:
        for batch in loader:
            assert inside_ring(loader, batch["image"]) and inside_ring(loader, batch["label"])
            assert batch["image"].flags.writeable
            assert batch["image"].ctypes.data % 256 == 0  # leaves start 256-byte aligned
        assert loader.stats()["copied_out"] == 0


def test_a_held_view_keeps_its_slot_and_the_mapping_outlives_close():
    with ap.Loader(Images(), 4, workers=1, slots=2, epochs=5) as loader:
        it = iter(loader)
        held = next(it)["image"][1:3, 2]  # a view of a view: still keeps the slot
        gc.collect()
        for _ in it:
            pass
    gc.collect()
    assert held.shape == (2, 16, 3) and (held[0] == 1).all() and (held[1] == 2).all()
    held[:] = 9  # still mapped and writable after close()


@pytest.mark.parametrize("workers", [0, 2])
def test_close_unmaps_the_ring_once_no_batch_is_held(workers):
    loader = ap.Loader(Images(), 4, workers=workers)
    assert sum(1 for _ in loader) == 10  # every batch let go
    ring = internals(loader).ring.map
    loader.close()  # the loader object itself is still alive
    gc.collect()
    assert ring.closed


def test_holding_too_many_batches_copies_out_instead_of_deadlocking(caplog):
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(Images(), 4, workers=2, slots=3) as loader:
            batches = list(loader)  # holds every batch: the ring alone could not
            stats = loader.stats()
    assert [b["label"][0] for b in batches] == list(range(0, 40, 4))
    assert stats["copied_out"] == 10 - 1  # 3 slots, 2 kept for the workers
    assert sum("copied out" in r.getMessage() for r in caplog.records) == 1
    assert not inside_ring(loader, batches[-1]["image"])


def test_slots_are_reused_once_the_caller_lets_go():
    # A for-loop still holds the previous batch while next() runs: workers + 2 slots suffice.
    with ap.Loader(Images(), 4, workers=1, slots=3, epochs=3) as loader:
        seen = {b["image"].ctypes.data for b in loader}
        assert len(seen) <= 3 and loader.stats()["copied_out"] == 0


def test_jax_array_aliasing_a_batch_keeps_the_slot_alive():
    jax = pytest.importorskip("jax")
    with ap.Loader(Images(), 4, workers=1, slots=2, epochs=4) as loader:
        it = iter(loader)
        batch = next(it)
        on_device = jax.device_put(batch["image"])
        aliased = on_device.unsafe_buffer_pointer() == batch["image"].ctypes.data
        del batch
        gc.collect()
        for _ in it:
            pass
        assert int(on_device[3, 0, 0, 0]) == 3 and int(on_device.sum()) == 16 * 16 * 3 * 6
    if not aliased:
        pytest.skip("this jax build copied on device_put; the slot lease was not exercised")


def test_torch_tensor_from_dlpack_keeps_the_slot_alive():
    torch = pytest.importorskip("torch")
    with ap.Loader(Images(), 4, workers=1, slots=2, epochs=4) as loader:
        it = iter(loader)
        batch = next(it)
        tensor = torch.from_dlpack(batch["image"])
        assert tensor.data_ptr() == batch["image"].ctypes.data  # zero copy
        del batch
        gc.collect()
        for _ in it:
            pass
    assert tensor[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


def test_copied_out_batch_counts_in_stats_when_a_consumer_hoards_then_streams():
    with ap.Loader(Counting(30), 3, workers=1, slots=2) as loader:
        it = iter(loader)
        hoard = [next(it) for _ in range(3)]
        assert loader.stats()["copied_out"] == 2
        del hoard
        gc.collect()
        rest = [b["i"].tolist() for b in it]
        assert rest[0] == [9, 10, 11] and loader.stats()["copied_out"] >= 2


def test_default_ring_covers_a_training_loop_behind_prefetch_to_device():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    @jax.jit
    def step(total, batch):
        return total + jnp.sum(batch["image"].astype(jnp.float32))

    with ap.Loader(Images(), 4, workers=2, epochs=4) as loader:
        total = jnp.zeros(())
        for batch in ap.prefetch_to_device(loader, size=2):
            total = step(total, batch)
        total.block_until_ready()
        assert loader.stats()["copied_out"] == 0
    assert float(total) == 4 * sum((i % 256) * 16 * 16 * 3 for i in range(40))


def test_a_hoarding_caller_is_told_the_exact_slots_that_copy_nothing(caplog):
    def run(slots):
        kept = []
        with ap.Loader(Images(), 2, workers=2, slots=slots) as loader:
            for batch in loader:
                kept = [*kept, batch][-7:]  # the caller keeps its last seven batches
            return loader.stats(), ap.diagnose(loader, seconds=60)

    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        stats, verdict = run(slots=8)
    [warning] = [r.getMessage() for r in caplog.records if "copied out" in r.getMessage()]
    assert "your code holds them" in warning and "pass slots=9" in warning  # the peak so far: 7
    assert stats["copied_out"] > 0 and (stats["held_peak"], stats["slots_needed"]) == (8, 10)
    assert "slots=10" in verdict.remedy
    again, _ = run(slots=10)  # exactly what it named: nothing copied any more
    assert again["copied_out"] == 0 and again["held_peak"] == 8


def test_a_copy_out_warning_behind_a_prefetcher_tells_its_share_from_the_callers(caplog):
    torch_prefetch = pytest.importorskip("agnostic_prefetch.adapters").torch_prefetch
    pytest.importorskip("torch")
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(Images(), 2, workers=2, slots=8) as loader:
            kept = []
            for batch in torch_prefetch(loader, size=2, device="cpu"):  # tensors view the ring
                kept = [*kept, batch][-7:]
    [warning] = [r.getMessage() for r in caplog.records if "copied out" in r.getMessage()]
    stage, caller = map(int, re.search(r"this loader holds (\d+) .* and your code (\d+)", warning).groups())
    assert stage >= 1 and caller >= 1 and f"holds {stage + caller} of the ring's 8 slots" in warning
