"""Elastic resume: a state saved by any shard of S resumes on S' shards (any worker count or
backend) with exactly the global batches not yet delivered, and the same draws."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import global_batches, real_rows
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch._resume import START, decode, encode, order_settings
from agnostic_prefetch.sampler import Sampler

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def with_draw(example, rng):
    return {**example, "r": np.float32(rng.random())}


@st.composite
def elastic_runs(draw):
    g = draw(st.sampled_from([1, 2, 4, 6, 12]))
    divisors = [d for d in range(1, g + 1) if g % d == 0]
    return {
        "n": draw(st.integers(1, 40)),
        "g": g,
        "shards": draw(st.sampled_from(divisors)),
        "later": draw(st.sampled_from(divisors)),
        "shuffle": draw(st.booleans()),
        "seed": draw(st.integers(0, 99)),
        "drop": draw(st.booleans()),
    }


@settings(max_examples=300, deadline=None)
@given(elastic_runs(), st.data())
def test_at_the_sampler_level_a_resumed_global_sequence_equals_the_uninterrupted_one(run, data):
    g, n = run["g"], run["n"]
    remainder = "drop" if run["drop"] else "pad"
    if run["drop"] and n < g:
        return

    def samplers(count):
        return [Sampler(range(n), g // count, shuffle=run["shuffle"], seed=run["seed"],
                        remainder=remainder, shard_index=s, shard_count=count) for s in range(count)]

    def global_step(shards, seq):
        epoch, k = divmod(seq, shards[0].batches_per_epoch)
        parts = [s.batch(epoch, k) for s in shards]
        return [i for p in parts for i in p.indices.tolist()], [q for p in parts for q in p.positions.tolist()]

    before, after = samplers(run["shards"]), samplers(run["later"])
    end = 3 * before[0].batches_per_epoch
    stop = data.draw(st.integers(0, end))
    saver = data.draw(st.integers(0, run["shards"] - 1))
    state = encode(START._replace(next_seq=stop), order_settings(before[saver], True), endless=False)
    resumed = decode(state, order_settings(after[0], True)).next_seq
    assert resumed == stop
    got = [global_step(before, q) for q in range(stop)] + [global_step(after, q) for q in range(resumed, end)]
    whole = samplers(1)
    assert got == [global_step(whole, q) for q in range(end)]


def shard_loaders(run, count, workers, backend, **kw):
    return [ap.Loader(Counting(run["n"]), global_batch_size=run["g"], shard_index=s, shard_count=count,
                      workers=workers, backend=backend, shuffle=run["shuffle"], seed=run["seed"],
                      epochs=2, remainder="drop" if run["drop"] else "pad", transform=with_draw, **kw)
            for s in range(count)]


def steps_of(iterators, limit=None):
    """Global batches as (rows, draws), reading every shard's iterator in lockstep."""
    out = []
    for parts in itertools.islice(zip(*iterators, strict=True), limit):
        rows = [i for p in parts for i in real_rows(p)]
        draws = [float(r) for p in parts for r in np.asarray(p["r"])[np.asarray(p.get("mask", np.ones(len(p["i"]), bool)))]]
        out.append((rows, draws))
    return out


@SETTINGS
@given(elastic_runs(), st.data())
def test_through_loaders_a_state_of_any_shard_resumes_on_another_shard_and_worker_count(run, data):
    if run["drop"] and run["n"] < run["g"]:
        return
    first_workers = data.draw(st.sampled_from([(0, "thread"), (1, "thread"), (2, "thread")]))
    later_workers = data.draw(st.sampled_from([(0, "thread"), (1, "thread"), (1, "process")]))
    ordered = data.draw(st.booleans())
    with contextlib.ExitStack() as stack:
        whole = stack.enter_context(shard_loaders(run, 1, 0, "thread")[0])
        want = steps_of([iter(whole)])
        assert [rows for rows, _ in want] == [
            b for e in range(2) for b in global_batches(run["n"], run["g"], shuffle=run["shuffle"],
                                                        seed=run["seed"], epoch=e, drop_remainder=run["drop"])]
        stop = data.draw(st.integers(0, len(want) - 1))  # a finished iteration goes on to more epochs
        before = [stack.enter_context(x) for x in shard_loaders(run, run["shards"], *first_workers, ordered=ordered)]
        iterators = [iter(loader) for loader in before]
        head = steps_of(iterators, stop)
        own_sets = not ordered and run["shards"] > 1  # each process delivered its own batches
        if own_sets:
            state = [it.state_dict() for it in iterators]
        else:
            state = iterators[data.draw(st.integers(0, run["shards"] - 1))].state_dict()
        later = [stack.enter_context(x) for x in shard_loaders(run, run["later"], *later_workers, ordered=ordered)]
        aligned = own_sets and len({(s["epoch"], s["batch"]) for s in state}) == 1 and not any(
            s["delivered_ahead"] for s in state)  # out of order, yet every shard at one frontier
        if own_sets and run["later"] != run["shards"] and not aligned:
            with pytest.raises(ValueError, match="cannot continue on shard_count"):
                later[0].load_state_dict(state)
            return
        for loader in later:
            loader.load_state_dict(state)
        tail = steps_of([iter(loader) for loader in later])
    if ordered:
        assert head + tail == want
    else:  # the same items with the same draws, in another order
        def items(steps):
            return sorted((i, d) for rows, draws in steps for i, d in zip(rows, draws, strict=True))

        assert items(head + tail) == items(want)


