"""Stream sources: torch IterableDatasets, ap.Stream, ap.Fetcher (docs/streams.md)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import stream_sources as ss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agnostic_prefetch as ap


def run(source, batch_size, **kwargs):
    with ap.Loader(source, batch_size, **kwargs) as loader:
        return [{k: v.tolist() for k, v in b.items()} for b in loader]


def xs(batches):
    return [b["x"] for b in batches]


def in_turn(lengths, workers, batch_size, drop=False):
    """The batches torch's DataLoader gives over ``Items`` streams: each worker's batches in turn."""
    per_worker = []
    for w in range(workers):
        items = [w * 1000 + k for k in range(ss.lengths_for(w, lengths))]
        batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        per_worker.append([b for b in batches if len(b) == batch_size or not drop])
    out = []
    for r in range(max(len(b) for b in per_worker)):
        out += [b[r] for b in per_worker if r < len(b)]
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_torch_iterable_dataset_gives_torchs_dataloader_batches_in_torchs_order(workers):
    torch = pytest.importorskip("torch")
    from torch_streams import Sharded

    dataset = Sharded(3, 41)
    expected = [{k: v.tolist() for k, v in b.items()}
                for b in torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers,
                                                         multiprocessing_context="spawn")]
    assert run(dataset, 4, workers=workers) == expected
    assert run(dataset, 4, workers=workers, drop_remainder=True) == [b for b in expected if len(b["x"]) == 4]


def test_get_worker_info_answers_in_each_worker_as_in_torchs():
    pytest.importorskip("torch")
    from torch_streams import WhoAmI

    batches = run(WhoAmI(), 1, workers=3)
    assert [b["id"] for b in batches] == [[0], [1], [2]]
    assert all(b["num_workers"] == [3] and b["same_dataset"] == [True] for b in batches)
    assert len({b["seed"][0] for b in batches}) == 3
    assert run(WhoAmI(), 1, workers=3, seed=5) != batches  # seeds follow the loader's seed


@pytest.mark.parametrize("workers,backend", [(0, "thread"), (2, "process"), (3, "thread")])
def test_a_stream_gives_each_workers_batches_in_turn_and_drops_ended_workers(workers, backend):
    lengths = (7, 2, 11)
    got = xs(run(ap.Stream(ss.generator(lengths), thread_safe=True), 3, workers=workers, backend=backend))
    assert got == in_turn(lengths, max(1, workers), 3)


def test_epochs_restart_every_stream_and_remainder_rules_apply():
    stream = ap.Stream(ss.stateful((5, 3), epoch_offset=True))
    batches = xs(run(stream, 2, workers=2, epochs=2))
    first = in_turn((5, 3), 2, 2)
    assert batches == first + [[100_000 + x for x in b] for b in first]
    assert xs(run(stream, 2, workers=2, drop_remainder=True)) == in_turn((5, 3), 2, 2, drop=True)
    padded = run(stream, 2, workers=2, remainder="pad")
    assert [b["mask"] for b in padded] == [[True, True]] * 3 + [[True, False]] * 2
    assert [b["x"] for b in padded][-2:] == [[1002, 0], [4, 0]]


def test_batches_per_epoch_makes_every_epoch_that_long():
    stream = ap.Stream(ss.stateful((3, 1)), batches_per_epoch=5)
    with ap.Loader(stream, 2, workers=2, remainder="pad", epochs=2) as loader:
        assert len(loader) == 10 and loader.batches_per_epoch == 5
        batches = [{k: v.tolist() for k, v in b.items()} for b in loader]
    assert len(batches) == 10
    assert [sum(b["mask"]) for b in batches[:5]] == [2, 1, 1, 0, 0]  # then padding only
    long = ap.Stream(ss.stateful((50,)), batches_per_epoch=3)
    assert xs(run(long, 2, workers=1, epochs=2)) == [[0, 1], [2, 3], [4, 5]] * 2


def test_several_hosts_step_together_with_batches_per_epoch_and_padding():
    steps = []
    for shard in range(2):  # hosts whose streams hold different amounts
        stream = ap.Stream(ss.stateful((9, 1) if shard == 0 else (2, 2)), batches_per_epoch=4)
        batches = run(stream, 3, workers=2, shard_index=shard, shard_count=2, remainder="pad")
        steps.append(len(batches))
        assert {len(b["x"]) for b in batches} == {3}
    assert steps == [4, 4]
    with pytest.raises(ValueError, match="remainder='pad' or 'drop'"):
        ap.Loader(ap.Stream(ss.stateful((3,))), 2, workers=0, shard_count=2)


@pytest.mark.parametrize("workers,backend", [(0, "thread"), (2, "process"), (3, "thread")])
def test_a_fetchers_chunks_of_any_length_are_rebatched_every_item_once(workers, backend):
    totals = (23, 0, 40)
    fetcher = ap.Fetcher(ss.Chunks(totals), thread_safe=True)
    batches = run(fetcher, 5, workers=workers, backend=backend)
    count = max(1, workers)
    delivered = [x for b in batches for x in b["x"]]
    expected = [w * 10**6 + k for w in range(count) for k in range(totals[w % 3])]
    assert sorted(delivered) == sorted(expected)
    per_worker = {}
    for b in batches:
        assert [row[0] for row in b["y"]] == [x % 10**6 for x in b["x"]]
        per_worker.setdefault(b["x"][0] // 10**6, []).append(len(b["x"]))
    for sizes in per_worker.values():  # full batches but each worker's last
        assert all(n == 5 for n in sizes[:-1]) and 0 < sizes[-1] <= 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(totals=st.lists(st.integers(0, 30), min_size=1, max_size=3), batch=st.integers(1, 6),
       seed=st.integers(0, 100), stop=st.integers(0, 12))
def test_a_stateful_fetcher_resumes_exactly_property(totals, batch, seed, stop):
    workers = len(totals)
    fetcher = ap.Fetcher(ss.Chunks(tuple(totals), seed), thread_safe=True)
    spec = {"x": np.zeros((), np.int64), "y": np.zeros(2, np.int64)}  # (every stream may be empty)
    kwargs = dict(workers=workers, backend="thread", epochs=1, spec=spec)
    full = run(fetcher, batch, **kwargs)
    with ap.Loader(fetcher, batch, **kwargs) as loader:
        it = iter(loader)
        head = [{k: v.tolist() for k, v in next(it).items()} for _ in range(min(stop, len(full)))]
        state = it.state_dict()
    with ap.Loader(ap.Fetcher(ss.Chunks(tuple(totals), seed), thread_safe=True), batch, **kwargs) as loader:
        loader.load_state_dict(state)
        tail = [{k: v.tolist() for k, v in b.items()} for b in loader]
    assert head + tail == full


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=3), batch=st.integers(1, 4),
       epochs=st.integers(1, 2), stop=st.integers(0, 20), ordered=st.booleans())
def test_a_stateful_stream_resumed_mid_epoch_equals_the_uninterrupted_run_property(lengths, batch, epochs, stop,
                                                                                    ordered):
    stream = ap.Stream(ss.stateful(tuple(lengths), epoch_offset=True), thread_safe=True)
    spec = {"x": np.zeros((), np.int64), "w": np.zeros((), np.int64)}
    kwargs = dict(workers=len(lengths), backend="thread", epochs=epochs, ordered=ordered, spec=spec)
    full = xs(run(stream, batch, **kwargs))
    if not ordered:
        assert sorted(map(tuple, full)) == sorted(
            tuple(100_000 * e + x for x in b) for e in range(epochs) for b in in_turn(tuple(lengths), len(lengths),
                                                                                      batch))
    with ap.Loader(stream, batch, **kwargs) as loader:
        it = iter(loader)
        head = [next(it)["x"].tolist() for _ in range(min(stop, len(full)))]
        state = it.state_dict()
    with ap.Loader(stream, batch, **kwargs) as loader:
        loader.load_state_dict(state)
        tail = [b["x"].tolist() for b in loader]
    if ordered:
        assert head + tail == full
    else:  # out of order, the same batches (each worker's in its own order), none lost or repeated
        assert sorted(map(tuple, head + tail)) == sorted(map(tuple, full))


def test_a_stateful_stream_resumes_exactly_in_worker_processes_through_json():
    import json

    stream = ap.Stream(ss.stateful((9, 4, 13)))
    full = xs(run(stream, 2, workers=3, epochs=2))
    with ap.Loader(stream, 2, workers=3, epochs=2) as loader:
        it = iter(loader)
        head = [next(it)["x"].tolist() for _ in range(7)]
        state = json.loads(json.dumps(loader.state_dict()))
    with ap.Loader(stream, 2, workers=3, epochs=2) as loader:
        loader.load_state_dict(state)
        assert head + xs(run_loader(loader)) == full


def run_loader(loader):
    return [{k: v.tolist() for k, v in b.items()} for b in loader]


def test_a_second_iter_continues_where_a_broken_off_one_stopped():
    stream = ap.Stream(ss.generator((8, 5)))  # no state needed: the same workers go on
    full = xs(run(stream, 2, workers=2, epochs=2))
    with ap.Loader(stream, 2, workers=2, epochs=2) as loader:
        it = iter(loader)
        head = [next(it)["x"].tolist() for _ in range(3)]
        assert head + xs(run_loader(loader)) == full


def test_a_stateless_stream_is_refused_mid_epoch_and_accepted_at_an_epochs_end():
    stream = ap.Stream(ss.stateless((6, 6)))
    with ap.Loader(stream, 2, workers=2) as loader:
        it = iter(loader)
        next(it)
        mid = it.state_dict()
        list(it)
        boundary = loader.state_dict()  # the epoch's end: every stream starts afresh
    with ap.Loader(stream, 2, workers=2) as loader:
        with pytest.raises(ValueError, match=r"keeps no state.*state_dict\(\) and load_state_dict\(\).*map-style"):
            loader.load_state_dict(mid)
        loader.load_state_dict(boundary)
        assert boundary["epoch"] == 1
        assert xs(run_loader(loader)) == in_turn((6, 6), 2, 2)


def test_a_state_from_another_worker_count_or_kind_is_refused():
    stream = ap.Stream(ss.stateful((6, 6)))
    with ap.Loader(stream, 2, workers=2) as loader:
        it = iter(loader)
        next(it)
        state = it.state_dict()
    with ap.Loader(stream, 2, workers=3) as loader:
        with pytest.raises(ValueError, match="workers=2 and this loader has workers=3"):
            loader.load_state_dict(state)
    with ap.Loader(ap.ArraySource({"x": np.arange(4)}), 2, workers=0) as loader:
        with pytest.raises(ValueError, match="saved by a loader over a stream"):
            loader.load_state_dict(state)
        mapped = loader.state_dict()
    with ap.Loader(stream, 2, workers=2) as loader:
        with pytest.raises(ValueError, match="map-style source"):
            loader.load_state_dict(mapped)


def test_a_stream_that_raises_is_named_with_its_worker_and_item():
    source = ap.Stream(ss.Raising(bad=1, at=3))
    with pytest.raises(ap.WorkerError, match=r"worker 1's stream \(epoch 0\), item 3, reading it.*item 3 is corrupt"):
        run(source, 2, workers=2)
    batches = run(source, 2, workers=2, on_error="skip")  # a generator ends where it raised
    assert sorted(x for b in xs(batches) for x in b) == sorted(list(range(10)) + [0, 1, 2])


def test_an_item_of_another_shape_is_named_with_its_worker_and_item():
    with pytest.raises(ap.WorkerError, match=r"worker 0's stream \(epoch 0\), item 4.*float32\[5\].*float32\[3\]"):
        run(ap.Stream(ss.reshaped), 2, workers=1)


def test_a_fetcher_chunk_whose_leaves_disagree_is_named():
    with pytest.raises(ap.WorkerError, match=r"chunk 0 of worker 0's fetcher.*leading lengths \[4, 3\]"):
        run(ap.Fetcher(ss.ragged_fetch), 2, workers=1, spec={"x": np.zeros((), np.float64),
                                                              "y": np.zeros((), np.float64)})


def test_what_a_stream_cannot_do_is_refused_with_the_remedy():
    def gen():
        yield {"x": 1}

    with pytest.raises(TypeError, match="one-shot iterator.*ap.Stream"):
        ap.Loader(gen(), 2)
    with pytest.raises(TypeError, match="give the function that makes it"):
        ap.Stream(gen())
    assert xs(run(ap.Stream(ss.Three), 2, workers=0)) == [[0, 1], [2]]  # an iterator class makes iterators
    stream = ap.Stream(ss.stateful((4,)))
    with pytest.raises(ValueError, match="shuffle=True with a stream"):
        ap.Loader(stream, 2, shuffle=True)
    with pytest.raises(ValueError, match="batching= with a stream"):
        ap.Loader(stream, 2, batching=ap.Pad(length=4))
    with pytest.raises(ValueError, match="batches_per_epoch"):
        ap.Stream(ss.stateful((4,)), batches_per_epoch=0)
    with ap.Loader(stream, 2, workers=0) as loader, pytest.raises(TypeError, match="batches_per_epoch="):
        assert loader.batches_per_epoch is None
        assert "stream=Stream(" in repr(loader)
        len(loader)
    with pytest.raises(ap.LoaderError, match="yielded nothing.*spec="):
        ap.Loader(ap.Stream(ss.stateful((0,))), 2, workers=0)


def test_torch_datasets_refuse_threads():
    pytest.importorskip("torch")
    from torch_streams import Sharded

    with pytest.raises(ValueError, match="get_worker_info"):
        ap.Loader(Sharded(0, 4), 2, workers=2, backend="thread")


def test_workers_auto_picks_a_fixed_count_and_stats_count_the_items(caplog):
    with caplog.at_level(logging.INFO, logger="agnostic_prefetch"):
        with ap.Loader(ap.Stream(ss.stateful((5,))), 2, workers="auto") as loader:
            batches = run_loader(loader)
            stats = loader.stats()
            count = loader.workers
    assert "workers='auto' with a stream" in caplog.text
    assert len(batches) == 3 * count and stats["items"] == 5 * count
    assert stats["batches"] == len(batches) and stats["per_worker"]  # (workers' rows: as of their last store)


def test_stream_info_says_where_the_stream_runs():
    def make(worker_id, num_workers):
        info = ap.stream_info()
        yield {"v": np.array([info.id, info.num_workers, info.worker, info.workers, info.shard_index,
                               info.shard_count, info.epoch])}

    batches = run(ap.Stream(make), 1, workers=2, shard_index=1, shard_count=3, remainder="pad", epochs=2)
    assert [b["v"][0] for b in batches] == [[2, 6, 0, 2, 1, 3, 0], [3, 6, 1, 2, 1, 3, 0],
                                            [2, 6, 0, 2, 1, 3, 1], [3, 6, 1, 2, 1, 3, 1]]
    assert ap.stream_info() is None


def test_a_stream_loader_feeds_prefetch_to_device():
    pytest.importorskip("jax")
    stream = ap.Stream(ss.stateful((5, 7)))
    expected = xs(run(stream, 2, workers=2))
    with ap.Loader(stream, 2, workers=2) as loader:
        got = [np.asarray(b["x"]).tolist() for b in ap.prefetch_to_device(loader, size=2)]
    assert got == expected


@pytest.mark.parametrize("transform", ["train", "eval"])
def test_the_fused_crop_decoders_run_over_a_stream_of_encoded_images(transform):
    crop = ap.RandomResizedCropDecode(64) if transform == "train" else ap.CenterCropDecode(64)
    stream = ap.Stream(ss.Photos(5))
    with ap.Loader(stream, 4, workers=2, transform=crop, seed=3) as loader:
        got = [(b["n"].tolist(), b["image"].copy()) for b in loader]
    again = []
    with ap.Loader(stream, 4, workers=2, transform=crop, seed=3) as loader:
        again = [(b["n"].tolist(), b["image"].copy()) for b in loader]
    assert [n for n, _ in got] == [[0, 1, 2, 3], [1000, 1001, 1002, 1003], [4], [1004]]
    assert all(img.shape[1:] == (64, 64, 3) and img.dtype == np.uint8 for _, img in got)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, again, strict=True))  # deterministic
