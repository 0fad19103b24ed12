"""Invariants of the loader, over random settings, checked against the independent oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import global_batches, real_rows, shard_batches
from sources_for_tests import Counting

import agnostic_prefetch as ap

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    n = draw(st.integers(1, 40))
    shard_count = draw(st.integers(1, min(3, n)))
    remainder = draw(st.sampled_from(["short", "pad", "drop"]))
    most = n // shard_count if remainder == "drop" else n
    batch_size = draw(st.integers(1, max(1, most)))
    if remainder == "short" and shard_count > 1 and n % (batch_size * shard_count):
        remainder = "pad"  # several shards feed equal shapes: "short" is refused there
    workers = draw(st.integers(0, 3))
    return {
        "n": n,
        "batch_size": batch_size,
        "workers": workers,
        "backend": draw(st.sampled_from(["process", "thread"])),
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 1000)),
        "remainder": remainder,
        "shard_count": shard_count,
        "shard_index": draw(st.integers(0, shard_count - 1)),
        "epochs": draw(st.integers(1, 2)),
        "slots": draw(st.sampled_from([None, workers + 1 if workers else 2, workers + 2])),
    }


def expected(c, epochs):
    return [b for e in epochs for b in shard_batches(
        c["n"], c["batch_size"], shuffle=c["shuffle"], seed=c["seed"], epoch=e,
        drop_remainder=c["remainder"] == "drop", shard_index=c["shard_index"],
        shard_count=c["shard_count"])]


def make(c, **overrides):
    kw = {k: c[k] for k in ("workers", "backend", "shuffle", "seed", "remainder",
                            "shard_count", "shard_index", "epochs", "slots")}
    kw.update(overrides)
    return ap.Loader(Counting(c["n"]), c["batch_size"], **kw)


def check_batch(batch, want):
    real = np.asarray(batch["mask"]) if "mask" in batch else slice(None)
    assert batch["i"][real].tolist() == want
    np.testing.assert_array_equal(batch["x"][real][:, 0, 0], np.asarray(want, np.float32))


@SETTINGS
@given(configs(), st.booleans())
def test_batches_equal_the_oracle_for_any_workers_backend_and_order(c, ordered):
    want = expected(c, range(c["epochs"]))
    with make(c, ordered=ordered) as loader:
        got = [real_rows(b) for b in loader]
        assert len(got) == len(want) == c["epochs"] * loader.batches_per_epoch
    if ordered:
        assert got == want
    else:
        assert sorted(got) == sorted(want)


@SETTINGS
@given(configs(), st.data())
def test_resume_yields_exactly_the_remainder(c, data):
    want = expected(c, range(c["epochs"]))
    stop = data.draw(st.integers(0, len(want) - 1))  # the boundary: test_loader.py
    ordered = data.draw(st.booleans())
    with make(c, ordered=ordered) as first:
        it = iter(first)
        head = [real_rows(next(it)) for _ in range(stop)]
        state = first.state_dict()
    other = data.draw(st.sampled_from([(0, "process"), (1, "thread"), (2, "process")]))
    with make(c, workers=other[0], backend=other[1], slots=None, ordered=ordered) as second:
        second.load_state_dict(state)
        assert len(second) == len(want) - stop
        rest = [real_rows(b) for b in second]
    if ordered:
        assert head + rest == want
    else:
        assert sorted(head + rest) == sorted(want)


@SETTINGS
@given(configs(), st.data())
def test_arrays_a_caller_holds_never_change_after_the_loader_moves_on(c, data):
    want = expected(c, range(3))
    keep = data.draw(st.sets(st.integers(0, len(want) - 1), max_size=4))
    held = {}
    with make(c, epochs=3, slots=(c["workers"] + 1) if c["workers"] else 2) as loader:
        for k, batch in enumerate(loader):
            if k in keep:
                held[k] = batch
            for j, b in held.items():
                check_batch(b, want[j])
    for j, b in held.items():  # and after close() too
        check_batch(b, want[j])


@SETTINGS
@given(st.integers(1, 60), st.integers(1, 9), st.integers(1, 4), st.booleans(), st.integers(0, 99),
       st.sampled_from([(0, "process"), (1, "thread"), (2, "process"), (3, "thread")]))
def test_every_index_delivered_exactly_once_per_epoch_across_shards(n, batch_size, shard_count, shuffle, seed, w):
    per_shard = []
    for shard in range(shard_count):
        with ap.Loader(Counting(n), batch_size, workers=w[0], backend=w[1], shuffle=shuffle,
                       seed=seed, shard_index=shard, shard_count=shard_count, epochs=2,
                       remainder="pad") as loader:
            per_epoch = loader.batches_per_epoch
            batches = [b for b in loader]
            assert {len(b["i"]) for b in batches} == {batch_size}  # equal shapes on every shard
            per_shard.append([real_rows(b) for b in batches])
    assert len({len(b) for b in per_shard}) == 1  # and equal step counts
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [i for k in steps for rows in per_shard for i in rows[k]]
        assert sorted(seen) == list(range(n))
        # Step k of the shards, side by side, is global batch k.
        assert [[i for rows in per_shard for i in rows[k]] for k in steps] == global_batches(
            n, batch_size * shard_count, shuffle=shuffle, seed=seed, epoch=epoch)
