"""The order is a pure function of (seed, epoch, shard): checked against the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import shard_batches

from agnostic_prefetch.sampler import Sampler, item_rng


class Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


settings.register_profile("default", max_examples=100, deadline=None)

order_args = st.fixed_dictionaries({
    "n": st.integers(1, 200),
    "batch_size": st.integers(1, 33),
    "shuffle": st.booleans(),
    "seed": st.integers(0, 2**31),
    "drop_remainder": st.booleans(),
    "shard_count": st.integers(1, 5),
})


def _valid(a):
    per = a["n"] // a["shard_count"] if a["drop_remainder"] else a["n"] // a["shard_count"]
    return per >= (a["batch_size"] if a["drop_remainder"] else 1)


@settings(max_examples=200, deadline=None)
@given(order_args, st.integers(0, 5))
def test_batches_equal_the_oracle(a, epoch):
    if not _valid(a):
        return
    for shard in range(a["shard_count"]):
        s = Sampler(Sized(a["n"]), a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                    drop_remainder=a["drop_remainder"], shard_index=shard, shard_count=a["shard_count"])
        got = [b.indices.tolist() for b in s.epoch(epoch)]
        assert got == shard_batches(a["n"], a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                                    epoch=epoch, drop_remainder=a["drop_remainder"],
                                    shard_index=shard, shard_count=a["shard_count"])


@settings(max_examples=200, deadline=None)
@given(order_args, st.integers(0, 5))
def test_every_index_delivered_exactly_once_per_epoch_across_shards(a, epoch):
    a = {**a, "drop_remainder": False}
    if a["n"] < a["shard_count"]:
        return
    seen = []
    for shard in range(a["shard_count"]):
        s = Sampler(Sized(a["n"]), a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                    shard_index=shard, shard_count=a["shard_count"])
        seen += [i for b in s.epoch(epoch) for i in b.indices.tolist()]
    assert sorted(seen) == list(range(a["n"]))


@settings(max_examples=100, deadline=None)
@given(order_args)
def test_drop_remainder_gives_full_batches_and_equal_shards(a):
    a = {**a, "drop_remainder": True}
    if not _valid(a):
        return
    lengths = set()
    for shard in range(a["shard_count"]):
        s = Sampler(Sized(a["n"]), a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                    drop_remainder=True, shard_index=shard, shard_count=a["shard_count"])
        assert all(len(b.indices) == a["batch_size"] for b in s.epoch(0))
        lengths.add(s.batches_per_epoch)
    assert len(lengths) == 1


def test_shuffle_changes_per_epoch_and_repeats_per_seed():
    s = Sampler(Sized(50), 50, shuffle=True, seed=3)
    e0, e1 = s.epoch(0)[0].indices.tolist(), s.epoch(1)[0].indices.tolist()
    assert e0 != e1
    assert Sampler(Sized(50), 50, shuffle=True, seed=3).epoch(0)[0].indices.tolist() == e0


def test_positions_are_places_in_the_global_order():
    s = Sampler(Sized(10), 3, shard_index=1, shard_count=2)
    assert [b.positions.tolist() for b in s.epoch(0)] == [[5, 6, 7], [8, 9]]


def test_item_rng_is_a_function_of_seed_epoch_position():
    assert item_rng(1, 2, 3).integers(1 << 30) == item_rng(1, 2, 3).integers(1 << 30)
    assert item_rng(1, 2, 3).integers(1 << 30) != item_rng(1, 2, 4).integers(1 << 30)


def test_empty_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches"):
        Sampler(Sized(3), 4, drop_remainder=True)
    with pytest.raises(ValueError, match="shard_index"):
        Sampler(Sized(3), 1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        Sampler(Sized(3), 0)


class Ordered(Sized):
    def batch_order(self, *, seed, epoch, batch_size):
        rng = np.random.default_rng([seed, epoch])
        return [rng.integers(0, 2 * self.n, size=batch_size).tolist() for _ in range(-(-self.n // batch_size))]


def test_batch_order_source_supplies_the_batches_and_is_sharded():
    src = Ordered(10)
    whole = Sampler(src, 4, seed=5).epoch(2)
    assert [b.indices.tolist() for b in whole] == src.batch_order(seed=5, epoch=2, batch_size=4)
    halves = [Sampler(src, 4, seed=5, shard_index=i, shard_count=2).epoch(2) for i in range(2)]
    assert [b.indices.tolist() for h in halves for b in h] == [b.indices.tolist() for b in whole]
    assert halves[1][0].positions.tolist() == [4, 5, 6, 7]  # global batch 1


def test_batch_order_rejects_oversized_batches():
    class Bad(Sized):
        def batch_order(self, *, seed, epoch, batch_size):
            return [list(range(batch_size + 1))]

    with pytest.raises(ValueError, match="batch_order"):
        Sampler(Bad(10), 2)


def test_only_the_order_of_the_two_latest_epochs_is_kept_not_batch_objects():
    s = Sampler(Sized(2_000_000), 1, shuffle=True, seed=1)
    for epoch in range(3):
        assert s.batch(epoch, 1_999_999).indices.shape == (1,)
    kept = s._orders
    assert sorted(kept) == [1, 2]
    assert all(isinstance(order, np.ndarray) and order.nbytes == 8 * 2_000_000 for order, _ in kept.values())


def test_batch_number_out_of_range_is_an_index_error():
    with pytest.raises(IndexError):
        Sampler(Sized(10), 4).batch(0, 3)
