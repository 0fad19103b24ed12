"""ap.trace(): Chrome trace-event JSON with a track per worker, the caller and the stage's thread."""

from __future__ import annotations

import collections
import json

import pytest
from sources_for_autotune import Waiting

import agnostic_prefetch as ap
from agnostic_prefetch._accounts import TRACE_OFF
from agnostic_prefetch._testing import internals


def load(path):
    document = json.loads(path.read_text())
    events = document["traceEvents"]
    for e in events:  # the trace-event format: every event has these
        assert {"name", "ph", "pid", "tid"} <= set(e)
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0
    return document, events


def totals(events):
    out = collections.defaultdict(float)
    for e in events:
        if e["ph"] == "X":
            out[e["name"]] += e["dur"] / 1e6
    return out


def tracks(events):
    return {e["args"]["name"] for e in events if e["name"] == "thread_name"}


def test_a_trace_of_the_demo_has_the_tracks_and_its_totals_agree_with_stats(tmp_path):
    pytest.importorskip("jax")
    from agnostic_prefetch import _demo

    db = str(tmp_path / "photos_lmdb")
    _demo.build_database(str(tmp_path), db, 96)
    path = tmp_path / "demo.json"
    report = _demo.train(db, steps=150, batch_size=16, workers=2, trace_path=str(path))
    _, events = load(path)
    names = tracks(events)
    assert sum(n.startswith("loader worker ") for n in names) == 2
    assert "trainer: MainThread" in names and "agnostic_prefetch-device" in names
    spans = totals(events)
    loader, stage = report["traced_stats"]["loader"], report["traced_stats"]["prefetch"]
    for span, stat in [("read", "read_s"), ("transform", "transform_s"), ("write", "write_s")]:
        assert spans[span] == pytest.approx(loader[stat], rel=0.10), span
    assert spans["fill"] == pytest.approx(loader["fill_s"], rel=0.10)
    assert spans["next (prefetch_to_device)"] == pytest.approx(stage["wait_s"], rel=0.10, abs=2e-3)
    assert spans["pull"] == pytest.approx(stage["pull_s"], rel=0.10, abs=2e-3)
    assert spans["place"] == pytest.approx(stage["place_s"], rel=0.10, abs=2e-3)
    assert spans["next"] == pytest.approx(loader["wait_s"], rel=0.10, abs=2e-3)  # the loader's caller


def test_a_trace_reaches_workers_that_were_already_running(tmp_path):
    path = tmp_path / "t.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=2, epochs=None) as loader:
        it = iter(loader)
        for _ in range(5):
            next(it)
        with ap.trace(path):
            for _ in range(10):
                next(it)
        for _ in range(5):
            next(it)  # after the trace: nothing more recorded
    _, events = load(path)
    fills = [e for e in events if e["name"] == "fill"]
    assert len({e["pid"] for e in fills}) == 2 and 5 <= len(fills) <= 14
    assert [e for e in events if e["name"] == "read"]
    assert len([e for e in events if e["name"] == "next"]) == 10


def test_timestamps_share_one_clock_across_processes(tmp_path):
    path = tmp_path / "t.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1) as loader, ap.trace(path):
        for _ in loader:
            pass
    _, events = load(path)
    waits = [e for e in events if e["name"] == "wait for workers"]
    fills = [e for e in events if e["name"] == "fill"]
    # some fill ends inside a wait for workers: the worker's clock is the caller's
    assert any(w["ts"] <= f["ts"] + f["dur"] <= w["ts"] + w["dur"] + 1000 for f in fills for w in waits)


def test_its_size_is_bounded_and_item_spans_are_dropped_first(tmp_path):
    path = tmp_path / "t.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1, epochs=None) as loader, ap.trace(path, max_events=120):
        it = iter(loader)
        for _ in range(40):
            next(it)
    document, events = load(path)
    spans = [e for e in events if e["ph"] == "X"]
    kinds = collections.Counter(e["name"] for e in spans)
    assert len(spans) <= 120
    assert kinds["read"] * 3 <= 90  # the item spans' share: three quarters
    assert kinds["fill"] > 10  # batch spans kept after the item spans stopped
    assert document["otherData"]["dropped_item_spans"] > 0 or document["otherData"]["dropped_events"] > 0


def test_trace_on_the_loader_records_until_close(tmp_path):
    path = tmp_path / "loader.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1, backend="thread", trace=path) as loader:
        for _ in loader:
            pass
        assert not path.exists()
    _, events = load(path)
    assert "loader worker thread 0" in tracks(events)
    assert len([e for e in events if e["name"] == "next"]) == 50


def test_trace_on_a_prefetcher_records_its_thread_until_close(tmp_path):
    pytest.importorskip("jax")
    path = tmp_path / "stage.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1) as loader:
        with ap.prefetch_to_device(loader, size=2, trace=path) as it:
            for _ in it:
                pass
    _, events = load(path)
    assert "agnostic_prefetch-device" in tracks(events)
    kinds = collections.Counter(e["name"] for e in events)
    assert kinds["pull"] == kinds["place"] == 50 and kinds["next (prefetch_to_device)"] == 50
    assert kinds["fill"] == 0  # only the stage: the loader was not asked to trace


def test_workers_stop_sending_spans_when_the_trace_ends(tmp_path):
    with ap.Loader(Waiting(400, 0.001), 8, workers=1, epochs=None) as loader:
        it = iter(loader)
        with ap.trace(tmp_path / "t.json"):
            next(it)
        assert internals(loader).trace_level == TRACE_OFF


def test_a_trace_block_over_a_loaders_own_trace_leaves_it_recording(tmp_path):
    own, block = tmp_path / "own.json", tmp_path / "block.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1, epochs=None, trace=own) as loader:
        it = iter(loader)
        next(it)
        with ap.trace(block):
            next(it), next(it)
        assert internals(loader).trace_level != TRACE_OFF  # its own trace still asks for spans
        next(it)
    nexts = [e for e in load(own)[1] if e["name"] == "next"]
    assert len(nexts) == 4  # before, during and after the block
    assert len([e for e in load(block)[1] if e["name"] == "next"]) == 2
    assert len([e for e in load(own)[1] if e["name"] == "fill"]) >= 3  # the worker's spans too


def test_nested_trace_blocks_each_record_until_their_own_end(tmp_path):
    outer, inner = tmp_path / "outer.json", tmp_path / "inner.json"
    with ap.Loader(Waiting(400, 0.001), 8, workers=1, epochs=None) as loader:
        it = iter(loader)
        with ap.trace(outer):
            next(it)
            with ap.trace(inner):
                next(it)
            next(it), next(it)
            assert internals(loader).trace_level != TRACE_OFF
        assert internals(loader).trace_level == TRACE_OFF
        next(it)
    assert len([e for e in load(outer)[1] if e["name"] == "next"]) == 4
    assert len([e for e in load(inner)[1] if e["name"] == "next"]) == 1


def test_a_trace_path_in_a_missing_directory_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ap.Loader(Waiting(8), 2, workers=1, trace=tmp_path / "missing" / "t.json")
