"""The loader iterator owns its position; a second iter() ends the first; waits wake, not poll."""

from __future__ import annotations

import statistics
import threading
import time

import pytest
from sources_for_tests import Counting, SlowFrom

import agnostic_prefetch as ap
from agnostic_prefetch._iterator import LoaderIterator


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
    time.sleep(0.1)  # it now waits inside the loader
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
    from agnostic_prefetch import _schedule

    inside = threading.Event()
    order = []
    real_next_batch = LoaderIterator._next_batch
    real_release = _schedule.Scheduler._release

    def next_batch(self, scheduler):
        inside.set()
        try:
            return real_next_batch(self, scheduler)
        finally:
            order.append("waiter left")

    def release(self, grace):
        order.append("released")
        return real_release(self, grace)

    monkeypatch.setattr(LoaderIterator, "_next_batch", next_batch)
    monkeypatch.setattr(_schedule.Scheduler, "_release", release)
    loader = ap.Loader(SlowFrom(40, first=8, delay=3), 4, workers=2, backend=backend)
    it = iter(loader)
    next(it), next(it)
    waiter, box = blocked_in_next(it)
    assert inside.wait(2)
    closed_at = time.perf_counter()
    loader.close()
    waiter.join(2)
    assert not waiter.is_alive()
    assert isinstance(box.get("error"), ap.LoaderError) and "closed" in str(box["error"])
    assert box["left_at"] - closed_at < 0.5
    assert order[-2:] == ["waiter left", "released"]
    assert loader._ring.map.closed


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
    assert loader._ring.fd == -1  # released by the thread as it left


def test_an_iterator_of_an_endless_loader_has_no_length():
    with ap.Loader(Counting(4), 2, workers=0, epochs=None) as loader:
        with pytest.raises(TypeError, match="never ends"):
            len(iter(loader))


def test_the_iterator_keeps_its_loader_alive():
    it = iter(ap.Loader(Counting(6), 2, workers=1))
    assert ids(it) == [[0, 1], [2, 3], [4, 5]]
    it._loader.close()


def test_an_iterator_reports_how_many_batches_its_consumer_may_hold():
    with ap.Loader(Counting(6), 2, workers=2, slots=5) as loader:
        it = iter(loader)
        assert (it.slots, it.max_held, it.interruptible) == (5, 3, True)
    with ap.Loader(Counting(6), 2, workers=0) as loader:
        assert iter(loader).interruptible is False


def test_the_look_ahead_into_the_next_epoch_is_kept_by_the_next_iteration():
    with ap.Loader(Counting(8), 2, workers=1, slots=8) as loader:
        list(loader)
        scheduler = loader._scheduler

        def live_orders_for(seq):
            return [oid for oid, o in scheduler._orders.items() if o.seq == seq and not o.stale]

        ahead = live_orders_for(4)  # epoch 1's first batch, ordered during epoch 0
        assert ahead
        it = iter(loader)
        assert live_orders_for(4) == ahead  # kept for the new iteration, not ordered again
        assert ids([next(it)]) == [[0, 1]]
