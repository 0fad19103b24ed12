"""Loader behaviour: batches, structure, length, epochs, state, stats, repr."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sources_for_tests import Counting, add_noise

import agnostic_prefetch as ap
from agnostic_prefetch._accounts import board_bytes


def ids(batches):
    return [b["i"].tolist() for b in batches]


@pytest.mark.parametrize("workers,backend", [(0, "process"), (2, "thread"), (2, "process")])
def test_batches_have_the_example_tree_with_a_leading_batch_axis(workers, backend):
    with ap.Loader(Counting(10), 4, workers=workers, backend=backend) as loader:
        batches = list(loader)
    assert ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0]["x"].shape == (4, 3, 2) and batches[0]["x"].dtype == np.float32
    assert batches[2]["x"].shape == (2, 3, 2)
    np.testing.assert_array_equal(batches[1]["x"][:, 0, 0], [4, 5, 6, 7])


def test_non_array_leaves_arrive_as_lists_and_tuples_keep_their_shape():
    class Mixed(Counting):
        def __getitem__(self, i):
            return ({"path": f"img_{i}.jpg", "label": i}, np.float32(i) * 2)

    with ap.Loader(Mixed(5), 2, workers=1) as loader:
        first = next(iter(loader))
    assert isinstance(first, tuple)
    assert first[0]["path"] == ["img_0.jpg", "img_1.jpg"]
    assert first[0]["label"].tolist() == [0, 1]
    assert first[1].dtype == np.float32 and first[1].tolist() == [0.0, 2.0]


def test_ragged_arrays_are_an_error_naming_key_index_shapes_and_remedy():
    class Ragged(Counting):
        def __getitem__(self, i):
            return {"image": np.zeros((4, 4 + (i == 3), 3), np.uint8)}

    with ap.Loader(Ragged(6), 2, workers=1) as loader:
        with pytest.raises(ap.WorkerError) as info:
            list(loader)
    message = str(info.value)
    assert "record 3" in message and "['image']" in message
    assert "uint8[4, 5, 3]" in message and "uint8[4, 4, 3]" in message
    assert "crop, resize or pad" in message
    assert isinstance(info.value.__cause__, ap.LayoutError)


def test_len_and_batches_per_epoch():
    loader = ap.Loader(Counting(10), 4, workers=0, epochs=3)
    assert loader.batches_per_epoch == 3 and len(loader) == 9
    assert len(list(loader)) == 9
    assert len(ap.Loader(Counting(10), 4, workers=0, drop_remainder=True)) == 2
    with pytest.raises(TypeError, match="epochs=None"):
        len(ap.Loader(Counting(10), 4, workers=0, epochs=None))


def test_iterating_again_continues_with_the_next_epoch_reshuffled():
    with ap.Loader(Counting(12), 12, workers=2, shuffle=True, seed=1) as loader:
        first, second = ids(loader), ids(loader)
    assert sorted(first[0]) == sorted(second[0]) == list(range(12))
    assert first != second
    assert first[0] == np.random.default_rng([1, 0]).permutation(12).tolist()
    assert second[0] == np.random.default_rng([1, 1]).permutation(12).tolist()


def test_break_leaves_the_position_where_the_caller_stopped():
    with ap.Loader(Counting(10), 2, workers=2) as loader:
        for batch in loader:
            if batch["i"][0] == 4:
                break
        assert len(loader) == 2
        assert ids(loader) == [[6, 7], [8, 9]]
        assert ids(loader)[0] == [0, 1]  # next epoch


def test_endless_epochs_run_on_without_a_drain():
    with ap.Loader(Counting(5), 2, workers=2, epochs=None) as loader:
        it = iter(loader)
        got = [next(it)["i"].tolist() for _ in range(7)]
    assert got == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4], [0, 1]]


def test_state_dict_is_small_json_and_resumes_exactly():
    with ap.Loader(Counting(20), 3, workers=2, shuffle=True, seed=7, epochs=2) as a:
        it = iter(a)
        head = [next(it)["i"].tolist() for _ in range(9)]
        state = json.loads(json.dumps(a.state_dict()))
        rest = ids(it)
    with ap.Loader(Counting(20), 3, workers=1, shuffle=True, seed=7, epochs=2) as b:
        b.load_state_dict(state)
        assert ids(b) == rest
    assert len(head) + len(rest) == 14


def test_load_state_dict_rejects_other_settings():
    state = ap.Loader(Counting(20), 3, workers=0, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        ap.Loader(Counting(20), 3, workers=0, seed=2).load_state_dict(state)


def test_transform_rng_depends_only_on_seed_epoch_position():
    def run(**kw):
        with ap.Loader(Counting(9), 4, transform=add_noise, shuffle=True, seed=3, **kw) as loader:
            return [b["noise"].copy() for b in loader]

    ref = run(workers=0)
    for kw in ({"workers": 2}, {"workers": 3, "backend": "thread"}, {"workers": 2, "ordered": False}):
        got = run(**kw)
        order = sorted(range(len(got)), key=lambda k: got[k][0, 0]) if not kw.get("ordered", True) else None
        if order is not None:  # unordered: same batches, any order
            got = sorted(got, key=lambda a: a[0, 0])
            ref_sorted = sorted(ref, key=lambda a: a[0, 0])
            for g, r in zip(got, ref_sorted, strict=True):
                np.testing.assert_array_equal(g, r)
        else:
            for g, r in zip(got, ref, strict=True):
                np.testing.assert_array_equal(g, r)


def test_stats_and_repr_show_the_memory_bill():
    with ap.Loader(Counting(10), 4, workers=1, slots=3) as loader:
        for _ in loader:  # streaming: each batch is dropped before the next arrives
            pass
        stats = loader.stats()
        text = repr(loader)
    assert {"batches", "wait_s", "fill_s", "ring_bytes", "skipped", "copied_out"} <= set(stats)
    assert stats["batches"] == 3 and stats["skipped"] == 0 and stats["copied_out"] == 0
    assert stats["ring_bytes"] == 3 * loader.layout.slot_bytes + board_bytes(1)  # one worker's counters
    assert f"{stats['ring_bytes']:,} B" in text and "3 slots" in text


def test_explicit_spec_lays_out_the_ring_without_reading_an_example():
    class Shape:
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, dtype

    spec = {"x": Shape((3, 2), np.float32), "i": Shape((), np.int64)}
    with ap.Loader(Counting(4), 2, workers=1, spec=spec) as loader:
        assert ids(loader) == [[0, 1], [2, 3]]


def test_batch_order_source_drives_the_loader():
    class Reversed(Counting):
        def batch_order(self, *, seed, epoch, batch_size):
            order = list(range(self.n))[::-1]
            return [order[k:k + batch_size] for k in range(0, self.n, batch_size)]

    with ap.Loader(Reversed(5), 2, workers=2) as loader:
        assert ids(loader) == [[4, 3], [2, 1], [0]]


def test_worker_init_runs_once_in_each_worker(tmp_path):
    marker = tmp_path / "init"

    def init(worker_id):
        with open(marker, "a") as f:
            f.write(f"{worker_id}\n")

    with ap.Loader(Counting(8), 2, workers=2, worker_init=init) as loader:
        list(loader)
    assert sorted(marker.read_text().split()) == ["0", "1"]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="backend"):
        ap.Loader(Counting(4), 2, backend="fork")
    with pytest.raises(ValueError, match="on_error"):
        ap.Loader(Counting(4), 2, on_error="ignore")
    with pytest.raises(ValueError, match="slots=2 is too few"):
        ap.Loader(Counting(4), 2, workers=2, slots=2)


def test_closed_loader_refuses_to_iterate():
    loader = ap.Loader(Counting(4), 2, workers=1)
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(ap.LoaderError, match="closed"):
        iter(loader)


def test_a_framework_the_source_imports_in_a_worker_is_noted_once_at_debug_level(caplog):
    from sources_for_tests import ImportsFramework

    with caplog.at_level(logging.DEBUG, logger="agnostic_prefetch"):
        with ap.Loader(ImportsFramework(8), 2, workers=2) as loader:
            list(loader)
    notes = [r for r in caplog.records if "cupy" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG


def test_workers_import_no_framework_of_their_own():
    class Modules:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            import sys

            return {"frameworks": ",".join(sorted({"jax", "torch", "cupy", "tensorflow"} & set(sys.modules))), "i": i}

    with ap.Loader(Modules(), 2, workers=1) as loader:
        assert next(iter(loader))["frameworks"] == ["", ""]


def test_resume_after_the_last_batch_starts_the_next_epoch_like_the_original():
    with ap.Loader(Counting(4), 2, workers=1) as a:
        it = iter(a)
        next(it), next(it)  # every batch taken; StopIteration not yet seen
        state = a.state_dict()
        original_next = ids(a)
    with ap.Loader(Counting(4), 2, workers=1) as b:
        b.load_state_dict(state)
        assert ids(b) == original_next == [[0, 1], [2, 3]]


@pytest.mark.parametrize("workers", [0, 2])
def test_unordered_resume_from_a_state_whose_frontier_was_delivered_ahead(workers):
    # Batch 1 came before batch 0: the frontier (1) is itself in delivered_ahead.
    state = {**ap.Loader(Counting(16), 1, workers=0, ordered=False).state_dict(),
             "batch": 1, "delivered_ahead": [[0, 1]], "end_epoch": 1}
    with ap.Loader(Counting(16), 1, workers=workers, ordered=False) as loader:
        loader.load_state_dict(state)
        assert len(loader) == 14
        assert sorted(b["i"][0] for b in loader) == list(range(2, 16))


def test_unordered_delivers_a_slow_first_batch_last_with_the_same_contents():
    source = Counting(12, slow={0}, delay=1.0)
    with ap.Loader(source, 3, workers=2, ordered=False) as loader:
        got = [b["i"].tolist() for b in loader]
    assert got.index([0, 1, 2]) >= 2  # the batches of the other worker did not wait for it
    assert sorted(got) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_numpy_strings_travel_as_lists_and_framework_tensors_as_arrays():
    torch = pytest.importorskip("torch")

    class Mixed(Counting):
        def __getitem__(self, i):
            return {"name": np.str_(f"n{i}"), "blob": b"\x00" * i, "t": torch.full((2,), float(i))}

    with ap.Loader(Mixed(4), 2, workers=0) as loader:
        first = next(iter(loader))
    assert first["name"] == ["n0", "n1"] and first["blob"] == [b"", b"\x00"]
    assert isinstance(first["t"], np.ndarray) and first["t"].tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_workers_are_topped_up_while_ready_batches_wait():
    from waiting import eventually

    from agnostic_prefetch._testing import internals

    with ap.Loader(Counting(200), 1, workers=1, slots=12, epochs=None) as loader:
        it = iter(loader)
        next(it)
        worker = internals(loader).workers[0]
        # the worker finishes every order it holds; batches wait, ready
        assert eventually(lambda: loader.stats()["per_worker"][0]["batches"] >= worker.capacity)
        for _ in range(5):
            next(it)  # handing out a ready batch must also hand the worker new orders
            assert len(worker.outstanding) > worker.capacity // 2


def test_a_construction_that_fails_late_leaves_no_worker_and_no_descriptor(monkeypatch):
    import os

    from conftest import worker_pids

    from agnostic_prefetch import _autotune

    def broken(self, plan):
        raise RuntimeError("the tuner broke")

    monkeypatch.setattr(_autotune.Tuner, "__init__", broken)
    descriptors = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="the tuner broke"):
        ap.Loader(Counting(8), 2, workers="auto", slots=5)  # after its workers started
    assert not worker_pids() and len(os.listdir("/proc/self/fd")) == descriptors


def test_a_bad_trace_argument_is_refused_before_any_worker_starts():
    import gc

    from conftest import worker_pids

    gc.disable()  # nothing may be left for the cycle collector to find
    try:
        with pytest.raises(TypeError):
            ap.Loader(Counting(8), 2, workers=1, trace=123)
        assert not worker_pids()
    finally:
        gc.enable()


def test_dicts_with_the_same_keys_in_another_order_batch_together_in_the_first_examples_order():
    class Shuffled(Counting):
        def __getitem__(self, i):
            items = [("b", np.float32(i)), ("a", np.int64(i)), ("nested", {"z": i, "y": -i})]
            if i % 2:  # protobuf maps, JSON or a dict built another way: another key order
                items = [(k, dict(reversed(v.items())) if isinstance(v, dict) else v) for k, v in reversed(items)]
            return dict(items)

    with ap.Loader(Shuffled(4), 4, workers=1) as loader:
        batch = next(iter(loader))
    assert list(batch) == ["b", "a", "nested"] and list(batch["nested"]) == ["z", "y"]
    assert batch["a"].tolist() == [0, 1, 2, 3] and batch["nested"]["y"].tolist() == [0, -1, -2, -3]


def test_a_leaf_of_nested_python_lists_of_numbers_is_refused_naming_with_format_numpy():
    class HuggingFaceDefaultFormat(Counting):
        def __getitem__(self, i):
            return {"img": np.zeros((32, 32, 3), np.uint8).tolist(), "label": i}

    with pytest.raises(ap.LayoutError, match=r"\['img'\] is a nested Python list of 3,072 numbers.*with_format\('numpy'\)"):
        ap.Loader(HuggingFaceDefaultFormat(4), 2, workers=0)
    with ap.Loader(ap.ArraySource({"pair": np.zeros((4, 2))}), 2, workers=0) as loader:  # arrays are fine
        assert next(iter(loader))["pair"].shape == (2, 2)


class BadFirst(Counting):
    """Record 0 is corrupt; it says where each record comes from and how to fix it."""

    def __getitem__(self, i):
        if i == 0:
            raise OSError("truncated record")
        return super().__getitem__(i)

    def locate(self, i):
        return f"key b'{i:08d}' of train_lmdb"

    def remedy(self, i, exc):
        return "rewrite it with agnostic-prefetch convert"


def test_a_corrupt_record_read_for_the_layout_is_skipped_with_on_error_skip(caplog):
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(BadFirst(6), 2, workers=1, on_error="skip") as loader:
            assert [b["i"].tolist() for b in loader] == [[1], [2, 3], [4, 5]]
    assert any("record 0 (key b'00000000' of train_lmdb)" in r.getMessage() for r in caplog.records)


def test_a_corrupt_record_read_for_the_layout_names_its_key_and_the_remedy_with_on_error_raise():
    with pytest.raises(ap.LoaderError, match=r"record 0 \(key b'00000000' of train_lmdb\).*OSError: "
                       r"truncated record.*rewrite it with agnostic-prefetch convert.*on_error='skip'"):
        ap.Loader(BadFirst(6), 2, workers=1)


def test_a_transform_failure_names_where_the_record_comes_from():
    def fails_on_three(example, rng):
        if example["i"] == 3:
            raise ValueError("cannot augment")
        return example

    class Located(Counting):
        def locate(self, i):
            return f"key b'{i:08d}' of train_lmdb"

    with ap.Loader(Located(6), 2, workers=1, transform=fails_on_three) as loader:
        with pytest.raises(ap.WorkerError, match=r"record 3 \(key b'00000003' of train_lmdb\).*cannot augment"):
            list(loader)
