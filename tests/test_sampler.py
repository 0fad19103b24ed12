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
    "remainder": st.sampled_from(["short", "pad", "drop"]),
    "shard_count": st.integers(1, 5),
})


def _valid(a):
    g = a["batch_size"] * a["shard_count"]
    if a["remainder"] == "drop":
        return a["n"] >= g
    return a["remainder"] == "pad" or a["shard_count"] == 1 or a["n"] % g == 0


def _sampler(a, shard, **kw):
    return Sampler(Sized(a["n"]), a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                   remainder=a["remainder"], shard_index=shard, shard_count=a["shard_count"], **kw)


@settings(max_examples=200, deadline=None)
@given(order_args, st.integers(0, 5))
def test_batches_equal_the_oracle(a, epoch):
    if not _valid(a):
        return
    for shard in range(a["shard_count"]):
        got = [b.indices.tolist() for b in _sampler(a, shard).epoch(epoch)]
        assert got == shard_batches(a["n"], a["batch_size"], shuffle=a["shuffle"], seed=a["seed"],
                                    epoch=epoch, drop_remainder=a["remainder"] == "drop",
                                    shard_index=shard, shard_count=a["shard_count"])


@settings(max_examples=200, deadline=None)
@given(order_args, st.integers(0, 5), st.integers(1, 6))
def test_the_global_batches_do_not_depend_on_the_shard_count(a, epoch, other_count):
    """Slices of any shard count, side by side, are the global batches of one shard."""
    if not _valid(a):
        return
    g = a["batch_size"] * a["shard_count"]
    whole = Sampler(Sized(a["n"]), g, shuffle=a["shuffle"], seed=a["seed"],
                    remainder="drop" if a["remainder"] == "drop" else "pad")
    want = [b.indices.tolist() for b in whole.epoch(epoch)]
    want_positions = [b.positions.tolist() for b in whole.epoch(epoch)]
    for count in (a["shard_count"], other_count):
        if g % count:
            continue
        shards = [Sampler(Sized(a["n"]), g // count, shuffle=a["shuffle"], seed=a["seed"],
                          remainder="drop" if a["remainder"] == "drop" else "pad",
                          shard_index=s, shard_count=count).epoch(epoch) for s in range(count)]
        got = [[i for shard in shards for i in shard[k].indices.tolist()] for k in range(len(want))]
        positions = [[p for shard in shards for p in shard[k].positions.tolist()] for k in range(len(want))]
        assert got == want and positions == want_positions


@settings(max_examples=200, deadline=None)
@given(order_args, st.integers(0, 5))
def test_every_index_delivered_exactly_once_per_epoch_across_shards(a, epoch):
    a = {**a, "remainder": "pad"}
    seen = []
    for shard in range(a["shard_count"]):
        seen += [i for b in _sampler(a, shard).epoch(epoch) for i in b.indices.tolist()]
    assert sorted(seen) == list(range(a["n"]))


