"""The prefetch stage, with a fake placement: read-ahead, held host batches, position, resume, close.

Every framework's stager is this stage plus a placement, so what is specified here holds for
``prefetch_to_device``, ``torch_prefetch`` and ``cupy_prefetch`` alike.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import warnings
import weakref

import numpy as np
import pytest
from sources_for_tests import Counting, OnHost, lease_holder, rows_loader
from waiting import eventually, inside, wait_until_waiting_in_loader

import agnostic_prefetch as ap
from agnostic_prefetch._channel import Channel
from agnostic_prefetch._testing import internals
from agnostic_prefetch.adapters._pinned import mapping_of
from agnostic_prefetch.prefetch import Prefetcher

BOTH = pytest.mark.parametrize("thread", [False, True], ids=["inline", "thread"])


def stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "agnostic_prefetch-device"]


class FakePlacement:
    """Copies a host batch at ``put``; that copy is done once the test adds it to ``finished``.

    Holds no reference to a host batch (only weak ones), so whatever keeps a host batch alive
    is the stage's doing.
    """

    def __init__(self, finished: bool = False) -> None:
        self.all_finished = finished
        self.finished: set[int] = set()  # numbers of the batches whose copy is done
        self.hosts: list[weakref.ref] = []  # lease_holder of each host batch, by number
        self.put_in: list[str] = []  # the thread of each put
        self.handed_out: list[tuple[int, str]] = []
        self.closes = 0
        self.alive_at_close: set[int] | None = None

    def put(self, host):
        n = len(self.hosts)
        self.hosts.append(weakref.ref(lease_holder(host["x"])))
        self.put_in.append(threading.current_thread().name)
        return {"x": host["x"].copy(), "n": n}, n

    def hand_out(self, device, token) -> None:
        assert device["n"] == token
        self.handed_out.append((token, threading.current_thread().name))

    def done(self, n) -> bool:
        return self.all_finished or n in self.finished

    def close(self) -> None:
        self.closes += 1
        self.alive_at_close = self.alive()

    def alive(self) -> set[int]:
        gc.collect()
        return {n for n, ref in enumerate(self.hosts) if ref() is not None}


def host_batches(n: int, counter: list[int] | None = None):
    for i in range(n):
        if counter is not None:
            counter.append(i)
        yield {"x": np.full((2, 3), i, np.float32)}  # no local name: the generator keeps none


# ---- what it yields, and how far ahead it reads ------------------------------------------


@BOTH
def test_thread_and_inline_give_the_same_batches_in_order(thread):
    with rows_loader(rows=30, batch_size=4, shuffle=True, seed=2) as loader:
        want = [b["x"].tolist() for b in loader]
    with rows_loader(rows=30, batch_size=4, shuffle=True, seed=2) as loader:
        got = [b["x"].tolist() for b in Prefetcher(loader, 2, FakePlacement(True), thread=thread)]
    assert got == want


@BOTH
def test_hand_out_runs_in_the_callers_thread_once_per_batch_in_order(thread):
    placement = FakePlacement(True)
    me = threading.current_thread().name
    with Prefetcher(host_batches(7), 3, placement, thread=thread) as it:
        received = [device["n"] for device in it]
    assert received == list(range(7))
    assert placement.handed_out == [(n, me) for n in range(7)]
    assert set(placement.put_in) == ({"agnostic_prefetch-device"} if thread else {me})


@pytest.mark.parametrize("size", [1, 2, 3])
def test_inline_reads_exactly_size_batches_ahead_of_the_caller(size):
    pulled: list[int] = []
    placement = FakePlacement(True)
    with Prefetcher(host_batches(8, pulled), size, placement, thread=False) as it:
        assert len(pulled) == size  # filled on creation: the first copies start at once
        for received in range(1, 9):
            next(it)
            assert len(pulled) == min(received + size, 8)
            assert len(placement.hosts) == len(pulled)  # each pulled batch is put at once
        with pytest.raises(StopIteration):
            next(it)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_thread_never_pulls_more_than_size_plus_one_ahead_of_the_caller(size):
    pulled: list[int] = []
    received = 0
    for _ in Prefetcher(host_batches(12, pulled), size, FakePlacement(True)):
        received += 1
        time.sleep(0.001)
        assert 0 <= len(pulled) - received <= size + 1
    assert received == 12


def test_a_plain_iterable_works_and_has_no_position():
    it = Prefetcher(range(3), 2, OnHost())
    assert list(it) == [0, 1, 2] and it.state_dict() is None


def test_size_below_one_is_an_error():
    with pytest.raises(ValueError, match="size must be >= 1"):
        Prefetcher(host_batches(1), 0, FakePlacement())


# ---- which host batches it keeps (their ring slots) ---------------------------------------


def test_a_host_batch_keeps_its_ring_slot_until_its_copy_is_done():
    placement = FakePlacement()
    with rows_loader() as loader, Prefetcher(loader, 1, placement, thread=False) as it:
        first = next(it)
        slot = placement.hosts[0]()
        assert slot is not None and slot.dtype == np.uint8 and mapping_of(slot) is internals(loader).ring.map
        del first, slot  # the caller is done with the device batch; the copy is not
        next(it)
        next(it)
        assert 0 in placement.alive()
        placement.finished.add(0)
        next(it)  # retired batches are checked on the next pull
        assert 0 not in placement.alive()


def test_the_thread_lets_a_host_batch_go_once_its_copy_is_done():
    placement = FakePlacement()
    with rows_loader(rows=40) as loader, Prefetcher(loader, 1, placement) as it:
        next(it), next(it), next(it)
        assert 0 in placement.alive()
        placement.finished.add(0)
        next(it)  # the thread looks again before its next pull
        assert eventually(lambda: 0 not in placement.alive())


@BOTH
def test_host_batches_whose_copy_is_done_are_let_go_and_nothing_is_copied_out(thread):
    placement = FakePlacement(True)
    with rows_loader() as loader, Prefetcher(loader, 1, placement, thread=thread) as it:
        for _ in it:
            pass
        assert placement.alive() == set()
        assert loader.stats()["copied_out"] == 0


def test_pending_copies_hold_their_slots_so_later_batches_are_copied_out():
    # 3 slots, workers=0: the caller may hold 2; a pending copy and the one read ahead do.
    placement = FakePlacement()
    with pytest.warns(RuntimeWarning, match="slots="), rows_loader(slots=3) as loader:
        with Prefetcher(loader, 1, placement, thread=False) as it:
            next(it)
            assert loader.stats()["copied_out"] == 0
            next(it)  # batch 0's copy is pending: batch 2 cannot take a third slot
            assert loader.stats()["copied_out"] == 1
            placement.finished.update({0, 1, 2})
            next(it)
            next(it)
            assert loader.stats()["copied_out"] == 1


def test_batches_the_caller_moved_past_are_freed_by_the_thread_not_the_caller():
    # Freeing a jax.Array releases the GIL: done in the caller's ``batch = next(it)`` it lets
    # the stage's thread take the GIL in the middle of the caller's loop.
    freed = []

    def tracked():
        for i in range(30):
            x = np.full((8, 4), i, np.float32)
            weakref.finalize(x, lambda: freed.append(threading.current_thread().name))
            yield {"x": x}

    it = Prefetcher(tracked(), 2, FakePlacement(True))
    for b in it:
        del b
    it.close()
    gc.collect()
    assert len(freed) == 30
    assert freed.count(threading.current_thread().name) <= 3, freed  # those still queued at the end


@BOTH
def test_at_the_end_the_stage_holds_nothing_but_the_callers_last_batch(thread):
    freed = []

    def tracked():
        for i in range(30):
            x = np.full((8, 4), i, np.float32)
            weakref.finalize(x, freed.append, i)
            yield {"x": x}

    it = Prefetcher(tracked(), 2, OnHost(), thread=thread)
    for b in it:  # noqa: B007 - the loop variable keeps the last batch, as in a training loop
        time.sleep(0.002)
    gc.collect()
    assert set(range(29)) <= set(freed), sorted(set(range(29)) - set(freed))
    assert 29 not in freed and float(b["x"][0, 0]) == 29.0


@pytest.mark.parametrize("size", [1, 2, 3])
@BOTH
def test_it_holds_at_most_held_at_peak_batches_so_a_ring_that_size_copies_nothing(size, thread):
    # A placement that aliases the host batch (JAX or torch on the CPU) and a caller that
    # keeps its batch through the step: the worst case the ring must cover.
    peak = Prefetcher.held_at_peak(size, thread)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ring of exactly the peak is enough: no warning
        with ap.Loader(Counting(60), 2, workers=2, slots=2 + peak) as loader:
            assert loader.max_held == peak
            for batch in Prefetcher(loader, size, OnHost(), thread=thread):  # noqa: B007
                time.sleep(0.001)  # the step, holding ``batch``
            del batch
            assert loader.stats()["copied_out"] == 0


def test_one_slot_fewer_than_the_inline_peak_copies_a_batch_out_and_says_which_slots_to_pass():
    peak = Prefetcher.held_at_peak(2, thread=False)
    with ap.Loader(Counting(40), 2, workers=1, slots=1 + peak - 1) as loader:
        with pytest.warns(RuntimeWarning, match=rf"holds up to {peak} batches.*pass slots={1 + peak}") as caught:
            it = Prefetcher(loader, 2, OnHost(), thread=False)
        assert caught[0].filename == __file__  # it points at the caller's line
        for batch in it:  # noqa: B007
            pass
        assert loader.stats()["copied_out"] > 0


def test_the_default_ring_needs_no_warning_for_the_default_size():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for workers in (0, 1, 2):
            with ap.Loader(Counting(8), 2, workers=workers) as loader:
                Prefetcher(loader, 2, OnHost()).close()


# ---- position, resume, length, stats --------------------------------------------------------


@BOTH
def test_state_dict_is_the_source_iterators_position_after_what_the_caller_received(thread):
    with rows_loader(rows=14, shuffle=True, seed=3) as reference:
        it = iter(reference)
        expected = [it.state_dict()]
        for _ in it:
            expected.append(it.state_dict())
    with rows_loader(rows=14, shuffle=True, seed=3) as loader, \
            Prefetcher(loader, 2, FakePlacement(True), thread=thread) as it:
        assert it.state_dict() == expected[0]
        for received in range(1, 8):
            next(it)
            assert it.state_dict() == expected[received]
            if not thread and received < 5:  # the loader itself is two batches further on
                assert loader.state_dict() == expected[received + 2]


@BOTH
def test_load_state_dict_drops_the_read_ahead_and_continues_exactly_from_the_state(thread):
    with rows_loader(rows=40, batch_size=3, shuffle=True, seed=4) as loader:
        full = [b["x"].tolist() for b in loader]
    with rows_loader(rows=40, batch_size=3, shuffle=True, seed=4) as loader:
        it = Prefetcher(loader, 2, FakePlacement(True), thread=thread)
        head = [next(it)["x"].tolist() for _ in range(5)]
        state = it.state_dict()
        more = [next(it)["x"].tolist() for _ in range(3)]  # read ahead further, then go back
        it.load_state_dict(state)
        assert len(it) == len(full) - 5
        rest = [b["x"].tolist() for b in it]
    assert head + rest == full and more == full[5:8]


def test_load_state_dict_needs_a_source_that_can_load_one():
    with rows_loader() as loader:
        it = Prefetcher((b for b in loader), 2, OnHost())
        with pytest.raises(TypeError, match=r"generator.*Pass a Loader \(or its iterator\)"):
            it.load_state_dict(loader.state_dict())
        it.close()
        closed = Prefetcher(loader, 2, OnHost())
        closed.close()
        with pytest.raises(RuntimeError, match="closed"):
            closed.load_state_dict(loader.state_dict())


@BOTH
def test_a_prefetcher_over_a_loader_iterator_resumes_that_iterator_in_place(thread):
    with rows_loader(rows=10, batch_size=2) as loader:
        it = iter(loader)
        stage = Prefetcher(it, 2, OnHost(), thread=thread)
        first = [next(stage)["x"][:, 0].tolist() for _ in range(2)]
        state = stage.state_dict()
        next(stage)
        stage.load_state_dict(state)  # back to after the first two
        rest = [b["x"][:, 0].tolist() for b in stage]
        assert first + rest == [[0.0, 4.0], [8.0, 12.0], [16.0, 20.0], [24.0, 28.0], [32.0, 36.0]]
        assert loader.state_dict() == it.state_dict()  # the loader stands where its latest iterator does


@BOTH
def test_len_counts_the_batches_still_to_come_where_the_source_has_a_length(thread):
    with rows_loader(rows=10, batch_size=2) as loader:
        it = Prefetcher(loader, 2, OnHost(), thread=thread)
        assert len(it) == 5
        next(it), next(it)
        assert len(it) == 3
        it.close()
    with pytest.raises(TypeError, match="no length"):
        len(Prefetcher(host_batches(3), 2, OnHost(), thread=thread))
    with rows_loader(epochs=None) as endless, pytest.raises(TypeError, match="no length"):
        len(Prefetcher(endless, 2, OnHost(), thread=thread))


@BOTH
def test_stats_count_batches_the_callers_wait_and_the_time_spent_placing(thread):
    class Slow(OnHost):
        def put(self, host):
            time.sleep(0.01)
            return host, None

    it = Prefetcher(host_batches(4), 1, Slow(), thread=thread)
    list(it)
    stats = it.stats()
    assert stats["batches"] == 4 and stats["size"] == 1 and stats["thread"] is thread
    assert stats["place_s"] >= 4 * 0.009 and stats["wait_s"] > 0


# ---- errors -------------------------------------------------------------------------------


@BOTH
def test_a_source_error_is_raised_after_the_batches_pulled_before_it_and_then_it_ends(thread):
    def failing():
        for i in range(3):
            yield {"x": np.full(2, i, np.float32)}
        raise OSError("disk on fire")

    got = []
    it = Prefetcher(failing(), 2, OnHost(), thread=thread)
    with pytest.raises(OSError, match="disk on fire"):
        for b in it:
            got.append(float(b["x"][0]))
    got += [float(b["x"][0]) for b in it]  # a caller that catches the error and goes on
    assert got == [0.0, 1.0, 2.0]
    assert not stage_threads()


@BOTH
def test_a_placement_error_reaches_the_caller(thread):
    class Refuses(OnHost):
        def put(self, host):
            raise ValueError("leaf ['x'] has the wrong shape")

    with pytest.raises(ValueError, match="wrong shape"):
        list(Prefetcher(host_batches(2), 2, Refuses(), thread=thread))


# ---- close ----------------------------------------------------------------------------------


@BOTH
def test_close_and_garbage_collection_call_placement_close_exactly_once(thread):
    placement = FakePlacement(True)
    with Prefetcher(host_batches(5), 2, placement, thread=thread) as it:
        next(it)
        it.close()
        it.close()
    assert placement.closes == 1
    with pytest.raises(StopIteration):
        next(it)  # a closed stage ends at once
    placement = FakePlacement(True)
    it = Prefetcher(host_batches(5), 2, placement, thread=thread)
    next(it)
    del it
    gc.collect()
    assert placement.closes == 1
    assert not stage_threads()


@pytest.mark.parametrize("how", ["close", "gc"])
@BOTH
def test_batches_whose_copy_is_pending_outlive_placement_close_and_no_longer(how, thread):
    # placement.close() waits for the copies (stream.synchronize); only then may the host
    # batches they read from go back to the loader.
    placement = FakePlacement()
    it = Prefetcher(host_batches(6), 2, placement, thread=thread)
    next(it)  # batch 0 handed out (copy pending), batches 1 and 2 queued (copies started)
    assert eventually(lambda: len(placement.hosts) >= 3)
    if how == "close":
        it.close()
    del it
    gc.collect()
    assert placement.closes == 1
    assert {0, 1, 2} <= placement.alive_at_close
    assert placement.alive() == set()  # and after it, nothing is kept


class SlowFromRecord:
    """Records from ``slow`` on take ``delay`` seconds each in a worker."""

    def __init__(self, n: int, slow: int, delay: float) -> None:
        self.n, self.slow, self.delay = n, slow, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.slow:
            time.sleep(self.delay)
        return {"x": np.full(2, i, np.float32)}


def test_close_of_a_stage_waiting_inside_a_loader_returns_within_20_ms_with_its_thread_gone():
    took = []
    for _ in range(3):
        with ap.Loader(SlowFromRecord(40, slow=2, delay=3.0), 1, workers=1, backend="thread") as loader:
            it = Prefetcher(loader, 1, OnHost())
            next(it), next(it)
            wait_until_waiting_in_loader(stage_threads()[0])  # for batch 2
            started = time.perf_counter()
            it.close()
            took.append(time.perf_counter() - started)
            assert not stage_threads()
    assert statistics.median(took) < 0.020 and max(took) < 0.25, took


def test_a_loader_closed_under_the_thread_ends_the_stage_with_the_loaders_error():
    loader = ap.Loader(SlowFromRecord(40, slow=8, delay=2.0), 4, workers=2)
    it = Prefetcher(loader, 2, OnHost())
    next(it), next(it)
    wait_until_waiting_in_loader(stage_threads()[0])  # for batch 2
    started = time.monotonic()
    loader.close()
    with pytest.raises(ap.LoaderError, match="closed"):
        next(it)
    assert time.monotonic() - started < 2.0  # busy workers get half a second, then are killed
    assert not stage_threads()


def test_resuming_the_same_loader_after_close_loses_no_batch():
    gate = threading.Event()

    class Gated:
        def __len__(self):
            return 40

        def __getitem__(self, i):
            if i == 3:
                gate.wait(30)
            return {"i": np.int64(i)}

    loader = ap.Loader(Gated(), 1, workers=1, backend="thread")
    it = Prefetcher(loader, 1, OnHost())
    assert [int(next(it)["i"][0]) for _ in range(3)] == [0, 1, 2]
    wait_until_waiting_in_loader(stage_threads()[0])  # for batch 3
    state = it.state_dict()
    it.close()
    loader.load_state_dict(state)  # resume the same loader at what the caller received
    gate.set()
    assert [int(b["i"][0]) for b in loader][:3] == [3, 4, 5]
    loader.close()


@pytest.mark.parametrize("source", ["generator", "workers=0"])
def test_close_warns_naming_the_thread_when_the_source_cannot_be_interrupted(source):
    release = threading.Event()

    def slow_generator():
        yield {"x": np.zeros(2)}
        release.wait(10)
        yield {"x": np.ones(2)}

    class Slow:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i >= 2 and threading.current_thread().name == "agnostic_prefetch-device":
                release.wait(10)
            return {"x": np.full(2, i, np.float32)}

    loader = ap.Loader(Slow(), 1, workers=0) if source == "workers=0" else None
    it = Prefetcher(slow_generator() if loader is None else loader, 1, OnHost())
    next(it)
    thread = stage_threads()[0]
    assert eventually(lambda: inside(thread, "test_prefetch.py", "__getitem__")
                      or inside(thread, "test_prefetch.py", "slow_generator"))  # waiting for ``release``
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"could not stop its thread 'agnostic_prefetch-device'"):
        it.close()
    assert time.monotonic() - started < 1.0
    release.set()
    assert eventually(lambda: not stage_threads())
    if loader is not None:
        loader.close()


# ---- the queue between the thread and the caller -----------------------------------------


def test_closing_the_channel_wakes_a_blocked_put_and_a_blocked_get():
    full, empty = Channel(1, {"full_s": 0.0}), Channel(1, {"full_s": 0.0})
    assert full.put("a")
    results = {}
    putter = threading.Thread(target=lambda: results.update(put=full.put("b")))
    getter = threading.Thread(target=lambda: results.update(get=empty.get()))
    putter.start(), getter.start()
    assert eventually(lambda: inside(putter, "threading.py", "wait") and inside(getter, "threading.py", "wait"))
    assert putter.is_alive() and getter.is_alive()  # both blocked, neither polling out
    assert full.close() == ["a"]
    empty.close()
    putter.join(1), getter.join(1)
    assert results["put"] is False and results["get"] is not None and not putter.is_alive()


# ---- resuming and closing at awkward moments ----------------------------------------------


class GatedFromFour:
    """Records from 2 on take 50 ms (in whichever thread reads them); ``entered`` is set when
    record 4 is read, the first of batch 2."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.entered = threading.Event()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= 2:
            time.sleep(0.05)
        if i == 4:
            self.entered.set()
        return {"i": np.int64(i)}


