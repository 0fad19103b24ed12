"""torch_prefetch: zero-copy CPU tensors; on CUDA a side-stream copy from the page-locked ring.

The CUDA placement runs here against fakes of ``torch.cuda`` (``fake_cuda.py``) that log
every call with its thread; the tests marked ``gpu`` run it for real where there is a GPU.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from fake_cuda import (
    FakeDevice,
    FakeStream,
    FakeTensor,
    FakeTorch,
    assert_close_synchronizes_then_unregisters,
    host_syncs,
    index_of,
    of,
    ring_address_and_length,
)
from sources_for_tests import NamedRows, rows_loader

torch = pytest.importorskip("torch")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch._testing import internals  # noqa: E402
from agnostic_prefetch.adapters import _torch_stage, torch_prefetch  # noqa: E402
from agnostic_prefetch.adapters._pinned import mapping_of  # noqa: E402
from agnostic_prefetch.adapters._torch_stage import _CudaPlacement  # noqa: E402

BOTH = pytest.mark.parametrize("thread", [False, True], ids=["inline", "thread"])
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
CUDA1 = FakeDevice("cuda", 1)
STAGE = "agnostic_prefetch-device"


# ---- CPU ----------------------------------------------------------------------------------


@BOTH
def test_on_cpu_it_yields_zero_copy_tensors_of_the_loader_ring(thread):
    source = ap.ArraySource({"x": np.arange(80, dtype=np.float32).reshape(20, 4)})
    with ap.Loader(source, 5, workers=0, slots=8) as loader:
        seen = []
        for batch in torch_prefetch(loader, 2, device="cpu", thread=thread):
            assert isinstance(batch["x"], torch.Tensor)
            ring = internals(loader).ring
            assert ring.address <= batch["x"].data_ptr() < ring.address + ring.nbytes
            seen.append(batch["x"].clone())
        assert len(seen) == 4
    np.testing.assert_array_equal(torch.cat(seen).numpy(), source[slice(0, 20)]["x"])


@BOTH
def test_with_and_without_its_thread_it_gives_the_same_batches_and_resumes_exactly(thread):
    source = ap.ArraySource({"x": np.arange(48.0)})

    def loader():
        return ap.Loader(source, 4, workers=2, shuffle=True, seed=1)

    with loader() as reference:
        full = [b["x"].tolist() for b in reference]
    with loader() as first:
        it = torch_prefetch(first, 3, thread=thread)
        head = [next(it)["x"].tolist() for _ in range(4)]
        state = it.state_dict()
        it.close()
    with loader() as second:
        second.load_state_dict(state)
        rest = [b["x"].tolist() for b in torch_prefetch(second, thread=thread)]
    assert head + rest == full
    assert head == full[:4]


def test_inline_it_reads_exactly_size_batches_ahead():
    with rows_loader(rows=24, batch_size=2, slots=8) as loader:
        it = torch_prefetch(loader, 3, thread=False)
        next(it), next(it)
        assert loader.state_dict()["batch"] - it.state_dict()["batch"] == 3
        it.close()


def test_a_device_by_position_is_refused():
    with pytest.raises(TypeError, match="positional"):
        torch_prefetch(iter([{"x": np.zeros(2)}]), 2, "cpu")


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="cpu and cuda"):
        torch_prefetch(iter([]), device="meta")


# ---- CUDA, on fakes -----------------------------------------------------------------------


@pytest.fixture
def fake_torch(monkeypatch) -> FakeTorch:
    fake = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)  # what `import torch` in the stage finds
    monkeypatch.setattr(_torch_stage, "to_torch", fake.cpu_view)
    return fake


def spy_on_ensure(placement, log: list[tuple], monkeypatch) -> None:
    real = placement.pinned.ensure

    def ensure(a):
        log.append(("ensure", a.ctypes.data))
        return real(a)

    monkeypatch.setattr(placement.pinned, "ensure", ensure)


def test_the_cuda_placement_defaults_to_the_current_device_and_makes_a_side_stream_there(fake_torch):
    fake_torch.cuda.current_index = 1
    placement = _CudaPlacement(fake_torch.device("cuda"))
    assert placement.device == CUDA1
    assert placement.stream.device == CUDA1
    assert placement.stream is not fake_torch.cuda.consumer[1]


def test_put_copies_every_array_leaf_non_blocking_with_the_side_stream_current(fake_torch, monkeypatch):
    placement = _CudaPlacement(CUDA1)
    spy_on_ensure(placement, fake_torch.log, monkeypatch)
    with rows_loader() as loader:
        batch = next(iter(loader))
        ring_start, ring_bytes = ring_address_and_length(mapping_of(batch["x"]))
        pageable = np.arange(6, dtype=np.int32)
        host = {"x": batch["x"], "meta": ["a.jpg", batch["x"][:, 0], pageable], "label": "cat", "id": None}
        device, _ = placement.put(host)

        log = fake_torch.log
        copies = of(log, "copy")
        assert len(copies) == 3  # the array leaves, not the strings
        for _, to, non_blocking, current_stream, current_device, _ in copies:
            assert to == CUDA1 and non_blocking is True
            assert current_stream is placement.stream and current_device == 1
        # each numpy leaf is page-locked (ensure) before its copy; the ring once, whole
        ensures, copy_at = index_of(log, "ensure"), index_of(log, "copy")
        assert len(ensures) == 3 and all(e < c for e, c in zip(ensures, copy_at, strict=True))
        assert of(log, "cudaHostRegister") == [("cudaHostRegister", ring_start, ring_bytes, 0)]

        # non-array leaves pass through untouched (the very same objects)
        assert device["label"] is host["label"] and device["meta"][0] is host["meta"][0]
        assert device["id"] is None
        leaves = [device["x"], device["meta"][1], device["meta"][2]]
        for leaf, original in zip(leaves, [batch["x"], batch["x"][:, 0], pageable], strict=True):
            assert isinstance(leaf, FakeTensor) and leaf.device == CUDA1
            np.testing.assert_array_equal(leaf.values, original)
        placement.close()
    assert fake_torch.cuda.current_index == 0 and fake_torch.cuda.current[1] is fake_torch.cuda.consumer[1]


def test_put_records_timing_events_on_the_side_stream_around_the_copies_and_done_is_the_last_ones_query(fake_torch):
    placement = _CudaPlacement(CUDA1)
    with rows_loader() as loader:
        batch = next(iter(loader))
        _, token = placement.put({"x": batch["x"], "y": batch["x"][1:]})
        log = fake_torch.log
        [(_, started, first_stream, _), (_, event, stream, _)] = of(log, "record")
        assert stream is placement.stream and first_stream is placement.stream
        assert started.enable_timing and event.enable_timing
        assert index_of(log, "record")[0] < min(index_of(log, "copy"))
        assert index_of(log, "record")[1] > max(index_of(log, "copy"))
        assert placement.done(token) is False
        event.completed = True
        assert placement.done(token) is True
        assert placement.transfer_time(token) == pytest.approx(1e-3)  # the fake's 1 ms
        assert host_syncs(log) == []
        placement.close()


@pytest.mark.parametrize("given", [False, True], ids=["current stream", "stream="])
def test_hand_out_makes_the_consumer_stream_wait_and_records_each_tensor_on_it(fake_torch, given):
    training = FakeStream(fake_torch.log, "training", CUDA1)
    placement = _CudaPlacement(CUDA1, stream=training if given else None)
    if not given:
        fake_torch.cuda.current[1] = training  # the caller's current stream on that device
    with rows_loader() as loader:
        batch = next(iter(loader))
        device, token = placement.put({"x": batch["x"], "y": [batch["x"][0]], "name": "a.jpg"})
        [_, (_, event, _, _)] = of(fake_torch.log, "record")  # the timing start, then the end
        mark = len(fake_torch.log)
        placement.hand_out(device, token)
        after = fake_torch.log[mark:]
        me = threading.current_thread().name
        assert of(after, "wait_event") == [("wait_event", training, event, me)]
        recorded = of(after, "record_stream")
        assert len(recorded) == 2
        assert {id(tensor) for _, tensor, _, _ in recorded} == {id(device["x"]), id(device["y"][0])}
        assert all(stream is training for _, _, stream, _ in recorded)
        assert host_syncs(after) == []  # the host never waits for a copy
        placement.close()


def test_close_synchronizes_the_side_stream_before_unregistering_the_ring(fake_torch):
    assert_close_synchronizes_then_unregisters(_CudaPlacement(CUDA1), fake_torch.log, "cudaHostRegister")


@BOTH
def test_on_fake_cuda_it_copies_in_the_stage_and_the_callers_stream_waits_in_next(fake_torch, thread):
    me = threading.current_thread().name
    with ap.Loader(NamedRows(30), 3, workers=0) as loader, \
            torch_prefetch(loader, 2, device="cuda:1", thread=thread) as it:
        received = []
        for _ in range(10):  # more batches than the 5 slots the caller may hold
            batch = next(it)
            received.append((np.array(batch["x"].values, copy=True), batch["name"]))
            fake_torch.cuda.finish_waited_copies()  # the GPU catches up with what was waited on
        during = list(fake_torch.log)
        with pytest.raises(StopIteration):  # the end of the data closes the stager
            next(it)
        closing = fake_torch.log[len(during):]
        it.close()
        assert len(fake_torch.log) == len(during) + len(closing)  # a second close does nothing
        assert loader.stats()["copied_out"] == 0
    for i, (x, names) in enumerate(received):
        rows = range(3 * i, 3 * i + 3)
        np.testing.assert_array_equal(x, np.array([np.full(3, r, np.float32) for r in rows]))
        assert names == [f"row{r}.jpg" for r in rows]
    assert len(of(during, "cudaHostRegister")) == 1 and host_syncs(during) == []
    stage = STAGE if thread else me
    copies = of(during, "copy")
    assert copies and all(current.name == "side" and who == stage for *_, current, _, who in copies)
    # each batch's own event is waited on by the consumer's stream, in the caller's thread, in order
    recorded_events = [event for _, event, _, _ in of(during, "record")][1::2]  # each copy's end
    waits = of(during, "wait_event")
    assert [event for _, _, event, _ in waits] == recorded_events and len(recorded_events) == 10
    assert all(stream is fake_torch.cuda.consumer[1] and who == me for _, stream, _, who in waits)
    assert [entry[0] for entry in closing] == ["stream.synchronize", "cudaHostUnregister"]


def test_cuda_without_cuda_is_a_clear_error(fake_torch):
    fake_torch.cuda.available = False
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        torch_prefetch(iter([]), device="cuda")


# ---- CUDA, for real --------------------------------------------------------------------------


@pytest.mark.gpu
@CUDA
@BOTH
def test_on_a_gpu_every_batch_arrives_intact_on_the_consumer_stream(thread):
    source = ap.ArraySource({"x": np.arange(40000, dtype=np.float32).reshape(1000, 40)})
    consumer = torch.cuda.Stream()
    with torch.cuda.stream(consumer), ap.Loader(source, 50, workers=2) as loader:
        total = torch.zeros((), device="cuda", dtype=torch.float64)
        for batch in torch_prefetch(loader, 2, device="cuda", thread=thread):
            assert batch["x"].is_cuda
            total += batch["x"].double().sum()  # queued on the consumer stream after the wait
            torch.cuda._sleep(1000)  # a kernel that keeps the stream busy: copies must not race it
        assert loader.stats()["copied_out"] == 0
    assert total.item() == float(source[slice(0, 1000)]["x"].astype(np.float64).sum())


@pytest.mark.gpu
@CUDA
def test_on_a_gpu_the_ring_is_page_locked_and_resume_is_exact():
    source = ap.ArraySource({"x": np.arange(4000, dtype=np.float32).reshape(1000, 4)})
    with ap.Loader(source, 50, workers=2, shuffle=True, seed=2) as loader:
        it = torch_prefetch(loader, 2, device="cuda")
        head = [next(it)["x"].cpu() for _ in range(5)]
        pinned = internals(it).placement.pinned
        assert pinned.registered == 1 and not pinned.failed  # the driver took the memfd ring
        state = it.state_dict()
        it.load_state_dict(state)
        rest = [b["x"].cpu() for b in it]
    with ap.Loader(source, 50, workers=0, shuffle=True, seed=2) as reference:
        want = [torch.from_numpy(b["x"].copy()) for b in reference]
    assert all(torch.equal(a, b) for a, b in zip(head + rest, want, strict=True))
