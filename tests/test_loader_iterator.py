"""The loader iterator owns its position; a second iter() ends the first; waits wake, not poll."""

from __future__ import annotations

import gc
import statistics
import threading
import time
import warnings
import weakref

import pytest
from conftest import worker_pids
from sources_for_tests import Counting, SlowFrom
from waiting import eventually, inside, wait_until_waiting_in_loader

import agnostic_prefetch as ap
from agnostic_prefetch._iterator import LoaderIterator
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._testing import internals


def ids(batches):
    return [b["i"].tolist() for b in batches]


def blocked_in_next(it):
    """Start a thread that calls next(it) and records what came out; returns (thread, box)."""
    box: dict = {}

    def run():
        try:
            box["batch"] = next(it)
        except BaseException as exc:  # noqa: BLE001 - what the waiting thread saw
            box["error"] = exc
        box["left_at"] = time.perf_counter()

    waiter = threading.Thread(target=run)
    waiter.start()
    wait_until_waiting_in_loader(waiter)
    return waiter, box


def test_iter_returns_an_iterator_with_its_own_position():
    with ap.Loader(Counting(10), 2, workers=0) as loader:
        it = iter(loader)
        assert isinstance(it, LoaderIterator) and iter(it) is it
        assert len(it) == 5
        next(it), next(it)
        assert it.state_dict()["batch"] == 2 and len(it) == 3
        assert loader.state_dict() == it.state_dict()  # the latest iterator's position


def test_a_second_iter_ends_the_first_and_continues_where_it_stopped():
    with ap.Loader(Counting(12), 2, workers=2) as loader:
        first = iter(loader)
        assert ids([next(first), next(first)]) == [[0, 1], [2, 3]]
        second = iter(loader)
        with pytest.raises(StopIteration):
            next(first)
        assert first.state_dict()["batch"] == 2  # an ended iterator keeps its own position
        assert ids(second) == [[4, 5], [6, 7], [8, 9], [10, 11]]
        third = iter(loader)  # after a finished iteration: the next epoch
        assert ids([next(third)]) == [[0, 1]] and third.state_dict()["epoch"] == 1


def test_load_state_dict_ends_a_live_iterator_and_the_next_iter_starts_from_the_state():
    with ap.Loader(Counting(20), 2, workers=2, shuffle=True, seed=1) as loader:
        it = iter(loader)
        head = ids([next(it) for _ in range(3)])
        state = it.state_dict()
        ids([next(it) for _ in range(2)])
        loader.load_state_dict(state)
        with pytest.raises(StopIteration):
            next(it)
        assert loader.state_dict() == state and len(loader) == 7
        rest = ids(loader)
    with ap.Loader(Counting(20), 2, workers=0, shuffle=True, seed=1) as reference:
        assert head + rest == ids(reference)


def test_an_iterator_taken_over_while_it_waits_wakes_at_once_and_loses_no_batch():
    source = Counting(16, slow=set(range(4, 16)), delay=0.4)
    with ap.Loader(source, 2, workers=2, epochs=None) as loader:
        first = iter(loader)
        assert ids([next(first), next(first)]) == [[0, 1], [2, 3]]
        waiter, box = blocked_in_next(first)
        started = time.perf_counter()
        second = iter(loader)  # from this thread, while the first waits in another
        waiter.join(2)
        assert isinstance(box.get("error"), StopIteration), box
        assert box["left_at"] - started < 0.1
        assert ids([next(second)]) == [[4, 5]]  # the batch the first waited for is not lost


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_cancel_wakes_a_waiting_next_at_once_which_then_ends(backend):
    latencies = []
    for _ in range(3):
        with ap.Loader(SlowFrom(8, first=2, delay=3), 2, workers=1, backend=backend) as loader:
            it = iter(loader)
            next(it)
            waiter, box = blocked_in_next(it)
            cancelled_at = time.perf_counter()
            it.cancel()
            waiter.join(2)
            assert not waiter.is_alive() and isinstance(box.get("error"), StopIteration)
            latencies.append(box["left_at"] - cancelled_at)
            assert it.state_dict()["batch"] == 1  # nothing taken after the cancel
    assert statistics.median(latencies) < 0.02, latencies


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_close_from_another_thread_wakes_the_waiter_and_releases_only_after_it_left(backend, monkeypatch):
    released_while_inside = []
    real_close = Ring.close

    def close(ring):
        released_while_inside.append(inside(waiter, "_iterator.py", "_next_batch"))
        real_close(ring)

    monkeypatch.setattr(Ring, "close", close)
    loader = ap.Loader(SlowFrom(40, first=8, delay=3), 4, workers=2, backend=backend)
    it = iter(loader)
    next(it), next(it)
    waiter, box = blocked_in_next(it)
    closed_at = time.perf_counter()
    loader.close()
    waiter.join(2)
    assert not waiter.is_alive()
    assert isinstance(box.get("error"), ap.LoaderError) and "closed" in str(box["error"])
    assert box["left_at"] - closed_at < 0.5
    assert released_while_inside == [False]  # released once, after the waiter left
    assert internals(loader).ring.map.closed