@settings(max_examples=100, deadline=None)
@given(order_args)
def test_drop_remainder_gives_full_batches_and_equal_shards(a):
    a = {**a, "remainder": "drop"}
    if not _valid(a):
        return
    lengths = set()
    for shard in range(a["shard_count"]):
        s = _sampler(a, shard)
        assert all(len(b.indices) == a["batch_size"] for b in s.epoch(0))
        lengths.add(s.batches_per_epoch)
    assert lengths == {a["n"] // (a["batch_size"] * a["shard_count"])}


def test_an_uneven_last_global_batch_with_several_shards_needs_pad_or_drop():
    with pytest.raises(ValueError, match=r"global batch 2 of epoch 0 has 2 of 4 items.*remainder='pad'.*drop_remainder=True"):
        Sampler(Sized(10), 2, shard_count=2)
    assert [b.indices.tolist() for b in Sampler(Sized(10), 4).epoch(0)][-1] == [8, 9]  # one shard: short
    assert [b.indices.tolist() for b in Sampler(Sized(10), 2, shard_index=1, shard_count=2,
                                                remainder="pad").epoch(0)] == [[2, 3], [6, 7], []]


def test_shuffle_changes_per_epoch_and_repeats_per_seed():
    s = Sampler(Sized(50), 50, shuffle=True, seed=3)
    e0, e1 = s.epoch(0)[0].indices.tolist(), s.epoch(1)[0].indices.tolist()
    assert e0 != e1
    assert Sampler(Sized(50), 50, shuffle=True, seed=3).epoch(0)[0].indices.tolist() == e0


def test_positions_are_places_in_the_global_order():
    s = Sampler(Sized(10), 3, shard_index=1, shard_count=2, remainder="pad")
    assert [b.positions.tolist() for b in s.epoch(0)] == [[3, 4, 5], [9]]


def test_item_rng_is_a_function_of_seed_epoch_position():
    assert item_rng(1, 2, 3).integers(1 << 30) == item_rng(1, 2, 3).integers(1 << 30)
    assert item_rng(1, 2, 3).integers(1 << 30) != item_rng(1, 2, 4).integers(1 << 30)


def test_empty_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches.*remainder='drop'"):
        Sampler(Sized(3), 4, remainder="drop")
    with pytest.raises(ValueError, match="no batches: the source has 0 records; give the loader"):
        Sampler(Sized(0), 4)
    with pytest.raises(ValueError, match="remainder must be one of"):
        Sampler(Sized(3), 1, remainder="cut")
    with pytest.raises(ValueError, match="shard_index"):
        Sampler(Sized(3), 1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        Sampler(Sized(3), 0)


class Ordered(Sized):
    def batch_order(self, *, seed, epoch, batch_size):
        rng = np.random.default_rng([seed, epoch])
        return [rng.integers(0, 2 * self.n, size=batch_size).tolist() for _ in range(-(-self.n // batch_size))]


def test_batch_order_source_is_called_with_the_global_batch_and_each_shard_takes_its_slice():
    src = Ordered(10)
    whole = Sampler(src, 4, seed=5).epoch(2)
    assert [b.indices.tolist() for b in whole] == src.batch_order(seed=5, epoch=2, batch_size=4)
    halves = [Sampler(src, 2, seed=5, shard_index=i, shard_count=2).epoch(2) for i in range(2)]
    assert [h[k].indices.tolist() for k in range(3) for h in halves] == [
        part for b in whole for part in (b.indices[:2].tolist(), b.indices[2:].tolist())]
    assert halves[1][1].positions.tolist() == [6, 7]  # rows 2..3 of global batch 1


def test_batch_order_batches_must_be_the_global_batch_but_the_last():
    class Short(Sized):
        def batch_order(self, *, seed, epoch, batch_size):
            return [list(range(batch_size - 1)), list(range(batch_size))]

    with pytest.raises(ValueError, match=r"batch 0 of epoch 0 with 3 indices; the global batch is 4.*only the last"):
        Sampler(Short(10), 2, shard_count=2)

    class Varying(Sized):
        def batch_order(self, *, seed, epoch, batch_size):
            return [list(range(batch_size))] * (1 + epoch)

    with pytest.raises(ValueError, match="2 batches for epoch 1 but 1 for epoch 0"):
        Sampler(Varying(4), 4).epoch(1)


def test_batch_order_rejects_oversized_batches():
    class Bad(Sized):
        def batch_order(self, *, seed, epoch, batch_size):
            return [list(range(batch_size + 1))]

    with pytest.raises(ValueError, match="batch_order"):
        Sampler(Bad(10), 2)


def test_only_the_order_of_the_two_latest_epochs_is_kept():
    s = Sampler(Sized(2_000_000), 1, shuffle=True, seed=1)
    for epoch in range(3):
        assert s.batch(epoch, 1_999_999).indices.shape == (1,)
    assert s.cached_epochs == [1, 2]


def test_batch_number_out_of_range_is_an_index_error():
    with pytest.raises(IndexError):
        Sampler(Sized(10), 4).batch(0, 3)


BAD_SEEDS = [-1, np.int64(-2), True, np.True_, 1.5, "3", None]


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_a_seed_that_is_not_a_non_negative_integer_is_refused_naming_it_and_the_remedy(seed):
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer.*got .*seed % 2\*\*32"):
        Sampler(Sized(10), 2, shuffle=True, seed=seed)


@pytest.mark.parametrize("seed", [0, 7, np.int64(5), np.uint32(2**32 - 1), 2**70])
def test_non_negative_python_and_numpy_integers_are_seeds(seed):
    assert Sampler(Sized(10), 2, shuffle=True, seed=seed).seed == int(seed)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_loader_with_a_negative_seed_says_so_before_reading_anything(shuffle):
    import agnostic_prefetch as ap

    def transform(example, rng):
        return {"i": example}

    with pytest.raises(ValueError, match=r"seed must be a non-negative integer.*got -1"):
        ap.Loader(Sized(10), 2, workers=0, seed=-1, shuffle=shuffle, transform=transform)


def test_a_source_that_orders_its_batches_refuses_a_negative_seed_given_to_it():
    from agnostic_prefetch.caffe._layers import CaffeStream
    from agnostic_prefetch.sources.mixture import Mixture

    sized = [Mixture({"a": Sized(4), "b": Sized(6)}, {"a": 0.5, "b": 0.5}), CaffeStream(Sized(5), shuffle=True)]
    for source in sized:
        with pytest.raises(ValueError, match=r"seed must be a non-negative integer.*got -1"):
            source.batch_order(seed=-1, epoch=0, batch_size=2)
