"""Positions and state dicts: delivery in any order keeps the frontier exact; states are checked."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agnostic_prefetch._resume import START, Position, decode, encode, iteration_end

SETTINGS = {"seed": 3, "shuffle": True, "source_len": 40, "global_batch_size": 8,
            "drop_remainder": False, "batches_per_epoch": 5, "batch_size": 4, "shard_index": 0,
            "shard_count": 2, "remainder": "pad", "ordered": True}


def on(shard_index, shard_count, **changes):
    g = SETTINGS["global_batch_size"]
    return {**SETTINGS, "shard_index": shard_index, "shard_count": shard_count,
            "batch_size": g // shard_count, **changes}


@given(st.permutations(range(12)), st.integers(0, 12))
def test_after_any_delivery_order_the_frontier_is_the_lowest_batch_not_delivered(order, count):
    position = START._replace(end=12)
    for seq in order[:count]:
        position = position.after(seq)
    delivered = set(order[:count])
    assert position.next_seq == min(set(range(13)) - delivered)
    assert position.ahead == {s for s in delivered if s > position.next_seq}
    assert position.remaining(12) == 12 - count
    assert all(position.delivered(s) == (s in delivered) for s in range(12))


@given(st.permutations(range(10)), st.integers(0, 10))
def test_a_state_dict_is_json_and_decodes_to_the_same_position(order, count):
    position = Position(0, frozenset(), 10)
    for seq in order[:count]:
        position = position.after(seq)
    state = json.loads(json.dumps(encode(position, SETTINGS, endless=False)))
    assert decode(state, SETTINGS) == position


def test_a_state_saved_under_other_settings_is_refused_naming_both_values():
    state = encode(START, SETTINGS, endless=False)
    with pytest.raises(ValueError, match="saved with seed=3 but this loader has seed=4"):
        decode(state, {**SETTINGS, "seed": 4})
    with pytest.raises(ValueError, match="unknown state version 7"):
        decode({**state, "version": 7}, SETTINGS)


def test_an_interrupted_iteration_resumes_to_its_own_end_and_a_finished_one_starts_the_next_epoch():
    assert iteration_end(Position(7, frozenset(), 10), epochs=2, batches_per_epoch=5) == 10
    assert iteration_end(Position(10, frozenset(), None), epochs=2, batches_per_epoch=5) == 20
    assert iteration_end(Position(3, frozenset(), None), epochs=1, batches_per_epoch=5) == 5


@given(st.integers(0, 49), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]))
def test_an_ordered_state_of_any_shard_loads_on_any_shard_count_that_divides_the_global_batch(seq, saved, new):
    position = Position(seq, frozenset(), 50)
    for index in (0, saved - 1):
        state = json.loads(json.dumps(encode(position, on(index, saved), endless=False)))
        for new_index in (0, new - 1):
            assert decode(state, on(new_index, new)) == position


def test_a_global_batch_that_differs_is_refused_with_the_batch_size_to_use():
    state = encode(Position(7, frozenset(), None), SETTINGS, endless=False)
    with pytest.raises(ValueError, match=r"global batch of 8 items but this loader's is 12 \(batch_size=4 x shard_count=3\); "
                                         r"8 does not split into 3 equal slices; resume on a shard count that divides it \(1, 2, 4, 8\)"):
        decode(state, on(0, 3, global_batch_size=12, batch_size=4))
    with pytest.raises(ValueError, match=r"build the loader with batch_size=2 \(or global_batch_size=8\) for shard_count=4"):
        decode(state, on(0, 4, global_batch_size=12, batch_size=3))


def test_another_source_length_or_drop_remainder_is_refused():
    state = encode(START, SETTINGS, endless=False)
    with pytest.raises(ValueError, match="saved over a source of 40 records but this source has 41"):
        decode(state, {**SETTINGS, "source_len": 41})
    with pytest.raises(ValueError, match="drop_remainder=False but this loader has drop_remainder=True"):
        decode(state, {**SETTINGS, "drop_remainder": True})
    assert decode(state, {**SETTINGS, "remainder": "short", "shard_count": 1, "batch_size": 8}) == START


def test_an_out_of_order_state_of_several_shards_loads_only_into_its_own_shard():
    unordered = on(1, 2, ordered=False)
    position = Position(3, frozenset({5, 7}), 10)
    state = encode(position, unordered, endless=False)
    assert decode(state, unordered) == position
    with pytest.raises(ValueError, match=r"ordered=False by shard 1 of 2.*cannot continue on shard_count=4.*shard_count=2"):
        decode(state, on(0, 4))
    with pytest.raises(ValueError, match=r"but this loader is shard 0: out of order, each process must load its own state"):
        decode(state, on(0, 2))
    one = encode(position, on(0, 1, ordered=False), endless=False)  # one shard: whole batches
    assert decode(one, on(3, 4)) == position


def test_a_version_1_state_loads_with_one_shard_and_is_refused_with_several():
    v1 = {"version": 1, "seed": 3, "epoch": 1, "batch": 2, "delivered_ahead": [], "end_epoch": 2,
          "batch_size": 8, "batches_per_epoch": 5, "shard_index": 0, "shard_count": 1,
          "shuffle": True, "drop_remainder": False}
    assert decode(v1, on(1, 2)) == Position(7, frozenset(), 10)
    with pytest.raises(ValueError, match=r"version 1\) was saved by shard 1 of 2, when shards were contiguous runs"):
        decode({**v1, "shard_index": 1, "shard_count": 2}, SETTINGS)


def test_a_version_1_state_of_a_source_that_orders_its_batches_is_refused():
    v1 = {"version": 1, "seed": 3, "epoch": 0, "batch": 2, "delivered_ahead": [], "end_epoch": 1,
          "batch_size": 8, "batches_per_epoch": 5, "shard_index": 0, "shard_count": 1,
          "shuffle": False, "drop_remainder": False}
    with pytest.raises(ValueError, match="version 1.*orders its own batches.*WindowSource spreads"):
        decode(v1, {**on(0, 1), "shuffle": False, "batch_order": True})


def test_out_of_order_states_all_at_one_frontier_with_nothing_ahead_load_on_another_count():
    states = [encode(Position(4, frozenset(), 10), on(s, 2, ordered=False), endless=False) for s in range(2)]
    assert decode(states, on(0, 4)) == Position(4, frozenset(), 10)
    with pytest.raises(ValueError, match="cannot continue on shard_count=4"):
        decode(states[:1], on(0, 4))  # one process's state alone says nothing of the other
    ahead = [encode(Position(4, frozenset({6}), 10), on(0, 2, ordered=False), endless=False), states[1]]
    with pytest.raises(ValueError, match="cannot continue on shard_count=4"):
        decode(ahead, on(0, 4))


@pytest.mark.parametrize(("key", "first", "second"), [("seed", 1, 999), ("source_len", 40, 48)])
def test_out_of_order_states_at_one_frontier_that_disagree_on_a_setting_are_refused(key, first, second):
    position = Position(4, frozenset(), 10)
    states = [encode(position, on(s, 2, ordered=False, **{key: value}), endless=False)
              for s, value in enumerate((first, second))]
    with pytest.raises(ValueError, match=rf"process 0 saved {key}={first}, process 1 {key}={second}.*same settings"):
        decode(states, on(0, 4, **{key: first}))