def test_close_while_the_iterating_thread_fills_a_batch_itself_warns_and_releases_when_it_leaves():
    gate = threading.Event()

    class Gated(Counting):
        def __getitem__(self, i):
            if i == 4:
                gate.wait(10)
            return super().__getitem__(i)

    loader = ap.Loader(Gated(10), 2, workers=0)
    it = iter(loader)
    next(it), next(it)
    waiter, box = blocked_in_next(it)  # fills batch 2 itself: record 4 blocks
    with pytest.warns(RuntimeWarning, match=r"thread 'Thread-\d+.*' is still inside the loader.*workers=0"):
        loader.close()
    assert loader.closed and waiter.is_alive()
    gate.set()
    waiter.join(5)
    assert isinstance(box.get("error"), ap.LoaderError)
    del box
    assert internals(loader).ring.fd == -1  # released by the thread as it left


def test_an_iterator_of_an_endless_loader_has_no_length():
    with ap.Loader(Counting(4), 2, workers=0, epochs=None) as loader:
        with pytest.raises(TypeError, match="never ends"):
            len(iter(loader))


def test_the_iterator_keeps_its_loader_alive_and_the_last_of_them_to_go_stops_the_workers():
    it = iter(ap.Loader(Counting(6), 2, workers=1))  # the Loader itself is dropped at once
    assert ids(it) == [[0, 1], [2, 3], [4, 5]]
    assert worker_pids()
    gc.disable()  # no cycle keeps them: the last reference going stops the workers at once
    try:
        del it
        assert not worker_pids()
    finally:
        gc.enable()


def test_a_dropped_loader_stops_its_workers_without_the_cycle_collector():
    loader = ap.Loader(Counting(8), 2, workers=1)
    for _ in loader:
        pass
    gc.disable()
    try:
        ref = weakref.ref(loader)
        del loader
        assert ref() is None and not worker_pids()
    finally:
        gc.enable()


def test_an_iterator_reports_how_many_batches_its_consumer_may_hold():
    with ap.Loader(Counting(6), 2, workers=2, slots=5) as loader:
        it = iter(loader)
        assert (it.slots, it.max_held, it.interruptible) == (5, 3, True)
    with ap.Loader(Counting(6), 2, workers=0) as loader:
        assert iter(loader).interruptible is False


def test_the_look_ahead_into_the_next_epoch_is_kept_by_the_next_iteration():
    reads: list[int] = []

    class CountsReads(Counting):
        def __getitem__(self, i):
            if threading.current_thread().name.startswith("agnostic_prefetch-worker"):
                reads.append(i)
            return super().__getitem__(i)

    with ap.Loader(CountsReads(8), 2, workers=1, backend="thread", slots=8) as loader:
        list(loader)
        assert eventually(lambda: reads.count(0) == 2)  # epoch 1's first batch, read ahead
        it = iter(loader)
        assert ids([next(it)]) == [[0, 1]]
        assert reads.count(0) == 2  # kept for the new iteration, not read again


def test_a_driver_that_leaves_as_close_gives_up_waiting_still_releases_everything():
    # close() waits a moment for a workers=0 fill, then hands the release to the filling
    # thread. The thread finishing just then (here: while close() warns) must not strand it.
    gate = threading.Event()

    class Gated(Counting):
        def __getitem__(self, i):
            if i == 4:
                gate.wait(10)
            return super().__getitem__(i)

    loader = ap.Loader(Gated(10), 2, workers=0)
    it = iter(loader)
    next(it), next(it)
    waiter, box = blocked_in_next(it)  # fills batch 2 itself: record 4 blocks

    def leave_now(message, *args):  # runs inside close(), once it gave up waiting
        gate.set()
        waiter.join(5)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = leave_now
        loader.close()
    assert not waiter.is_alive() and isinstance(box.get("error"), ap.LoaderError)
    del box
    assert internals(loader).ring.fd == -1  # released: by close() or by the thread as it left
