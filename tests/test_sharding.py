"""shard_for: which slice of each global batch a process loads, from where its devices sit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch.sharding import process_rows, shard_for


@dataclass(frozen=True)
class Device:
    id: int
    process_index: int


class FakeSharding:
    """Device d of process p holds rows ``rows[d]`` of the batch axis (a real sharding's map)."""

    def __init__(self, rows, processes):
        self.rows, self.processes = rows, processes

    def devices_indices_map(self, shape):
        return {Device(d, p): (slice(*self.rows[d]),) + (slice(None),) * (len(shape) - 1)
                for d, p in enumerate(self.processes)}


def mesh(data, model, per_process, g):
    """A (data, model) mesh, devices numbered row-major, ``per_process`` adjacent devices per
    process; the batch axis is split over ``data``."""
    rows, processes = [], []
    for d in range(data * model):
        row = d // model
        rows.append((row * g // data, (row + 1) * g // data))
        processes.append(d // per_process)
    return FakeSharding(rows, processes)


@given(st.sampled_from([(8, 1, 2), (4, 2, 2), (2, 4, 2), (2, 4, 4), (1, 8, 4), (4, 2, 1)]),
       st.sampled_from([8, 16, 24]))
def test_each_process_loads_the_rows_its_devices_hold_and_replicas_load_the_same(shape, g):
    data, model, per_process = shape
    sharding = mesh(data, model, per_process, g)
    processes = (data * model) // per_process
    shards = [shard_for(sharding, g, process_index=p) for p in range(processes)]
    count = shards[0]["shard_count"]
    assert count == min(data, processes)  # a process within a data row, or spanning several
    rows = process_rows(sharding, g)
    for p, shard in enumerate(shards):
        assert shard["shard_count"] == count
        lo, hi = rows[p]
        assert (lo, hi) == (shard["shard_index"] * g // count, (shard["shard_index"] + 1) * g // count)
    same_rows = {}
    for p in range(processes):
        same_rows.setdefault(rows[p], set()).add(shards[p]["shard_index"])
    assert all(len(v) == 1 for v in same_rows.values())  # replicas: one slice


def test_replicated_processes_share_a_slice():
    sharding = mesh(2, 4, 2, 8)  # processes 0, 1 on data row 0; processes 2, 3 on row 1
    assert [shard_for(sharding, 8, process_index=p) for p in range(4)] == [
        {"shard_index": 0, "shard_count": 2}, {"shard_index": 0, "shard_count": 2},
        {"shard_index": 1, "shard_count": 2}, {"shard_index": 1, "shard_count": 2}]


def test_rows_that_are_not_one_run_or_not_equal_slices_are_refused_naming_them():
    split = FakeSharding([(0, 2), (2, 4), (4, 6), (6, 8)], [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"process 0 hold rows \[\(0, 2\), \(4, 6\)\].*not one contiguous run"):
        shard_for(split, 8, process_index=0)
    uneven = FakeSharding([(0, 3), (3, 8)], [0, 1])
    with pytest.raises(ValueError, match=r"process 0: rows \[0, 3\), process 1: rows \[3, 8\) of a global batch of 8"):
        shard_for(uneven, 8, process_index=1)
    with pytest.raises(ValueError, match="process 5 holds no device"):
        shard_for(mesh(2, 1, 1, 8), 8, process_index=5)


def test_one_process_with_a_real_sharding_holds_every_row_and_the_stage_checks_the_loader():
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    assert shard_for(sharding, 4) == {"shard_index": 0, "shard_count": 1}
    with ap.Loader(Counting(16), 2, shard_index=1, shard_count=2, workers=0) as wrong, pytest.raises(
            ValueError, match=r"hold rows \[0, 4\) of each global batch of 4: slice 0 of 1, but the Loader "
                              r"loads slice 1 of 2.*\*\*ap.shard_for\(sharding, 4\)"):
        ap.prefetch_to_device(wrong, sharding=sharding)
    with ap.Loader(Counting(10), global_batch_size=4, workers=0, **shard_for(sharding, 4)) as right:
        # One process: a short last batch is placed like any other (several processes must pad).
        stage = ap.prefetch_to_device(iter(right), sharding=sharding, thread=False)
        assert [int(b["i"].shape[0]) for b in stage] == [4, 4, 2]
    with ap.Loader(Counting(10), 4, workers=0) as loader:
        assert [int(b["i"].shape[0]) for b in ap.prefetch_to_device(loader, sharding=jax.devices()[0])] == [4, 4, 2]
    with ap.Loader(Counting(10), global_batch_size=4, workers=0, remainder="pad") as padded:
        assert [int(b["mask"].sum()) for b in ap.prefetch_to_device(padded, sharding=sharding)] == [4, 4, 2]



def test_a_sharding_that_also_splits_another_axis_gives_the_batch_axis_slice():
    pytest.importorskip("jax")
    from test_device import run_with_devices

    out = run_with_devices("""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import agnostic_prefetch as ap
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
        sharding = NamedSharding(mesh, P("data", "model"))
        assert ap.shard_for(sharding, 4) == {"shard_index": 0, "shard_count": 1}
        source = ap.ArraySource({"x": np.arange(32, dtype=np.float32).reshape(8, 4)})
        with ap.Loader(source, 4, workers=0) as loader:
            shapes = [[s.data.shape for s in b["x"].addressable_shards]
                      for b in ap.prefetch_to_device(loader, sharding=sharding)]
        assert shapes == [[(2, 2)] * 4] * 2, shapes
        print("OK")
    """, devices=4)
    assert "OK" in out
