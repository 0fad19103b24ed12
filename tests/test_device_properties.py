"""Invariants of the device stage over random settings: order, coverage, resume, held arrays.

Checked against the independent oracle, through ``prefetch_to_device`` over a ``Loader``:
the batches are the loader's own, in order; resuming from the stage's ``state_dict()``
after any number of batches yields exactly the rest; arrays the caller keeps never change,
however small the ring.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import shard_batches
from sources_for_tests import Counting

import agnostic_prefetch as ap

jax = pytest.importorskip("jax")

from agnostic_prefetch.device import prefetch_to_device  # noqa: E402


@st.composite
def configs(draw):
    n = draw(st.integers(1, 30))
    workers = draw(st.integers(0, 2))
    return {
        "n": n,
        "batch_size": draw(st.integers(1, n)),
        "workers": workers,
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 1000)),
        "drop_remainder": draw(st.booleans()),
        "slots": draw(st.sampled_from([None, workers + 1 if workers else 2])),
        "size": draw(st.integers(1, 3)),
        "thread": draw(st.booleans()),
    }


def loader_for(c):
    return ap.Loader(Counting(c["n"]), c["batch_size"], workers=c["workers"], shuffle=c["shuffle"],
                     seed=c["seed"], drop_remainder=c["drop_remainder"], slots=c["slots"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.data())
@pytest.mark.filterwarnings("ignore:prefetch_to_device.*holds up to:RuntimeWarning")  # rings down to 2 slots
def test_batches_are_the_loaders_in_order_resume_is_exact_and_held_arrays_never_change(c, data):
    want = shard_batches(c["n"], c["batch_size"], shuffle=c["shuffle"], seed=c["seed"], epoch=0,
                         drop_remainder=c["drop_remainder"])
    # A checkpoint after the last batch resumes into the next epoch (test_loader.py covers it).
    stop = data.draw(st.integers(0, len(want) - 1), label="batches before the checkpoint")
    held = []
    with loader_for(c) as loader:
        it = prefetch_to_device(loader, size=c["size"], thread=c["thread"])
        for _ in range(stop):
            batch = next(it)
            held.append((batch, np.array(batch["x"], copy=True)))
        state = it.state_dict()
        it.close()
    with loader_for(c) as loader:
        loader.load_state_dict(state)
        for batch in prefetch_to_device(loader, size=c["size"], thread=c["thread"]):
            held.append((batch, np.array(batch["x"], copy=True)))
    assert [b["i"].tolist() for b, _ in held] == want  # in order, nothing repeated or skipped
    for (batch, snapshot), indices in zip(held, want, strict=True):
        assert isinstance(batch["x"], jax.Array)
        np.testing.assert_array_equal(np.asarray(batch["x"]), snapshot)  # never changed
        np.testing.assert_array_equal(snapshot[:, 0, 0], np.asarray(indices, np.float32))
