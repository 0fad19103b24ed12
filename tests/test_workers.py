"""What a worker process is: fresh, quiet on Ctrl-C, single-threaded maths, never a fork."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from sources_for_tests import Env

import agnostic_prefetch as ap
from agnostic_prefetch._testing import internals


def test_workers_are_fresh_processes_with_capped_threads_that_ignore_sigint(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with ap.Loader(Env(), 2, workers=2) as loader:
        batches = list(loader)
        worker_pids = set(loader.worker_pids)
    pids = {p for b in batches for p in b["pid"].tolist()}
    assert pids <= worker_pids and os.getpid() not in pids
    assert all(v == "1" for b in batches for v in b["omp"])
    assert all(b["sigint_ignored"].all() for b in batches)


def test_user_thread_settings_are_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with ap.Loader(Env(), 2, workers=1) as loader:
        assert {v for b in loader for v in b["omp"]} == {"3"}


def test_workers_are_not_forks_of_the_parent():
    with ap.Loader(Env(), 2, workers=1) as loader:
        next(iter(loader))  # the worker has exec'd and answered
        pid = loader.worker_pids[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    assert b"from agnostic_prefetch._worker_entry import main" in argv[2]  # its own entry point, a fresh exec


def test_memmap_arrays_are_not_copied_into_workers(tmp_path):
    path = tmp_path / "big.npy"
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1000, 256))
    data[:] = np.arange(1000, dtype=np.float32)[:, None]
    data.flush()
    source = ap.ArraySource({"x": np.load(path, mmap_mode="r"), "y": np.arange(1000)})
    assert len(pickle.dumps(source)) < 20_000 < data.nbytes  # the file name travels, not the data
    with ap.Loader(source, 100, workers=2, shuffle=True) as loader:
        batches = [(b["x"][:, 0].copy(), b["y"].copy()) for b in loader]
    for x, y in batches:
        np.testing.assert_array_equal(x, y.astype(np.float32))


def test_array_source_rejects_unequal_lengths():
    import pytest

    with pytest.raises(ValueError, match="first dimension"):
        ap.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_orders_round_trip_through_their_byte_format():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agnostic_prefetch._orders import Order, pack_orders, unpack_orders

    ints = st.integers(-(2**62), 2**62)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(ints, ints, ints, ints, st.lists(ints, max_size=20)), max_size=5))
    def check(raw):
        orders = [Order(a, b, c, d, np.array(idx, np.int64), d // 2) for a, b, c, d, idx in raw]
        back = unpack_orders(pack_orders(orders))
        assert len(back) == len(orders)
        for o, p in zip(orders, back, strict=True):
            assert (o.order_id, o.slot, o.epoch, o.number, o.first_position) == (
                p.order_id, p.slot, p.epoch, p.number, p.first_position)
            assert o.indices.tolist() == p.indices.tolist()

    check()


def test_small_slots_get_more_of_them_so_workers_take_several_orders_per_write():
    from sources_for_tests import Counting

    with ap.Loader(Counting(100), 1, workers=2) as small:
        assert small.slots == 2 * 8 + 6 and internals(small).workers[0].capacity == 8
    big = {"x": np.zeros((256, 256), np.float32)}
    with ap.Loader(Counting(100), 8, workers=2, spec=big) as large:
        assert large.slots == 2 + 6 and internals(large).workers[0].capacity == 2


def test_a_transposed_view_of_the_slot_is_still_copied_not_trusted():
    class Square:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"m": np.arange(9, dtype=np.float32).reshape(3, 3) + 10 * i}

    class Sneaky:
        writes_into_slot = True

        def __call__(self, example, rng, out=None):
            if out is None:  # the parent reads one example to lay out the ring
                return example
            out["m"][...] = example["m"]
            return {"m": out["m"].T}  # same address and shape as its slot place, other strides

    with ap.Loader(Square(), 2, workers=0, transform=Sneaky()) as loader:
        first = next(iter(loader))["m"]
    np.testing.assert_array_equal(first[0], np.arange(9, dtype=np.float32).reshape(3, 3).T)



def test_a_torch_dataset_is_welcome_quietly_with_one_torch_thread_and_no_cuda(caplog):
    pytest.importorskip("torch")
    import logging

    from sources_for_tests import TorchDataset

    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        with ap.Loader(TorchDataset(8), 4, workers=2) as loader:
            batches = list(loader)
    assert [b["x"][:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all((b["threads"] == 1).all() and (b["interop_threads"] == 1).all() for b in batches)
    assert not any(b["cuda_initialized"].any() for b in batches)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]  # not a word above DEBUG


class _Env:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import os

        return {"trim": np.int64(os.environ.get("MALLOC_TRIM_THRESHOLD_", -1)),
                "mmap": np.int64(os.environ.get("MALLOC_MMAP_THRESHOLD_", -1))}


def test_worker_processes_keep_freed_memory_unless_the_user_tuned_the_allocator(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with ap.Loader(_Env(), 2, workers=1) as loader:
        batch = next(iter(loader))
        assert batch["trim"].tolist() == [64 << 20] * 2 and batch["mmap"].tolist() == [32 << 20] * 2
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    with ap.Loader(_Env(), 2, workers=1) as loader:
        batch = next(iter(loader))
        assert batch["trim"].tolist() == [4096] * 2 and batch["mmap"].tolist() == [-1] * 2