def test_through_prefetch_to_device_the_read_ahead_is_not_lost_across_an_epoch_boundary():
    pytest.importorskip("jax")
    run = {"n": 22, "g": 6, "shuffle": True, "seed": 3, "drop": False}
    whole = shard_loaders(run, 1, 0, "thread")
    want = steps_of([iter(whole[0])])
    whole[0].close()
    before = shard_loaders(run, 2, 1, "thread")
    stages = [ap.prefetch_to_device(loader, size=3) for loader in before]
    head = steps_of(stages, 5)  # 4 global batches an epoch: one into the second epoch
    states = [stage.state_dict() for stage in stages]
    assert all(s["epoch"] == 1 and s["batch"] == 1 for s in states)
    for stage, loader in zip(stages, before, strict=True):
        stage.close()
        loader.close()
    later = shard_loaders(run, 3, 1, "process")
    for loader in later:
        loader.load_state_dict(states[1])
    tail = steps_of([ap.prefetch_to_device(loader, size=2) for loader in later])
    for loader in later:
        loader.close()
    assert [r for r, _ in head + tail] == [r for r, _ in want]
    np.testing.assert_array_equal([d for _, ds in head + tail for d in ds], [d for _, ds in want for d in ds])


def test_an_out_of_order_state_of_several_shards_refuses_another_count_and_each_shard_takes_its_own():
    run = {"n": 40, "g": 8, "shuffle": False, "seed": 0, "drop": True}
    before = shard_loaders(run, 2, 2, "thread", ordered=False)
    iterators = [iter(loader) for loader in before]
    head = steps_of(iterators, 3)
    states = [it.state_dict() for it in iterators]
    for loader in before:
        loader.close()
    with shard_loaders(run, 4, 0, "thread")[0] as other, pytest.raises(
            ValueError, match=r"ordered=False by shard 1 of 2.*cannot continue on shard_count=4"):
        other.load_state_dict(states[1])
    again = shard_loaders(run, 2, 0, "thread", ordered=False)
    for loader in again:
        loader.load_state_dict(states)  # every process's states: each shard picks its own
    tail = steps_of([iter(loader) for loader in again])
    for loader in again:
        loader.close()
    seen = sorted(i for rows, _ in head + tail for i in rows)
    assert seen == sorted(list(range(40)) * 2)  # 2 epochs, every record once each, none lost


def test_states_of_one_run_that_disagree_are_refused():
    run = {"n": 40, "g": 8, "shuffle": False, "seed": 0, "drop": True}
    loaders = shard_loaders(run, 2, 0, "thread")
    iterators = [iter(loader) for loader in loaders]
    next(iterators[0])
    with pytest.raises(ValueError, match=r"process 0 saved batch=1, process 1 batch=0.*same step"):
        loaders[0].load_state_dict([it.state_dict() for it in iterators])
    for loader in loaders:
        loader.close()


def test_a_state_with_another_global_batch_names_the_batch_size_to_use():
    with ap.Loader(Counting(48), 4, shard_count=2, workers=0) as saved:
        state = saved.state_dict()
    with ap.Loader(Counting(48), 4, shard_count=3, workers=0) as other, pytest.raises(
            ValueError, match=r"global batch of 8 items but this loader's is 12.*does not split into 3"):
        other.load_state_dict(state)
    with ap.Loader(Counting(48), 4, shard_count=4, workers=0) as other, pytest.raises(
            ValueError, match=r"batch_size=2 \(or global_batch_size=8\) for shard_count=4"):
        other.load_state_dict(state)


def test_a_loader_iterator_loads_a_state_in_place():
    with ap.Loader(Counting(12), 2, workers=1, backend="thread") as loader:
        it = iter(loader)
        state = [next(it) for _ in range(2)] and it.state_dict()
        rest = [b["i"].tolist() for b in it]
        it.load_state_dict(state)
        assert [b["i"].tolist() for b in it] == rest
        assert len(it) == 0
