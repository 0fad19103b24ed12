"""The sequence planners (``_plan.py``): what every row holds, checked against the items."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostic_prefetch._plan import (
    DST,
    FULL,
    INDEX,
    LENGTH,
    POSITION,
    ROW,
    SRC,
    BucketEpoch,
    EpochPlan,
    _assign,
    column,
    concat_rows,
    fit_rows,
    pad_batch,
)


def batches(rows_from, g, limits, drop=False, start=0, cursor=None):
    plan = EpochPlan(rows_from, g, limits, drop, start, cursor)
    out, k = [], start
    while (found := plan.batch(k)) is not None:
        out.append(found)
        k += 1
    return out, plan


def pieces(plan_batches, keys):
    """Every segment of every batch, as dicts, in delivery order."""
    found = []
    for b, (plan, _) in enumerate(plan_batches):
        for s in plan.segments.tolist():
            found.append({"batch": b, "row": s[ROW], "index": s[INDEX], "position": s[POSITION],
                          "keys": [(s[column(k, SRC)], s[column(k, LENGTH)], s[column(k, DST)], s[column(k, FULL)])
                                   for k in range(keys)]})
    return found


def check_rows(plan_batches, limits, g):
    """No row overfills a key, pieces of a row lie end to end from 0, rows are numbered 0.."""
    for plan, _ in plan_batches:
        table = plan.segments
        assert plan.rows <= g
        assert set(table[:, ROW].tolist()) == set(range(plan.rows))
        for r in range(plan.rows):
            mine = table[table[:, ROW] == r]
            for k, limit in enumerate(limits):
                lengths, dsts = mine[:, column(k, LENGTH)], mine[:, column(k, DST)]
                assert lengths.sum() <= limit
                assert (dsts == np.cumsum(lengths) - lengths).all()


lengths_lists = st.lists(st.integers(0, 40), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(lengths_lists, st.integers(1, 24), st.integers(1, 5), st.randoms(use_true_random=False))
def test_concat_delivers_every_token_of_the_epoch_once_in_order(lengths, limit, g, rnd):
    lengths = np.array(lengths)
    order = np.array(rnd.sample(range(len(lengths)), len(lengths)))
    got, _ = batches(lambda c: concat_rows(order, [lengths], (limit,), c), g, (limit,))
    check_rows(got, (limit,), g)
    stream = [(p["index"], t) for p in pieces(got, 1) for t in range(p["keys"][0][0], p["keys"][0][0] + p["keys"][0][1])]
    assert stream == [(int(i), t) for i in order for t in range(lengths[i])]
    # only the epoch's last row is short
    rows = [plan.segments[plan.segments[:, ROW] == r][:, column(0, LENGTH)].sum()
            for plan, _ in got for r in range(plan.rows)]
    assert all(r == limit for r in rows[:-1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=40),
       st.integers(1, 20), st.integers(1, 20), st.integers(1, 4))
def test_concat_with_two_keys_keeps_each_keys_tokens_once_in_order(pairs, la, lb, g):
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    order = np.arange(len(pairs))
    got, _ = batches(lambda c: concat_rows(order, [a, b], (la, lb), c), g, (la, lb))
    check_rows(got, (la, lb), g)
    for k, m in enumerate((a, b)):
        stream = [(p["index"], t) for p in pieces(got, 2)
                  for t in range(p["keys"][k][0], p["keys"][k][0] + p["keys"][k][1])]
        assert stream == [(int(i), t) for i in order for t in range(m[i])]


@settings(max_examples=150, deadline=None)
@given(lengths_lists, st.integers(1, 24), st.integers(1, 5), st.integers(1, 30), st.booleans(),
       st.sampled_from(["split", "truncate"]))
def test_fit_methods_deliver_every_item_once_and_each_piece_whole_in_one_row(lengths, limit, g, window, best, longer):
    lengths = np.array(lengths)
    order = np.arange(len(lengths))[::-1].copy()
    got, _ = batches(lambda c: fit_rows(order, [lengths], (limit,), best, window, longer == "split", c), g, (limit,))
    check_rows(got, (limit,), g)
    covered: dict[int, list[tuple[int, int]]] = {}
    for p in pieces(got, 1):
        src, n, _, full = p["keys"][0]
        assert full == lengths[p["index"]]
        covered.setdefault(p["position"], []).append((src, n))
    assert sorted(covered) == list(range(len(order)))
    for position, spans in covered.items():
        n = int(lengths[order[position]])
        want = n if longer == "split" else min(n, limit)
        assert sorted(spans)[0][0] == 0
        assert sum(s for _, s in spans) == want
        ends = [src + s for src, s in sorted(spans)]
        assert all(e == nxt for e, (nxt, _) in zip(ends, sorted(spans)[1:], strict=False))  # contiguous pieces


@settings(max_examples=80, deadline=None)
@given(lengths_lists, st.integers(1, 24), st.integers(1, 4), st.sampled_from(["concat", "first_fit", "best_fit"]),
       st.integers(0, 50), st.booleans())
def test_a_plan_resumed_from_any_batchs_cursor_equals_the_uninterrupted_one(lengths, limit, g, method, at, drop):
    lengths = np.array(lengths)
    order = np.arange(len(lengths))
    if method == "concat":
        def rows(c): return concat_rows(order, [lengths], (limit,), c)
    else:
        def rows(c): return fit_rows(order, [lengths], (limit,), method == "best_fit", 7, True, c)
    whole, plan = batches(rows, g, (limit,), drop)
    assert plan.count() == len(whole)
    if not whole:
        return
    k = at % len(whole)
    resumed, again = batches(rows, g, (limit,), drop, k, whole[k][1])
    assert len(resumed) == len(whole) - k
    for (a, ca), (b, cb) in zip(whole[k:], resumed, strict=True):
        assert np.array_equal(a.segments, b.segments) and ca == cb
    assert again.count() == len(whole)
    # counting first, then asking, and asking for forgotten batches, give the same plans
    fresh = EpochPlan(rows, g, (limit,), drop)
    assert fresh.count() == len(whole)
    fresh.forget(len(whole))
    for j in (len(whole) - 1, 0, k):
        assert np.array_equal(fresh.batch(j)[0].segments, whole[j][0].segments)


def test_best_fit_packs_no_looser_than_first_fit_and_a_larger_window_packs_tighter():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.lognormal(np.log(300), 1.0, 4000).astype(np.int64) + 1, 6000)
    order = rng.permutation(len(lengths))

    def rows_used(best, window):
        return sum(1 for _ in fit_rows(order, [lengths], (2048,), best, window, True, None))

    assert rows_used(True, 64) <= rows_used(False, 64)
    assert rows_used(True, 2048) < rows_used(True, 16)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=80), st.integers(50, 120))
def test_one_key_best_fit_by_bisection_makes_the_rows_the_scan_of_every_open_row_makes(need, limit):
    need = np.array(need, np.int64)[:, None]
    limits = np.array([limit], np.int64)
    fast = _assign(need, limits, best=True)
    # The same pieces with a second key that never binds take the general path: a scan.
    scanned = _assign(np.concatenate([need, np.zeros_like(need)], axis=1), np.array([limit, 1]), best=True)
    assert fast == scanned


def test_pad_rounds_the_global_batchs_longest_up_and_cuts_nothing():
    lengths = [np.array([3, 9, 2, 17])]
    plan = pad_batch(np.array([0, 1, 2]), 6, lengths, None, 8)
    assert plan.lengths == (16,)
    assert plan.segments[:, POSITION].tolist() == [6, 7, 8]
    assert plan.segments[:, column(0, LENGTH)].tolist() == [3, 9, 2]
    fixed = pad_batch(np.array([3]), 0, lengths, (10,), 8)
    assert fixed.segments[0, column(0, LENGTH)] == 10 and fixed.segments[0, column(0, FULL)] == 17


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("shuffled", [False, True])
def test_bucket_batches_hold_one_buckets_items_and_lose_none_unless_dropped(drop, shuffled):
    rng = np.random.default_rng(3)
    lengths = [rng.integers(1, 40, 101)]
    order = rng.permutation(101)
    epoch = BucketEpoch(order, lengths, (8, 16, 32), 4, drop, np.random.default_rng(0) if shuffled else None)
    seen = []
    for k in range(len(epoch)):
        plan = epoch.batch(k)
        bound = plan.lengths[0]
        full = plan.segments[:, column(0, FULL)]
        bucket = np.searchsorted([8, 16, 32], np.minimum(full, 32), side="left")
        assert (np.array([8, 16, 32])[bucket] == bound).all()
        assert plan.rows == len(full) and (plan.rows == 4 or not drop)
        seen += plan.segments[:, POSITION].tolist()
    assert len(seen) == len(set(seen))
    if not drop:
        assert sorted(seen) == list(range(101))
    if not shuffled:
        firsts = [epoch.batch(k).segments[0, POSITION] for k in range(len(epoch))]
        assert firsts == sorted(firsts)
