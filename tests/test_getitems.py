"""Batched reads: a source's ``__getitems__`` is called once per batch a worker fills."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sequence_sources import Docs

import agnostic_prefetch as ap


class Batched:
    """Items ``{"x": i}``; ``__getitems__`` records each call; ``bad`` records raise."""

    def __init__(self, n, bad=(), delay=0.0, wrong_count=False):
        self.n, self.bad, self.delay, self.wrong_count = n, set(bad), delay, wrong_count
        self.calls: list[list[int]] = []
        self.single: list[int] = []
        self._lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with self._lock:
            self.single.append(i)
        if i in self.bad:
            raise ValueError(f"record {i} is bad")
        return {"x": np.int64(i)}

    def __getitems__(self, indices):
        with self._lock:
            self.calls.append(list(indices))
        time.sleep(self.delay * len(indices))
        if self.bad & set(indices):
            raise ValueError("a bad record in this batch")
        items = [{"x": np.int64(i)} for i in indices]
        return items[:-1] if self.wrong_count else items

    def __getstate__(self):  # (the thread backend shares the object; a process gets a copy)
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class OneByOne(Batched):
    __getitems__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("workers,backend", [(0, "process"), (2, "thread")])
def test_a_worker_reads_each_batch_with_one_call_in_the_batchs_order(workers, backend):
    source = Batched(40)
    with ap.Loader(source, 8, workers=workers, backend=backend, shuffle=True, seed=3) as loader:
        got = [b["x"].tolist() for b in loader]
    with ap.Loader(OneByOne(40), 8, workers=0, shuffle=True, seed=3) as plain:
        assert got == [b["x"].tolist() for b in plain]
    assert all(batch in source.calls for batch in got)
    assert len(source.single) == 1  # the layout example only


def test_a_bad_record_in_a_batched_read_is_found_item_by_item_and_skipped_or_named(caplog):
    source = Batched(24, bad={5, 17})
    with ap.Loader(source, 6, workers=0, on_error="skip") as loader:
        got = [x for b in loader for x in b["x"].tolist()]
        assert loader.stats()["skipped"] == 2
    assert got == [i for i in range(24) if i not in (5, 17)]
    assert sorted(source.single[1:]) == [*range(0, 6), *range(12, 18)]  # only the bad batches, one by one
    with ap.Loader(Batched(24, bad={5}), 6, workers=0) as loader, pytest.raises(ap.WorkerError, match="record 5 is bad"):
        list(loader)


def test_a_batched_read_that_returns_the_wrong_count_is_an_error_naming_the_source():
    for workers in (0, 2):
        with ap.Loader(Batched(12, wrong_count=True), 4, workers=workers, backend="thread") as loader, pytest.raises(
                (ap.LoaderError, TypeError), match=r"__getitems__ returned 3 items for 4 indices"):
            list(loader)


def test_read_time_of_batched_reads_is_counted():
    source = Batched(64, delay=0.002)
    with ap.Loader(source, 16, workers=0) as loader:
        for _ in loader:
            pass
        stats = loader.stats()
    assert stats["items_read"] == 64
    assert stats["read_s"] >= 0.8 * 64 * 0.002
    assert stats["read_cpu_s"] <= stats["read_s"]


class PackDocs(Docs):
    def __getitems__(self, indices):
        return [self[i] for i in indices]


def test_sequence_batches_read_together_are_the_same_as_read_one_by_one():
    sizes = np.random.default_rng(0).integers(1, 30, 50)
    batching = ap.Pack(length=24, method="best_fit")
    outs = []
    for source in (Docs(sizes), PackDocs(sizes)):
        with ap.Loader(source, 3, workers=0, batching=batching, shuffle=True) as loader:
            outs.append([{k: v.copy() for k, v in b.items()} for b in loader])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_mixture_reads_each_components_share_of_a_batch_with_one_call():
    a, b = Batched(30), OneByOne(20)
    mix = ap.Mixture({"a": a, "b": b}, {"a": 1, "b": 1})
    with ap.Loader(mix, 8, workers=0, seed=1) as loader:
        got = [b_["x"].tolist() for b_ in loader]
    assert [len(c) for c in a.calls] == [4] * len(got)  # half of each batch of 8, in one call
    assert [it["x"] for it in mix.__getitems__(list(range(50)))] == [mix[i]["x"] for i in range(50)]
    plain = ap.Mixture({"a": OneByOne(30), "b": OneByOne(20)}, {"a": 1, "b": 1})
    with ap.Loader(plain, 8, workers=0, seed=1) as loader:
        assert got == [b_["x"].tolist() for b_ in loader]
    with pytest.raises(IndexError, match="out of range"):
        mix.__getitems__([0, 50])
