"""SlotWriter's shortcuts (flat dicts read by key, numpy scalars written as they are) give the
same slot bytes and the same errors as its general path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostic_prefetch._layout import SlotWriter, layout_from_example
from agnostic_prefetch.errors import LayoutError

DTYPES = [np.int64, np.int32, np.float32, np.float64, np.uint8, np.bool_]


def writers(example, batch):
    layout = layout_from_example(example, batch)
    fast = SlotWriter(layout, np.zeros(layout.slot_bytes, np.uint8))
    slow = SlotWriter(layout, np.zeros(layout.slot_bytes, np.uint8))
    slow._scalars = slow._flat_keys = None  # the general path only
    return fast, slow


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
       values=st.lists(st.lists(st.integers(0, 100), min_size=4, max_size=4), min_size=1, max_size=5),
       python_ints=st.booleans(), array_leaf=st.booleans())
def test_the_shortcuts_write_what_the_general_path_writes(keys, dtypes, values, python_ints, array_leaf):
    def item(row):
        out = {k: dtypes[i](row[i]) for i, k in enumerate(keys)}
        if python_ints and dtypes[0] is not np.bool_:  # (a bool leaf takes bools only)
            out[keys[0]] = int(row[0])  # another type than the leaf's: checked, as always
        if array_leaf:
            out["z"] = np.full(3, row[0], np.int16)
        return out

    first = {k: dtypes[i](0) for i, k in enumerate(keys)}
    if array_leaf:
        first["z"] = np.zeros(3, np.int16)
    fast, slow = writers(first, len(values))
    for j, row in enumerate(values):
        example = item(row)
        shuffled = dict(reversed(list(example.items())))  # key order is not structure
        assert fast.write(j, shuffled, j) == slow.write(j, example, j) == []
    for a, b in zip(fast.leaves, slow.leaves, strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad,match", [
    ({"a": np.int64(1)}, "structure"),
    ({"a": np.int64(1), "b": np.float32(2), "c": np.int64(3)}, "structure"),
    ({"a": np.int64(1), "c": np.float32(2)}, "structure"),
    ({"a": np.int64(1), "b": {"x": np.float32(2)}}, "structure"),
    ({"a": np.int64(1), "b": np.zeros(2, np.float32)}, r"float32\[2\]"),
    ({"a": 2**70, "b": np.float32(2)}, "does not hold"),
])
def test_an_item_that_differs_is_refused_as_by_the_general_path(bad, match):
    fast, slow = writers({"a": np.int64(0), "b": np.float32(0)}, 2)
    for writer in (fast, slow):
        with pytest.raises(LayoutError, match=match):
            writer.write(0, bad, 7)
