"""Mixture: deterministic proportions per global batch, components on their own epochs, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import real_rows
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch.sources.mixture import Mixture


def tagged(n, tag):
    return ap.ArraySource({"i": np.arange(n) + 1000 * tag})


def component(index):
    return np.asarray(index) // 1000


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6), st.data(), st.integers(1, 40), st.booleans())
def test_every_global_batch_holds_each_share_to_within_one_item_and_no_share_drifts(lengths, data, g, shuffle):
    weights = data.draw(st.lists(st.integers(1, 9), min_size=len(lengths), max_size=len(lengths)))
    mix = Mixture([tagged(n, t) for t, n in enumerate(lengths)], weights, shuffle=shuffle)
    w = np.asarray(weights) / sum(weights)
    batches = mix.batch_order(seed=3, epoch=data.draw(st.integers(0, 3)), batch_size=g)
    assert sum(len(b) for b in batches) == len(mix)
    assert all(len(b) == g for b in batches[:-1])
    given_so_far = np.zeros(len(lengths))
    for b in batches:
        counts = np.bincount([int(mix[i]["i"]) // 1000 for i in b], minlength=len(lengths))
        # floor(w·g) or one more, in exact integers (w·g may be whole: then one more is 1 over)
        floors = np.array([weight * len(b) // sum(weights) for weight in weights])
        assert ((counts >= floors) & (counts <= floors + 1)).all()
        given_so_far += counts
        assert (np.abs(given_so_far - w * given_so_far.sum()) < 1.5).all()


def test_a_whole_share_may_get_one_more_item_in_a_short_last_batch():
    # weights 5:5:6:8 over a last batch of 32: shares 6.67, 6.67, 8, 10.67; the two items
    # left after the floors go to the components furthest behind in the epoch
    lengths, weights = [22, 22, 26, 34], [5, 5, 6, 8]
    mix = Mixture([tagged(n, t) for t, n in enumerate(lengths)], weights, shuffle=False)
    last = mix.batch_order(seed=3, epoch=0, batch_size=35)[-1]
    counts = np.bincount([int(mix[i]["i"]) // 1000 for i in last], minlength=4)
    assert len(last) == 32 and counts.tolist() == [6, 6, 9, 11]


def test_components_walk_their_own_epochs_and_reshuffle_when_they_have_seen_everything():
    small, large = tagged(6, 0), tagged(50, 1)
    mix = Mixture([small, large], [1, 1])
    assert len(mix) == 12  # the small component runs out first: 6 / 0.5
    draws = {0: [], 1: []}
    for epoch in range(5):
        for b in mix.batch_order(seed=1, epoch=epoch, batch_size=4):
            for i in b:
                value = int(mix[i]["i"])
                draws[value // 1000].append(value % 1000)
    small_epochs = [draws[0][k:k + 6] for k in range(0, len(draws[0]), 6)]
    assert all(sorted(e) == list(range(6)) for e in small_epochs)  # each record once per its epoch
    assert len({tuple(e) for e in small_epochs}) > 1  # and a new order each time
    assert len(draws[1]) == len(set(draws[1])) == 30  # large: its first epoch, no record twice


def test_the_order_is_a_pure_function_and_is_the_same_in_every_process():
    a = Mixture({"a": tagged(10, 0), "b": tagged(20, 1)}, {"a": 0.3, "b": 0.7})
    b = Mixture({"a": tagged(10, 0), "b": tagged(20, 1)}, {"b": 0.7, "a": 0.3})
    first = [x.tolist() for x in a.batch_order(seed=5, epoch=2, batch_size=7)]
    assert first == [x.tolist() for x in b.batch_order(seed=5, epoch=2, batch_size=7)]
    assert first != [x.tolist() for x in a.batch_order(seed=6, epoch=2, batch_size=7)]


def test_through_a_loader_it_shards_resumes_on_another_shard_count_and_counts_items_per_source():
    def mix():
        return Mixture({"web": tagged(40, 0), "books": tagged(12, 1)}, {"web": 2, "books": 1})

    def run(shard_count, start=None, steps=None, workers=1):
        rows, states = [], []
        loaders = [ap.Loader(mix(), global_batch_size=6, shard_index=s, shard_count=shard_count,
                             workers=workers, backend="thread", epochs=3, remainder="pad")
                   for s in range(shard_count)]
        iterators = []
        for loader in loaders:
            if start is not None:
                loader.load_state_dict(start)
            iterators.append(iter(loader))
        for parts in itertools.islice(zip(*iterators, strict=True), steps):
            rows.append([i for p in parts for i in real_rows(p)])
        states = [it.state_dict() for it in iterators]
        stats = [loader.stats() for loader in loaders]
        for loader in loaders:
            loader.close()
        return rows, states, stats

    whole, _, stats = run(1)
    # An epoch is 36 items (books run out first: 12 / (1/3)), two web items to one book.
    assert stats[0]["items_per_source"] == {"web": 72, "books": 36}
    head, states, _ = run(2, steps=5)
    tail, _, _ = run(3, start=states[1])
    assert head + tail == whole


def test_different_structures_and_bad_weights_are_refused_clearly():
    with pytest.raises(ValueError, match=r"component 'b' yields examples with leaves \['y'\], but component 'a' yields \['x'\]"):
        Mixture({"a": ap.ArraySource({"x": np.zeros(3)}), "b": ap.ArraySource({"y": np.zeros(3)})}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="weight of '1' is -1"):
        Mixture([tagged(3, 0), tagged(3, 1)], [1, -1])
    with pytest.raises(ValueError, match="2 sources but 3 weights"):
        Mixture([tagged(3, 0), tagged(3, 1)], [1, 1, 1])
    with pytest.raises(ValueError, match="weights are named"):
        Mixture({"a": tagged(3, 0)}, {"b": 1})


def test_a_state_of_a_mixture_with_other_weights_is_refused():
    def loader(weights):
        return ap.Loader(Mixture([tagged(30, 0), tagged(30, 1)], weights), 4, workers=0)

    with loader([1, 1]) as first:
        state = first.state_dict()
    with loader([1, 2]) as second, pytest.raises(ValueError, match="another mixture's weights"):
        second.load_state_dict(state)


def test_counting_a_mixture_skips_records_left_out():
    class Bad(Counting):
        def __getitem__(self, i):
            if i == 3:
                raise OSError("bad")
            return {"i": np.int64(i)}

    mix = Mixture([Bad(10), ap.ArraySource({"i": np.arange(10) + 1000})], [1, 1], shuffle=False)
    with ap.Loader(mix, 4, workers=0, on_error="skip") as loader:
        total = sum(len(b["i"]) for b in loader)
        assert total == 19 and sum(loader.stats()["items_per_source"].values()) == 19
        assert loader.stats()["items_per_source"]["0"] == 9


def test_stats_hand_out_a_copy_of_the_counts():
    with ap.Loader(Mixture([tagged(8, 0), tagged(8, 1)], [1, 1]), 4, workers=0) as loader:
        it = iter(loader)
        before = loader.stats()
        next(it)
        assert before["items_per_source"] == {"0": 0, "1": 0}
        assert loader.stats()["items_per_source"] == {"0": 2, "1": 2}