@pytest.mark.filterwarnings("ignore:prefetch:RuntimeWarning")
def test_resuming_a_workers_0_loader_while_its_thread_fills_a_later_batch_continues_exactly():
    source = GatedFromFour(20)
    with ap.Loader(source, 2, workers=0) as loader:
        it = Prefetcher(loader, 2, OnHost())
        assert next(it)["i"].tolist() == [0, 1]
        state = it.state_dict()
        assert source.entered.wait(10)  # the stage's thread fills batch 2 itself, in the loader
        it.load_state_dict(state)  # batch 2 is filled after the cancel, ahead of the position
        got = [b["i"].tolist() for b in it]
    assert got == [[2 * k, 2 * k + 1] for k in range(1, 10)]


@BOTH
def test_a_refused_state_leaves_the_prefetcher_where_it_was(thread):
    with rows_loader(rows=40, batch_size=2) as loader:
        it = Prefetcher(loader, 2, OnHost(), thread=thread)
        assert next(it)["x"][:, 0].tolist() == [0.0, 4.0]
        state = it.state_dict()
        with pytest.raises(ValueError, match="seed"):
            it.load_state_dict({**state, "seed": 999})
        assert len(it) == 19 and it.state_dict() == state
        assert [b["x"][0, 0] for b in it][:2] == [8.0, 16.0]  # batches 1, 2: nothing lost or repeated


def test_a_prefetcher_collected_by_its_own_thread_inside_a_put_closes_without_deadlock():
    # Inline, the put runs inside the caller's next(), whose frame holds the prefetcher: it
    # cannot be collected there. With the thread, a collection inside put can free it.
    dropped, closed = threading.Event(), threading.Event()

    class CollectsInPut(OnHost):
        def put(self, host):
            if dropped.is_set():
                gc.collect()  # collects the prefetcher: its finalizer runs here, inside put
            return host, None

        def close(self):
            closed.set()

    def endless():
        while True:
            yield {"x": np.zeros(2)}

    it = Prefetcher(endless(), 1, CollectsInPut())
    it.cycle = it  # only the cycle collector can free it
    first = next(it)
    dropped.set()
    del it
    assert closed.wait(10), "close() deadlocked in the thread that was placing"
    assert eventually(lambda: not stage_threads())
    assert first["x"].tolist() == [0.0, 0.0]
