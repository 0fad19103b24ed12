"""``ap.Pack(method="concat")`` makes the rows Grain's ``ConcatThenSplitIterDataset`` makes.

Over the same items in the same order, with Grain's defaults (``split_full_length_features=True``,
no BOS handling, no meta features), every row is equal: tokens, segment ids and positions.
Where they differ (docs/sequences.md): our padding value is ``Pack(pad_value=)``; with several
keys, Grain can repeat a key's tokens when an item is split a second time (an item longer
than two rows in one key while another key is not empty), which ours never does; so the
several-key comparison keeps every key's items within a row's length.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agnostic_prefetch as ap

grain = pytest.importorskip("grain")
experimental = pytest.importorskip("grain.experimental")


class Items:
    def __init__(self, items, keys):
        self.items, self.keys = items, keys

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self):
        return {k: np.array([len(item[k]) for item in self.items]) for k in self.keys}


def grain_rows(items, length_struct):
    dataset = grain.MapDataset.source(items).to_iter_dataset()
    return list(experimental.ConcatThenSplitIterDataset(dataset, length_struct=length_struct))


def our_rows(items, length_struct):
    with ap.Loader(Items(items, tuple(length_struct)), 1, workers=0, batching=ap.Pack(length=dict(length_struct)),
                   stall_warning=None) as loader:
        return [{k: v[0].copy() for k, v in batch.items()} for batch in loader]


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40), st.integers(1, 16))
def test_concat_rows_equal_grains_concat_then_split_with_one_key(lengths, limit):
    items = [{"tokens": np.arange(n, dtype=np.int32) + 1000 * i} for i, n in enumerate(lengths)]
    assert_same(our_rows(items, {"tokens": limit}), grain_rows(items, {"tokens": limit}))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 7)), min_size=1, max_size=30))
def test_concat_rows_equal_grains_with_two_keys_when_no_item_is_split_twice(pairs):
    items = [{"inputs": np.arange(a, dtype=np.int32) + 1000 * i, "targets": np.arange(b, dtype=np.int64) - 1000 * i}
             for i, (a, b) in enumerate(pairs)]
    lengths = {"inputs": 12, "targets": 7}
    assert_same(our_rows(items, lengths), grain_rows(items, lengths))
