"""Sequence batching through the Loader: ``ap.Pad``, ``ap.Bucket``, ``ap.Pack`` (docs/sequences.md)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sequence_sources import Docs, Pairs, decode_rows, global_rows, stream_of

import agnostic_prefetch as ap


def run(source, batching, batch_size=2, **kwargs):
    kwargs.setdefault("workers", 0)
    with ap.Loader(source, batch_size, batching=batching, **kwargs) as loader:
        return [{k: v.copy() for k, v in b.items()} for b in loader], loader.stats()


@pytest.mark.parametrize("method", ["concat", "first_fit", "best_fit"])
@pytest.mark.parametrize("workers,backend", [(0, "process"), (2, "process"), (2, "thread")])
def test_pack_rows_hold_every_token_once_with_segment_ids_and_positions(method, workers, backend):
    source = Docs(np.random.default_rng(0).integers(1, 30, 57))
    got, stats = run(source, ap.Pack(length=24, method=method), 3, workers=workers, backend=backend, shuffle=True)
    rows = [row for b in got for row in decode_rows(b, "tokens", 24)]
    assert all(sum(n for _, _, n in row) <= 24 for row in rows)
    spans: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        for index, start, n in row:
            spans.setdefault(index, []).append((start, n))
    assert sorted(spans) == list(range(57))
    for index, found in spans.items():
        assert sum(n for _, n in found) == source.sizes[index]
        if method != "concat":  # whole items, or row-long pieces of longer ones
            assert len(found) == -(-int(source.sizes[index]) // 24)
    if method == "concat":
        assert stream_of(got, "tokens") == [t for i in _order(source, shuffle=True, g=3) for t in source[i]["tokens"]]
    assert stats["batches"] == len(got)
    assert stats["items"] == sum(b["tokens"].shape[0] for b in got)  # rows, not source items
    if workers == 0:  # (workers read ahead into the next iteration's batches)
        pieces_per_batch = [{index for row in decode_rows(b, "tokens", 24) for index, _, _ in row} for b in got]
        assert stats["items_read"] == sum(len(p) for p in pieces_per_batch)  # once per batch an item reaches


def _order(source, shuffle, g):
    """The epoch's item order, as a plain loader gives it."""
    def first(example, rng):
        return {"i": np.int64(example["tokens"][0] // 1000)}

    with ap.Loader(source, g, workers=0, shuffle=shuffle, transform=first) as plain:
        return [int(i) for b in plain for i in b["i"]]


def test_every_backend_and_worker_count_gives_the_same_packed_batches():
    source = Docs(np.random.default_rng(1).integers(1, 50, 80))
    batching = ap.Pack(length=32, method="best_fit", window=20)
    first, _ = run(source, batching, 4, workers=0, shuffle=True, seed=5, epochs=2)
    for workers, backend in ((1, "process"), (3, "process"), (2, "thread")):
        again, _ = run(source, batching, 4, workers=workers, backend=backend, shuffle=True, seed=5, epochs=2)
        assert len(again) == len(first)
        for a, b in zip(first, again, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    unordered, _ = run(source, batching, 4, workers=3, shuffle=True, seed=5, epochs=2, ordered=False)
    assert sorted(b["tokens"].tobytes() for b in unordered) == sorted(b["tokens"].tobytes() for b in first)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=50), st.integers(4, 32),
       st.sampled_from([(2, 1, 2), (2, 2, 4), (1, 2, 1), (1, 4, 2), (3, 1, 3), (2, 2, 1)]),
       st.sampled_from(["concat", "first_fit", "best_fit", "pad", "bucket"]), st.integers(0, 40), st.booleans(),
       st.sampled_from(["pad", "drop"]), st.sampled_from([0, 2]))
def test_a_resume_on_another_shard_count_continues_the_same_global_batches(lengths, limit, shards, method, stop,
                                                                           shuffle, remainder, workers):
    per, s, s2 = shards  # rows per shard, shard count before and after
    g = per * s
    source = Docs(np.array(lengths))
    batching = {"pad": ap.Pad(multiple=4), "bucket": ap.Bucket((8, 16, 40))}.get(
        method) or ap.Pack(length=limit, method=method, window=9)
    options = dict(shuffle=shuffle, seed=3, remainder=remainder, epochs=2)
    try:
        whole = global_rows(source, batching, g, 1, **options)
    except ValueError as exc:  # too few rows (items) for one batch, and remainder='drop'
        assert "an epoch has no batches" in str(exc)
        return
    if method in ("pad", "bucket"):  # nothing is lost but what remainder='drop' leaves out
        rows = [r for batch in whole[: len(whole) // 2] for r in batch]
        firsts = [int(r[0]) // 1000 for r in rows if r.any()]
        assert len(firsts) == len(set(firsts))
    k = stop % len(whole)
    loaders = [ap.Loader(source, global_batch_size=g, shard_index=i, shard_count=s, batching=batching, workers=0,
                         **options) for i in range(s)]
    its = [iter(x) for x in loaders]
    for _ in range(k):
        for it in its:
            next(it)
    states = [it.state_dict() for it in its]
    assert len(json.dumps(states[0])) < 1000  # the plan is never in the state
    for x in loaders:
        x.close()
    rest = global_rows(source, batching, g, s2, state=states, workers=workers, **options)
    assert [r.tolist() for r in rest] == [r.tolist() for r in whole[k:]]


def test_len_is_exact_and_batches_per_epoch_bounds_it_for_the_fit_methods():
    source = Docs(np.random.default_rng(2).integers(1, 100, 300))
    with ap.Loader(source, 4, workers=0, batching=ap.Pack(length=128, method="first_fit"), epochs=3,
                   shuffle=True) as loader:
        n = len(loader)
        it = iter(loader)
        assert n == len(it)
        got = sum(1 for _ in it)
        assert got == n and loader.batches_per_epoch * 3 >= n


def test_an_endless_run_crosses_epochs_without_losing_or_repeating_tokens():
    sizes = np.random.default_rng(4).integers(1, 20, 31)
    source = Docs(sizes)
    with ap.Loader(source, 2, workers=1, batching=ap.Pack(length=16), epochs=None, shuffle=True) as loader:
        it = iter(loader)
        seen = [next(it) for _ in range(40)]
        states = it.state_dict()
    per_epoch = -(-int(sizes.sum()) // 16)
    tokens = stream_of(seen, "tokens")
    first = tokens[: int(sizes.sum())]
    assert sorted(first) == sorted(t for i in range(31) for t in source[i]["tokens"])
    assert states["epoch"] >= 40 // -(-per_epoch // 2) - 1


def test_two_keys_pack_into_the_same_rows():
    source = Pairs(np.random.default_rng(5).integers(1, 30, 40), np.random.default_rng(6).integers(1, 12, 40))
    got, _ = run(source, ap.Pack(length={"inputs": 32, "targets": 12}, method="best_fit"), 2)
    assert got[0]["inputs"].shape == (2, 32) and got[0]["targets"].shape == (2, 12)
    for key in ("inputs", "targets"):
        rows = [row for b in got for row in decode_rows(b, key, None)]
        assert sorted(i for row in rows for i, _, _ in row) == list(range(40))
    for b in got:  # a row's items are the same for both keys
        assert np.array_equal(b["inputs_segment_ids"].max(axis=1), b["targets_segment_ids"].max(axis=1))


def test_pad_pads_to_the_global_batchs_longest_on_every_shard():
    sizes = np.array([3, 30, 5, 7, 2, 9, 12, 1])
    source = Docs(sizes)
    shapes = []
    for shard in range(2):
        got, _ = run(source, ap.Pad(multiple=8), global_batch_size=4, shard_index=shard, shard_count=2)
        shapes.append([b["tokens"].shape for b in got])
        for b in got:
            ids = b["tokens_segment_ids"]
            assert ((ids == 1).sum(axis=1) == b["tokens_positions"].max(axis=1) + 1).all()
    assert shapes[0] == shapes[1] == [(2, 32), (2, 16)]


def test_pad_keeps_other_leaves_and_cuts_or_refuses_longer_items():
    source = Docs(np.array([3, 30, 5]), label=True)
    got, _ = run(source, ap.Pad(length=8, longer="truncate"), 3)
    assert got[0]["label"].tolist() == [0, 1, 2] and got[0]["tokens"].shape == (3, 8)
    assert got[0]["tokens"][1].tolist() == list(range(1000, 1008))
    with pytest.raises(ValueError, match=r"record 1: .tokens. is 30 long, longer than the rows. 8"):
        run(source, ap.Pad(length=8), 3)


@pytest.mark.parametrize("remainder", ["short", "pad", "drop"])
def test_bucket_batches_one_bucket_each_and_its_partial_batches_follow_remainder(remainder):
    sizes = np.random.default_rng(7).integers(1, 40, 45)
    source = Docs(sizes)
    got, stats = run(source, ap.Bucket((8, 16, 40)), 4, remainder=remainder, shuffle=True)
    seen = []
    for b in got:
        assert b["tokens"].shape[1] in (8, 16, 40)
        rows = b["tokens_segment_ids"].shape[0]
        real = b["mask"] if remainder == "pad" else np.ones(rows, bool)
        assert rows == 4 or remainder == "short"
        seen += [int(t) // 1000 for t, keep in zip(b["tokens"][:, 0], real, strict=True) if keep]
        lengths = sizes[[int(t) // 1000 for t, keep in zip(b["tokens"][:, 0], real, strict=True) if keep]]
        assert (np.searchsorted([8, 16, 40], lengths) == [8, 16, 40].index(b["tokens"].shape[1])).all()
    if remainder == "drop":
        assert len(seen) == len(set(seen)) and len(seen) < 45
    else:
        assert sorted(seen) == list(range(45))


def test_lengths_come_from_lengths_a_file_or_one_measured_pass(tmp_path, caplog):
    sizes = np.random.default_rng(8).integers(1, 20, 50)
    plain = Docs(sizes, with_lengths=False)
    reference, _ = run(Docs(sizes), ap.Pack(length=16), 2)
    path = tmp_path / "lengths.npz"
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        measured, _ = run(plain, ap.Pack(length=16, lengths=path), 2, workers=2)
    assert any("measured the sequence lengths of 50 items" in r.message and str(path) in r.message
               for r in caplog.records)
    assert path.exists()
    again, _ = run(plain, ap.Pack(length=16, lengths=str(path)), 2)  # read back, no pass
    given_, _ = run(plain, ap.Pack(length=16, lengths=sizes), 2)
    passed, _ = run(plain, ap.Pack(length=16), 2, workers=1)  # measured, not saved
    for other in (measured, again, given_, passed):
        assert [b["tokens"].tolist() for b in other] == [b["tokens"].tolist() for b in reference]
    with pytest.raises(ValueError, match="49 entries but the source has 50 records"):
        run(plain, ap.Pack(length=16, lengths=sizes[:49]), 2)


def test_an_item_whose_length_differs_from_its_planned_one_names_the_record_and_both_numbers():
    sizes = np.array([4, 5, 6, 7])
    wrong = sizes.copy()
    wrong[2] = 9
    with pytest.raises(ap.WorkerError, match=r"record 2.*'tokens' is 6 long, but its planned length is 9"):
        run(Docs(sizes), ap.Pack(length=16, lengths=wrong), 2)


def test_a_transform_that_changes_lengths_is_measured_after_the_transform():
    sizes = np.array([4, 5, 6, 7, 2])

    def add_eos(example, rng):
        return {"tokens": np.concatenate([example["tokens"], np.array([-1], np.int32)])}

    got, _ = run(Docs(sizes, with_lengths=False), ap.Pack(length=8), 2, transform=add_eos, workers=1)
    assert sum(int((b["tokens_segment_ids"] > 0).sum()) for b in got) == int(sizes.sum()) + 5


def test_pack_over_a_mixture_takes_lengths_through_its_mapping():
    a = Docs(np.random.default_rng(9).integers(1, 20, 30))
    b = Docs(np.random.default_rng(10).integers(20, 40, 10), offset=500)
    mix = ap.Mixture({"a": a, "b": b}, {"a": 1, "b": 1})
    got, stats = run(mix, ap.Pack(length=48, method="first_fit"), 2, remainder="pad")
    rows = [row for batch in got for row in decode_rows(batch, "tokens", 48)]
    for row in rows:
        for index, start, n in row:
            source, i = (b, index - 500) if index >= 500 else (a, index)
            assert start == 0 and n == source.sizes[i]
    assert sum(len(row) for row in rows) == len(mix)


def test_skipped_records_leave_padding_and_are_counted(caplog):
    sizes = np.array([4, 5, 6, 7, 3, 2])
    source = Docs(sizes, broken={3})
    got, stats = run(source, ap.Pack(length=8), 2, on_error="skip")
    assert stats["skipped"] == 1
    tokens = stream_of(got, "tokens")
    assert not any(3000 <= t < 4000 for t in tokens) and len(tokens) == int(sizes.sum()) - 7


@pytest.mark.parametrize("kwargs,match", [
    (dict(shapes="per_batch"), "no shapes='per_batch'"),
    (dict(shard_count=2, global_batch_size=4), "remainder='pad'"),
    (dict(batching="pack"), "ap.Pad"),
])
def test_settings_that_cannot_work_are_refused_with_the_remedy(kwargs, match):
    kwargs = {"batch_size": None if "global_batch_size" in kwargs else 2, "batching": ap.Pack(length=8), **kwargs}
    batch_size = kwargs.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        ap.Loader(Docs(np.array([3, 4])), batch_size, workers=0, **kwargs)


def test_pack_refuses_a_leaf_that_is_not_a_sequence_and_items_that_are_not_dicts():
    with pytest.raises(ValueError, match=r"'label' is not one of \['tokens'\]"):
        ap.Loader(Docs(np.array([3, 4]), label=True), 2, workers=0, batching=ap.Pack(length=8, keys="tokens"))

    class Bare:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.arange(3)

    with pytest.raises(ValueError, match="needs dict items"):
        ap.Loader(Bare(), 2, workers=0, batching=ap.Pack(length=8))


def test_pack_configs_check_their_arguments():
    with pytest.raises(ValueError, match="method"):
        ap.Pack(length=8, method="greedy")
    with pytest.raises(ValueError, match="positive"):
        ap.Pack(length=0)
    with pytest.raises(ValueError, match="applies to the fit methods"):
        ap.Pack(length=8, longer="truncate")
    with pytest.raises(ValueError, match="increase"):
        ap.Bucket((16, 8))


def test_a_state_from_other_batching_or_other_lengths_or_no_batching_is_refused_naming_both():
    sizes = np.random.default_rng(12).integers(1, 20, 30)
    with ap.Loader(Docs(sizes), 2, workers=0, batching=ap.Pack(length=16)) as loader:
        it = iter(loader)
        next(it)
        state = it.state_dict()
    with ap.Loader(Docs(sizes), 2, workers=0, batching=ap.Pack(length=32)) as other, \
            pytest.raises(ValueError, match=r"batching Pack\(length=16.*but this loader's is Pack\(length=32"):
        other.load_state_dict(state)
    longer = sizes.copy()
    longer[0] += 1
    with ap.Loader(Docs(longer), 2, workers=0, batching=ap.Pack(length=16)) as other, \
            pytest.raises(ValueError, match="other lengths"):
        other.load_state_dict(state)
    with ap.Loader(Docs(np.full(30, 5)), 2, workers=0) as plain:
        with pytest.raises(ValueError, match=r"but this loader's is None \(items stacked\)"):
            plain.load_state_dict(state)
        plain_state = plain.state_dict()
    del plain_state["batching"]  # a state saved before batching= existed
    with ap.Loader(Docs(sizes), 2, workers=0, batching=ap.Pack(length=16)) as loader, \
            pytest.raises(ValueError, match="saved with batching None"):
        loader.load_state_dict(plain_state)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 6), st.booleans(),
       st.sampled_from([ap.Pad(multiple=4), ap.Pad(length=24, longer="truncate"), ap.Bucket((8, 16, 40)),
                        ap.Bucket((4, 12), longer="truncate")]), st.sampled_from(["short", "pad"]))
def test_pad_and_bucket_deliver_every_item_once_intact_or_cut_as_told(lengths, batch, shuffle, batching, remainder):
    sizes = np.array(lengths)
    got, _ = run(Docs(sizes), batching, batch, shuffle=shuffle, remainder=remainder)
    seen = {}
    for b in got:
        real = b["mask"] if remainder == "pad" else np.ones(len(b["tokens"]), bool)
        for row, ids, keep in zip(b["tokens"], b["tokens_segment_ids"], real, strict=True):
            if keep:
                item = int(row[0]) // 1000
                assert item not in seen
                seen[item] = row[ids > 0].tolist()
    assert sorted(seen) == list(range(len(sizes)))
    cut = batching.length if isinstance(batching, ap.Pad) else batching.boundaries[-1]
    for item, tokens in seen.items():
        assert tokens == list(range(1000 * item, 1000 * item + min(int(sizes[item]), cut or 10**9)))


def test_bucket_over_a_mixture_delivers_each_epochs_draws_once_though_bucket_counts_vary():
    a = Docs(np.random.default_rng(16).integers(1, 20, 30))  # epochs of 10, 11 and 10 batches
    b = Docs(np.random.default_rng(17).integers(1, 40, 30), offset=500)
    mix = ap.Mixture({"a": a, "b": b}, {"a": 3, "b": 1}, epoch_items=40)
    got, _ = run(mix, ap.Bucket((10, 40)), 4, epochs=3, remainder="pad")
    firsts = [int(r[0]) // 1000 for batch in got for r, keep in zip(batch["tokens"], batch["mask"], strict=True)
              if keep]
    want = [int(i) + (500 - 30 if i >= 30 else 0) for e in range(3)
            for batch in mix.batch_order(seed=0, epoch=e, batch_size=4) for i in batch]
    assert sorted(firsts) == sorted(want)


def test_repr_names_the_batching_and_that_the_epoch_count_is_a_bound():
    with ap.Loader(Docs(np.array([3, 9, 4, 7])), 2, workers=0, batching=ap.Pack(length=8, method="best_fit")) as loader:
        text = repr(loader)
    assert "batches_per_epoch=at most " in text
    assert "batching=Pack(length=8, method='best_fit'" in text and "tokens_segment_ids" in text


def test_items_of_varying_length_without_batching_are_refused_naming_the_batching_options():
    with ap.Loader(Docs([5, 9, 3]), 3, workers=0) as loader, pytest.raises(ap.WorkerError, match=r"batching=ap\.Pad"):
        next(iter(loader))

    class Mixed:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"x": np.zeros((4, 4 + i), np.float32)}  # differs beyond the first axis: no hint
    with ap.Loader(Mixed(), 2, workers=0) as loader, pytest.raises(ap.WorkerError) as info:
        next(iter(loader))
    assert "batching=" not in str(info.value)
