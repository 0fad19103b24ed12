"""cupy_prefetch: allocate on the consumer's stream, copy on a side stream, the consumer waits.

The placement runs here against a fake ``cupy`` (``fake_cuda.py``) whose current device
and stream are per thread; the tests marked ``gpu`` run it for real where there is a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import numpy as np
import pytest
from fake_cuda import (
    FakeCupy,
    assert_close_synchronizes_then_unregisters,
    host_syncs,
    index_of,
    of,
    ring_address_and_length,
)
from sources_for_tests import NamedRows, rows_loader

import agnostic_prefetch as ap
from agnostic_prefetch._testing import internals
from agnostic_prefetch.adapters import _cupy_stage, cupy_prefetch
from agnostic_prefetch.adapters._cupy_stage import _CupyPlacement
from agnostic_prefetch.adapters._pinned import mapping_of

BOTH = pytest.mark.parametrize("thread", [False, True], ids=["inline", "thread"])
STAGE = "agnostic_prefetch-device"


def have_cupy_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


GPU = pytest.mark.skipif(not have_cupy_gpu(), reason="needs CuPy and a CUDA GPU (neither is on this machine)")


@pytest.fixture
def fake_cupy() -> FakeCupy:
    return FakeCupy()


def test_the_placement_makes_a_non_blocking_stream_on_its_device_and_captures_the_consumers(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    assert placement.stream.device == 1 and placement.stream.non_blocking is True
    assert placement.consumer is fake_cupy.cuda.consumer[1]
    assert fake_cupy.cuda.current_device == 0
    given = fake_cupy.cuda.Stream()
    assert _CupyPlacement(fake_cupy, 0, stream=given).consumer is given


def test_put_allocates_on_the_consumer_stream_and_copies_with_set_on_the_side_stream(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with rows_loader() as loader:
        batch = next(iter(loader))
        ring_start, ring_bytes = ring_address_and_length(mapping_of(batch["x"]))
        host = {"x": batch["x"], "first": batch["x"][0], "name": "a.jpg", "id": None}
        device, _ = placement.put(host)
        log = fake_cupy.log
        consumer = fake_cupy.cuda.consumer[1]
        for _, _, _, current_stream, current_device, _ in of(log, "empty"):
            # CuPy's pool has an arena per stream: allocate where the batch is used and freed.
            assert current_stream is consumer and current_device == 1
        [(_, recorded_on, consumer_ready, _), _] = of(log, "record")
        assert recorded_on is consumer
        assert of(log, "wait_event")[0][:3] == ("wait_event", placement.stream, consumer_ready)
        assert max(index_of(log, "empty")) < index_of(log, "wait_event")[0] < min(index_of(log, "set"))
        sets = of(log, "set")
        assert len(sets) == 2
        for (_, address, contiguous, stream, current_stream, current_device, _), leaf in zip(
                sets, [batch["x"], batch["x"][0]], strict=True):
            assert stream is placement.stream and current_stream is placement.stream
            assert current_device == 1
            assert contiguous and address == leaf.ctypes.data  # straight from the ring
        assert of(log, "hostRegister") == [("hostRegister", ring_start, ring_bytes, 0)]
        np.testing.assert_array_equal(device["x"].values, batch["x"])
        np.testing.assert_array_equal(device["first"].values, batch["x"][0])
        assert device["x"].device == 1
        assert device["name"] is host["name"] and device["id"] is None  # passed through
        placement.close()
    assert fake_cupy.cuda.current_device == 0 and fake_cupy.cuda.current[1] is fake_cupy.cuda.consumer[1]


def test_put_in_another_thread_still_allocates_on_the_stream_captured_in_the_callers(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 0)  # captured here, in the caller's thread
    with rows_loader() as loader:
        x = next(iter(loader))["x"]
        stage = threading.Thread(target=placement.put, args=({"x": x},), name=STAGE)
        stage.start()
        stage.join()
        [(_, _, _, allocated_on, _, who)] = of(fake_cupy.log, "empty")
        assert who == STAGE and allocated_on is fake_cupy.cuda.consumer[0]
        placement.close()


def test_put_records_an_event_on_the_side_stream_after_the_copies_and_done_reads_it(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with rows_loader() as loader:
        batch = next(iter(loader))
        _, event = placement.put({"x": batch["x"], "y": batch["x"][1:]})
        log = fake_cupy.log
        [(_, consumer, _, _), (_, stream, recorded, _)] = of(log, "record")
        assert consumer is fake_cupy.cuda.consumer[1] and stream is placement.stream and recorded is event
        assert index_of(log, "record")[1] > max(index_of(log, "set"))
        assert placement.done(event) is False
        event.done = True
        assert placement.done(event) is True
        placement.close()


def test_hand_out_makes_the_consumer_stream_wait_in_the_callers_thread(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 1)
    with rows_loader() as loader:
        batch = next(iter(loader))
        device, event = placement.put({"x": batch["x"]})
        mark = len(fake_cupy.log)
        placement.hand_out(device, event)  # called with device 0 current
        after = fake_cupy.log[mark:]
        assert after == [("wait_event", fake_cupy.cuda.consumer[1], event, threading.current_thread().name)]
        placement.close()


def test_put_makes_non_contiguous_leaves_contiguous_before_the_copy(fake_cupy):
    placement = _CupyPlacement(fake_cupy, 0)
    with rows_loader() as loader:
        x = next(iter(loader))["x"]
        device, _ = placement.put({"strided": x[:, ::2], "transposed": x.T})
        assert all(contiguous for _, _, contiguous, *_ in of(fake_cupy.log, "set"))
        np.testing.assert_array_equal(device["strided"].values, x[:, ::2])
        np.testing.assert_array_equal(device["transposed"].values, x.T)
        assert device["transposed"].shape == (4, 2)
        placement.close()


def test_put_rejects_bfloat16_naming_it(fake_cupy):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    placement = _CupyPlacement(fake_cupy, 0)
    with pytest.raises(TypeError, match="bfloat16"):
        placement.put({"x": np.zeros((2, 2), ml_dtypes.bfloat16)})
    assert of(fake_cupy.log, "set") == []
    placement.close()


def test_close_synchronizes_the_side_stream_before_unregistering_the_ring(fake_cupy):
    assert_close_synchronizes_then_unregisters(_CupyPlacement(fake_cupy, 0), fake_cupy.log, "hostRegister")


def test_a_failed_registration_is_logged_once_and_copies_still_happen(fake_cupy, caplog):
    fake_cupy.cuda.runtime.fail_status = 217
    placement = _CupyPlacement(fake_cupy, 0)
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"), rows_loader() as loader:
        for batch in loader:
            device, event = placement.put({"x": batch["x"]})
            np.testing.assert_array_equal(device["x"].values, batch["x"])
            placement.hand_out(device, event)
        placement.close()
    assert len(of(fake_cupy.log, "hostRegister")) == 1
    assert of(fake_cupy.log, "hostUnregister") == []
    warnings = [m for m in caplog.messages if "cudaHostRegister" in m]
    assert len(warnings) == 1 and "cudaError 217" in warnings[0]


@BOTH
def test_on_fake_cuda_every_batch_is_waited_on_in_order_and_copied_after_the_consumer(fake_cupy, monkeypatch, thread):
    monkeypatch.setattr(_cupy_stage, "import_cupy", lambda: fake_cupy)
    me = threading.current_thread().name
    with ap.Loader(NamedRows(30), 3, workers=0) as loader, \
            cupy_prefetch(loader, 2, device=1, thread=thread) as it:
        received = []
        for _ in range(10):
            batch = next(it)
            received.append((batch["x"].values.copy(), batch["name"]))
            fake_cupy.cuda.finish_waited_copies()
        during = list(fake_cupy.log)
        with pytest.raises(StopIteration):
            next(it)
        closing = fake_cupy.log[len(during):]
        assert loader.stats()["copied_out"] == 0
    assert [names for _, names in received] == [[f"row{r}.jpg" for r in range(i, i + 3)] for i in range(0, 30, 3)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in received])[:, 0], np.arange(30.0))
    assert len(of(during, "hostRegister")) == 1 and host_syncs(during) == []
    consumer = fake_cupy.cuda.consumer[1]
    records = of(during, "record")
    copy_events = [event for _, stream, event, _ in records if stream is not consumer]
    consumer_events = [event for _, stream, event, _ in records if stream is consumer]
    consumer_waits = [(event, who) for _, stream, event, who in of(during, "wait_event") if stream is consumer]
    side_waits = [event for _, stream, event, _ in of(during, "wait_event") if stream is not consumer]
    assert consumer_waits == [(event, me) for event in copy_events] and len(copy_events) == 10
    assert side_waits == consumer_events and len(consumer_events) == 10  # each copy after the consumer
    assert all(who == (STAGE if thread else me) for *_, who in of(during, "set"))
    assert all(allocated_on is consumer for _, _, _, allocated_on, _, _ in of(during, "empty"))
    assert [entry[0] for entry in closing] == ["stream.synchronize", "hostUnregister"]


@pytest.mark.skipif(have_cupy_gpu(), reason="CuPy and a GPU are present: the error path does not apply")
def test_without_cupy_or_a_gpu_it_is_a_clear_error():
    with pytest.raises((ImportError, RuntimeError), match="GPU"):
        cupy_prefetch(iter([]))


def test_a_device_by_position_is_refused(fake_cupy, monkeypatch):
    monkeypatch.setattr(_cupy_stage, "import_cupy", lambda: fake_cupy)
    with pytest.raises(TypeError, match="positional"):
        cupy_prefetch(iter([{"x": np.zeros(2, np.float32)}]), 2, 1)


@pytest.mark.gpu
@GPU
@BOTH
def test_on_a_gpu_batches_arrive_intact_on_the_consumer_stream_and_resume_exactly(thread):
    import cupy

    source = ap.ArraySource({"x": np.arange(40000, dtype=np.float32).reshape(1000, 40)})
    consumer = cupy.cuda.Stream(non_blocking=True)
    with consumer, ap.Loader(source, 50, workers=2, shuffle=True, seed=3) as loader:
        it = cupy_prefetch(loader, 2, thread=thread)
        head = [cupy.asnumpy(next(it)["x"].sum(axis=1)) for _ in range(4)]
        it.load_state_dict(it.state_dict())
        rest = [cupy.asnumpy(b["x"].sum(axis=1)) for b in it]
        assert internals(it).placement.consumer is consumer
    with ap.Loader(source, 50, workers=0, shuffle=True, seed=3) as reference:
        want = [b["x"].sum(axis=1) for b in reference]
    for got, expected in zip(head + rest, want, strict=True):
        np.testing.assert_allclose(got, expected)
