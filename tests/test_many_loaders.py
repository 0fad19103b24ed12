"""Many loaders in one process, many threads at once: each loader gives what it gives alone,
nothing deadlocks (every wait here has a deadline), and nothing is left behind: no worker,
no thread, no descriptor."""

from __future__ import annotations

import gc
import itertools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from concurrent_sources import numbered, rows, with_draw
from sources_for_tests import OnHost
from waiting import eventually

import agnostic_prefetch as ap
from agnostic_prefetch.errors import LoaderError

N = 48


def build(tag: int, workers: int, backend: str, epochs: int | None = 1) -> ap.Loader:
    """Loader ``tag`` reads its own records (``1000 * tag + i``) in its own shuffle."""
    return ap.Loader(numbered(N, tag), 4, workers=workers, backend=backend, shuffle=True, seed=tag,
                     epochs=epochs, transform=with_draw, stall_warning=None)


_alone: dict[tuple[int, int], list[tuple[int, float]]] = {}


def alone(tag: int, epochs: int = 1) -> list[tuple[int, float]]:
    """Loader ``tag``'s rows when it runs by itself (in-process: the same contents as any
    worker count or backend)."""
    if (tag, epochs) not in _alone:
        with build(tag, 0, "process", epochs) as loader:
            _alone[tag, epochs] = rows(loader)
    return _alone[tag, epochs]


def together(jobs: list[Callable[[], Any]], seconds: float = 60.0) -> list[Any]:
    """Run every job in a thread of its own, released at once; their results in order.

    Fails, with the stacks of the threads still running, if any has not ended within
    ``seconds``; re-raises the first error a job raised.
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(k: int) -> None:
        try:
            start.wait()
            results[k] = jobs[k]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), name=f"job-{k}", daemon=True) for k in range(len(jobs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        frames = sys._current_frames()
        stacks = "\n".join(f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
                           for t in stuck if t.ident in frames)
        pytest.fail(f"{len(stuck)} threads still running after {seconds} s (deadlock?):\n{stacks}")
    if errors:
        raise errors[0]
    return results


def loader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("agnostic_prefetch")}


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def leaves_nothing():
    """Fails a test that leaves a loader's thread or descriptor behind (workers and /dev/shm:
    conftest's fixture)."""
    alone(0)  # anything opened once per process (imports, caches) is opened before counting
    gc.collect()
    threads, fds = loader_threads(), open_descriptors()
    yield
    gc.collect()
    # Only this test's threads count: one an earlier test left (a thread worker stuck in a
    # record that hangs cannot be stopped) may end, or stay, meanwhile.
    assert eventually(lambda: not loader_threads() - threads, 5), \
        f"threads left: {sorted(t.name for t in loader_threads() - threads)}"
    assert not open_descriptors() - fds, f"descriptors left: {sorted(open_descriptors() - fds)}"


# Every kind of loader side by side: processes, threads, in-process, behind a prefetch thread.
KINDS = [(2, "process", False), (2, "thread", False), (0, "process", False), (1, "process", True),
         (2, "thread", True)]


def test_several_loaders_iterated_from_threads_at_once_give_what_each_gives_alone(leaves_nothing):
    expected = [alone(tag, 2) for tag in range(len(KINDS))]
    loaders = [build(tag, workers, backend, epochs=2) for tag, (workers, backend, _) in enumerate(KINDS)]
    try:
        def reader(tag: int) -> Callable[[], list[tuple[int, float]]]:
            staged = KINDS[tag][2]
            return lambda: rows(ap.Prefetcher(loaders[tag], 2, OnHost()) if staged else loaders[tag])

        got = together([reader(tag) for tag in range(len(KINDS))])
    finally:
        for loader in loaders:
            loader.close()
    assert got == expected


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_one_iterator_read_from_several_threads_delivers_every_batch_once(backend, leaves_nothing):
    with build(1, 2, backend, epochs=3) as loader:
        it = iter(loader)
        got = together([lambda: [rows([batch]) for batch in it] for _ in range(4)])
    batches = [batch for part in got for batch in part]
    assert sorted(row for batch in batches for row in batch) == sorted(alone(1, 3))
    assert len(batches) == 3 * N // 4


def test_loaders_closed_from_other_threads_while_they_are_read_end_at_once(leaves_nothing):
    kinds = [(2, "process"), (2, "thread"), (1, "process"), (1, "thread")]
    loaders = [build(tag, workers, backend, epochs=None) for tag, (workers, backend) in enumerate(kinds)]
    read = [threading.Event() for _ in loaders]
    endless = [alone(tag) for tag in range(len(kinds))]

    def reader(tag: int) -> Callable[[], tuple[list[tuple[int, float]], BaseException | None]]:
        def run() -> tuple[list[tuple[int, float]], BaseException | None]:
            got: list[tuple[int, float]] = []
            try:
                for batch in loaders[tag]:
                    got += rows([batch])
                    read[tag].set()
            except LoaderError as exc:
                return got, exc
            return got, None
        return run

    def closer(tag: int) -> Callable[[], None]:
        def run() -> None:
            assert read[tag].wait(30)
            loaders[tag].close()
        return run

    try:
        got = together([reader(tag) for tag in range(len(kinds))] + [closer(tag) for tag in range(len(kinds))])
    finally:
        for loader in loaders:
            loader.close()
    for tag, (rows_read, error) in enumerate(got[:len(kinds)]):
        assert isinstance(error, LoaderError) and "closed" in str(error)
        first_epoch = rows_read[: len(endless[tag])]
        assert first_epoch == endless[tag][: len(first_epoch)] and rows_read


def churn(seed: int, until: float) -> int:
    """Build, read part of and close loaders of random kinds until ``until``; how many.
    Every batch read must be what that loader gives alone."""
    rng = np.random.default_rng(seed)
    built = 0
    while time.monotonic() < until or built == 0:
        tag = int(rng.integers(1, 6))
        workers, backend = int(rng.integers(0, 3)), str(rng.choice(["process", "thread"]))
        take, staged = int(rng.integers(0, N // 4 + 2)), bool(rng.random() < 0.3)
        loader = build(tag, workers, backend)
        try:
            source: Any = ap.Prefetcher(loader, 2, OnHost()) if staged else iter(loader)
            got = rows(itertools.islice(source, take))
            if staged:
                source.close()
        finally:
            loader.close()
        assert got == alone(tag)[: len(got)], (tag, workers, backend, staged)
        built += 1
    return built


@pytest.mark.parametrize("seconds", [pytest.param(2.0, id="2s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)])
def test_loaders_built_and_closed_from_several_threads_at_once_leave_nothing_behind(seconds, leaves_nothing):
    for tag in range(1, 6):
        alone(tag)  # the references, before the threads start
    until = time.monotonic() + seconds
    built = together([lambda seed=seed: churn(seed, until) for seed in range(4)], seconds=seconds + 60)
    assert all(count >= 1 for count in built)
