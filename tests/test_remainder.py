"""The last global batch and skipped records: short, padded with a mask, or dropped; equal
shapes on every shard."""

from __future__ import annotations

import numpy as np
import pytest
from sources_for_tests import Counting, Failing

import agnostic_prefetch as ap
from agnostic_prefetch.errors import LayoutError


@pytest.mark.parametrize("workers", [0, 1])
def test_pad_gives_every_shard_full_batches_with_a_mask_of_the_real_rows(workers):
    got = []
    for shard in range(3):
        with ap.Loader(Counting(10), 2, shard_index=shard, shard_count=3, remainder="pad",
                       workers=workers) as loader:
            got.append([(b["i"].tolist(), b["mask"].tolist(), b["x"][:, 0, 0].tolist()) for b in loader])
            assert loader.stats()["padded"] == (2 if shard == 2 else 0)
    assert got[0] == [([0, 1], [True, True], [0.0, 1.0]), ([6, 7], [True, True], [6.0, 7.0])]
    assert got[1] == [([2, 3], [True, True], [2.0, 3.0]), ([8, 9], [True, True], [8.0, 9.0])]
    assert got[2] == [([4, 5], [True, True], [4.0, 5.0]), ([0, 0], [False, False], [0.0, 0.0])]


def test_pad_counts_padding_and_real_items_in_stats():
    with ap.Loader(Counting(10), 4, remainder="pad", workers=0) as loader:
        batches = [b["mask"].sum() for b in loader]
        assert batches == [4, 4, 2]
        assert (loader.stats()["items"], loader.stats()["padded"]) == (10, 2)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_skipped_records_are_padded_and_an_all_skipped_batch_still_comes_so_steps_stay_equal(backend):
    source = Failing(12, bad={6, 7})  # shard 1's slice of global batch 1 is all bad
    got = []
    for shard in range(2):
        with ap.Loader(source, 2, shard_index=shard, shard_count=2, on_error="skip",
                       remainder="pad", workers=1, backend=backend) as loader:
            got.append([(b["i"].tolist(), b["mask"].tolist()) for b in loader])
            assert loader.stats()["skipped"] == (2 if shard == 1 else 0)
    assert got[0] == [([0, 1], [True, True]), ([4, 5], [True, True]), ([8, 9], [True, True])]
    assert got[1] == [([2, 3], [True, True]), ([0, 0], [False, False]), ([10, 11], [True, True])]


def test_with_one_shard_an_all_skipped_batch_is_left_out_and_short_batches_stay_short():
    with ap.Loader(Failing(6, bad={2, 3}), 2, on_error="skip", workers=0) as loader:
        assert [b["i"].tolist() for b in loader] == [[0, 1], [4, 5]]
    with ap.Loader(Failing(6, bad={2}), 2, on_error="skip", workers=0) as loader:
        assert [b["i"].tolist() for b in loader] == [[0, 1], [3], [4, 5]]


def test_global_batch_size_splits_over_the_shards():
    with ap.Loader(Counting(12), global_batch_size=6, shard_index=2, shard_count=3, workers=0) as loader:
        assert (loader.batch_size, loader.global_batch_size, loader.batches_per_epoch) == (2, 6, 2)
        assert [b["i"].tolist() for b in loader] == [[4, 5], [10, 11]]


def test_bad_remainder_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"batch_size=2 x shard_count=1 is not global_batch_size=4"):
        ap.Loader(Counting(8), 2, global_batch_size=4, workers=0)
    with pytest.raises(ValueError, match=r"pass batch_size= \(per shard\) or global_batch_size="):
        ap.Loader(Counting(8), workers=0)
    with pytest.raises(ValueError, match="global_batch_size=5 does not split into shard_count=2"):
        ap.Loader(Counting(8), global_batch_size=5, shard_count=2, workers=0)
    with pytest.raises(ValueError, match="drop_remainder=True contradicts remainder='pad'"):
        ap.Loader(Counting(8), 2, drop_remainder=True, remainder="pad", workers=0)
    with pytest.raises(ValueError, match="on_error='skip' with shard_count=2 needs remainder='pad'"):
        ap.Loader(Counting(8), 2, shard_count=2, on_error="skip", workers=0)
    with pytest.raises(ValueError, match=r"has 1 of 4 items.*remainder='pad'.*drop_remainder=True"):
        ap.Loader(Counting(9), 2, shard_count=2, workers=0)


def test_pad_needs_dict_examples_and_a_free_mask_key():
    class Pairs(Counting):
        def __getitem__(self, i):
            return (np.float32(i), np.int64(i))

    with pytest.raises(LayoutError, match="examples must be dicts; this source yields tuple"):
        ap.Loader(Pairs(4), 3, remainder="pad", workers=0)
    with pytest.raises(LayoutError, match="already have a 'mask' key; pass mask_key="):
        ap.Loader(ap.ArraySource({"mask": np.arange(4)}), 3, remainder="pad", workers=0)
    with ap.Loader(ap.ArraySource({"mask": np.arange(4)}), 3, remainder="pad", mask_key="valid",
                   workers=0) as loader:
        assert [b["valid"].tolist() for b in loader] == [[True] * 3, [True, False, False]]


def test_padding_rows_are_zeros_even_after_a_transform_wrote_into_the_slot():
    class InPlace:
        writes_into_slot = True

        def __call__(self, example, rng, out=None):
            if out is None:  # the parent lays out the ring from one example
                return example
            out["x"][...] = 7.0
            if int(example["i"]) == 5:
                raise ValueError("late failure after writing")
            return {"x": out["x"], "i": example["i"]}

    with ap.Loader(Counting(6), 4, transform=InPlace(), on_error="skip", remainder="pad",
                   workers=0) as loader:
        last = list(loader)[-1]
        assert last["mask"].tolist() == [True, False, False, False]
        assert (last["x"][0] == 7).all() and (last["x"][1:] == 0).all()


def _slow_start(worker_id):
    import time

    time.sleep(3)


def test_a_worker_stuck_on_a_batch_of_padding_only_is_reported_as_hung():
    with ap.Loader(Counting(2), global_batch_size=4, shard_index=1, shard_count=2, remainder="pad",
                   workers=1, timeout=0.3, worker_init=_slow_start) as loader, pytest.raises(
            ap.LoaderTimeoutError, match="on a batch of padding only of batch 0, epoch 0"):
        next(iter(loader))
