"""Per-stage accounting: where the workers', the loader's and the prefetch stage's time goes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sources_for_autotune import Burning, Waiting

import agnostic_prefetch as ap
from agnostic_prefetch._accounts import CPU_SAMPLE, Board, WorkerAccount, board_bytes, worker_totals

SLEEP_S = 0.004


@pytest.mark.parametrize("workers,backend", [(0, "process"), (2, "thread"), (2, "process")])
def test_a_sleeping_source_shows_as_read_wall_time_without_cpu(workers, backend):
    with ap.Loader(Waiting(48, SLEEP_S), 8, workers=workers, backend=backend, epochs=1) as loader:
        for _ in loader:
            pass
        stats = loader.stats()
    assert stats["items_read"] >= 48
    assert stats["read_s"] >= 48 * SLEEP_S
    assert stats["read_cpu_s"] < 0.3 * stats["read_s"]
    assert stats["transform_s"] < 0.2 * stats["read_s"]
    assert stats["fill_s"] == pytest.approx(stats["read_s"] + stats["transform_s"] + stats["write_s"])
    assert sum(w["items"] for w in stats["per_worker"]) == stats["items_read"]
    assert len(stats["per_worker"]) == max(1, workers)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_cpu_burning_transform_shows_as_transform_cpu_time(backend):
    with ap.Loader(ap.ArraySource({"x": np.arange(64)}), 4, workers=1, backend=backend,
                   transform=Burning(0.004)) as loader:
        for _ in loader:
            pass
        stats = loader.stats()
    assert stats["transform_s"] >= 64 * 0.004
    # CPU time is sampled (4 of these items); other processes may take the CPU at times
    assert stats["transform_cpu_s"] > 0.5 * stats["transform_s"]
    assert stats["read_s"] < 0.2 * stats["transform_s"]


def test_the_callers_wait_splits_into_blocked_and_handoff():
    with ap.Loader(Waiting(48, SLEEP_S), 8, workers=1, backend="thread") as loader:
        for _ in loader:
            pass
        stats = loader.stats()
    assert stats["blocked_s"] + stats["handoff_s"] == pytest.approx(stats["wait_s"])
    assert stats["blocked_s"] > 0.5 * stats["wait_s"]  # it waited on the sleeping worker


def test_workers_held_back_by_a_slow_consumer_filling_every_slot_are_counted():
    with ap.Loader(ap.ArraySource({"x": np.arange(64)}), 1, workers=1, backend="thread",
                   slots=3, epochs=None) as loader:
        it = iter(loader)
        batch = next(it)
        for _ in range(4):  # meanwhile the worker fills every slot it may, then waits
            time.sleep(0.05)
            batch = next(it)
        stats = loader.stats()
    del batch
    assert 0.1 < stats["held_s"] < 0.3


def test_worker_idle_time_counts_the_wait_for_orders_in_progress():
    with ap.Loader(ap.ArraySource({"x": np.arange(8)}), 4, workers=1, backend="thread") as loader:
        for _ in loader:
            pass
        time.sleep(0.1)
        idle = loader.stats()["worker_idle_s"]
    assert idle >= 0.1


def test_stats_after_close_keep_the_last_figures():
    loader = ap.Loader(Waiting(48, SLEEP_S), 8, workers=1, backend="thread")
    for _ in loader:
        pass
    before = loader.stats()["read_s"]
    loader.close()
    after = loader.stats()["read_s"]
    assert after >= before > 0 and loader.stats()["read_s"] == after


def test_cpu_time_is_sampled_on_one_item_in_cpu_sample():
    words = bytearray(board_bytes(1))
    account = WorkerAccount(memoryview(words), 0, pid=1, thread=1)
    account.acc[:5] = [16, 1, 1.0, 0.5, 0.25]  # items, batches, read, transform, write seconds
    account.add_sampled([2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    account.flush(now=1.0)
    board = Board(words, 0, 1)
    totals = worker_totals(board.table())
    assert totals["items_read"] == 16 and CPU_SAMPLE == 16
    assert totals["read_cpu_s"] == pytest.approx(0.5)  # read wall x sampled cpu/wall
    assert totals["transform_cpu_s"] == pytest.approx(0.5)
    assert totals["write_cpu_s"] == pytest.approx(0.25)


def test_a_trace_level_set_by_the_parent_reaches_a_worker_account():
    words = bytearray(board_bytes(2))
    board = Board(words, 0, 2)
    account = WorkerAccount(memoryview(words), 1, pid=1, thread=1)
    assert account.trace_level() == 0
    board.set_trace_level(2)
    assert account.trace_level() == 2


def test_prefetcher_stats_time_pulling_placing_and_the_transfer():
    pytest.importorskip("jax")
    with ap.Loader(Waiting(48, SLEEP_S), 8, workers=1, backend="thread") as loader:
        with ap.prefetch_to_device(loader, size=2) as it:
            for _ in it:
                time.sleep(0.001)
            stats = it.stats()
    assert stats["batches"] == 6
    assert stats["pull_s"] >= 0.5 * 48 * SLEEP_S  # the stage waited on the sleeping worker
    assert stats["place_s"] > 0 and stats["transfer_s"] >= 0
    assert {"wait_s", "full_s"} <= set(stats)


def test_a_prefetcher_ahead_of_a_slow_consumer_waits_for_room():
    from sources_for_tests import OnHost

    from agnostic_prefetch.prefetch import Prefetcher

    with Prefetcher(range(6), 1, OnHost()) as it:
        for _ in it:
            time.sleep(0.02)
        stats = it.stats()
    assert stats["full_s"] > 0.05 and stats["wait_s"] < stats["full_s"]
