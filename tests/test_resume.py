"""Positions and state dicts: delivery in any order keeps the frontier exact; states are checked."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agnostic_prefetch._resume import START, Position, decode, encode, iteration_end

SETTINGS = {"seed": 3, "batch_size": 4, "batches_per_epoch": 5, "shard_index": 0, "shard_count": 1,
            "shuffle": True, "drop_remainder": False}


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
