"""workers="auto": the decision on synthetic figures, and live pools that grow, switch and stay put."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from sources_for_autotune import Burning, DiesAfter, Waiting
from sources_for_tests import add_noise

import agnostic_prefetch as ap
from agnostic_prefetch._autotune import Probe, decide, plan_auto, plan_limit, threads_allowed
from agnostic_prefetch._cpus import CpuBudget, cpu_budget
from agnostic_prefetch._sizing import plan_ring
from agnostic_prefetch.errors import WorkerDiedError

CPUS = cpu_budget().cpus
MIB = 1 << 20


def probe(cpu_share: float, *, workers: int = 2, items: int = 200, blocked: float = 0.5, held: float = 0.0) -> Probe:
    busy = workers * 0.5
    return Probe(workers, 0.5, items, busy, busy * cpu_share, 0.0, blocked, held)


# ---- the decision, on synthetic figures -------------------------------------------------------

def test_cpu_bound_items_keep_one_process_per_cpu_even_when_threads_are_allowed():
    d = decide(probe(0.98), 4, 32, backend="auto", allowed=True, current="process")
    assert (d.workers, d.backend, d.reason) == (4, "process", "CPU-bound")


def test_io_bound_items_get_enough_waiters_to_keep_the_cpus_busy_up_to_the_limit():
    d = decide(probe(0.1), 2, 64, backend="process", allowed=False, current="process")
    assert (d.workers, d.backend) == (math.ceil(0.9 * 2 / 0.1), "process")
    assert decide(probe(0.01), 2, 16, backend="process", allowed=False, current="process").workers == 16


def test_io_bound_items_of_a_declared_thread_safe_source_run_in_threads():
    d = decide(probe(0.03), 2, 16, backend="auto", allowed=True, current="process")
    assert (d.workers, d.backend, d.reason) == (16, "thread", "I/O-bound")


def test_a_source_without_the_declaration_never_gets_threads_and_is_told_how():
    d = decide(probe(0.03), 2, 16, backend="auto", allowed=False, current="process")
    assert d.backend == "process" and "thread_safe = True" in d.threads


def test_python_work_beyond_one_gil_stays_in_processes():
    d = decide(probe(0.2), 4, 64, backend="auto", allowed=True, current="process")
    assert d.workers == 18 and d.backend == "process"


def test_waiting_for_a_cpu_counts_as_cpu_not_as_io():
    busy = 1.0
    contended = Probe(2, 0.5, 200, busy, 0.5 * busy, 0.45 * busy, 0.4, 0.0)  # half the time runnable, not running
    assert decide(contended, 2, 16, backend="auto", allowed=True, current="process").workers == 2


def test_a_consumer_slower_than_the_workers_gets_no_more_workers():
    d = decide(probe(0.02, blocked=0.001, held=0.6), 2, 16, backend="auto", allowed=True, current="process")
    assert (d.workers, d.backend) == (2, "process") and d.reason.startswith("consumer-bound")


def test_memory_for_worker_processes_caps_the_count():
    d = decide(probe(0.02), 2, 16, backend="process", allowed=False, current="process",
               process_bytes=512 * MIB, room=2048 * MIB)
    assert d.workers == 2 + 2 and "fit in memory" in d.reason


def test_memory_for_the_ring_caps_the_limit():
    limit, why = plan_limit(2, 100 * MIB, None, room=3000 * MIB)
    assert plan_ring(limit, 100 * MIB).slots * 100 * MIB <= 1500 * MIB < plan_ring(limit + 1, 100 * MIB).slots * 100 * MIB
    assert "ring" in why
    assert plan_limit(2, 4096, None, room=1 << 40) == (16, "8 per CPU, within [4, 64]")
    assert plan_limit(32, 4096, None, room=None)[0] == 64 and plan_limit(0.5, 4096, None, None)[0] == 8


def test_slots_given_cap_the_limit():
    assert plan_limit(2, 4096, 5, room=None)[0] == 4


def test_a_cgroup_quota_of_half_a_cpu_gives_one_worker(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/job\n")
    (tmp_path / "proc/self/mountinfo").write_text("30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    (tmp_path / "proc/self/status").write_text("Cpus_allowed_list:\t0-7\n")
    (tmp_path / "sys/fs/cgroup/job").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/job/cpu.max").write_text("50000 100000\n")
    budget = cpu_budget(str(tmp_path))
    assert budget.cpus == 0.5
    plan = plan_auto(Waiting(10), None, "auto", 4096, None, budget=budget, room=None)
    assert plan.first == (1, "process") and plan.limit == 8
    assert decide(probe(1.0, workers=1), budget.cpus, plan.limit, backend="auto", allowed=False,
                  current="process").workers == 1


def test_the_declaration_is_read_from_class_or_instance_and_needs_the_transform_too():
    assert threads_allowed(Waiting(1, thread_safe=True), None)
    assert not threads_allowed(Waiting(1), None)
    assert not threads_allowed(Waiting(1, thread_safe=True), add_noise)
    assert threads_allowed(Waiting(1, thread_safe=True), Burning())
    assert ap.ArraySource(np.zeros(3)).thread_safe and ap.CaffeTransform().thread_safe
    assert ap.LMDBSource.thread_safe and ap.ImageListSource.thread_safe


@pytest.mark.parametrize("workers,backend", [(2, "auto"), ("many", "process"), ("auto", "fibers")])
def test_meaningless_combinations_are_refused(workers, backend):
    with pytest.raises(ValueError):
        ap.Loader(Waiting(8), 2, workers=workers, backend=backend)


# ---- live ----------------------------------------------------------------------------------------

def until_decided(loader, seconds=8.0):
    """Iterate until auto decided and a few batches ran on the new pool; return the batches."""
    batches, deadline, after = [], time.monotonic() + seconds, 0
    for batch in loader:
        batches.append(batch)
        if loader.stats()["auto"]["decided"]:
            after += 1
            if after >= 5:
                break
        assert time.monotonic() < deadline, "auto did not decide in time"
    return batches


def test_io_bound_source_declared_thread_safe_ends_on_more_threads_than_cpus(caplog):
    caplog.set_level(logging.INFO, logger="agnostic_prefetch")
    with ap.Loader(Waiting(10**6, thread_safe=True), 16, workers="auto", backend="auto", epochs=None) as loader:
        until_decided(loader)
        assert loader.backend == "thread" and loader.workers > CPUS
        assert f"→ {loader.workers} thread workers (I/O-bound" in repr(loader)
        auto = loader.stats()["auto"]
        assert (auto["workers"], auto["backend"], auto["reason"]) == (loader.workers, "thread", "I/O-bound")
        assert auto["cpu_share"] < 0.5 and auto["probe"]["items"] > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("workers='auto'")]
    assert len(lines) == 1
    assert f"{loader.workers} thread workers — I/O-bound" in lines[0] and "CPUs (affinity" in lines[0]
    assert "ms CPU" in lines[0] and "up to 16" in lines[0] or f"up to {auto['limit']}" in lines[0]


def test_io_bound_source_without_the_declaration_stays_on_processes():
    # slots=5 caps the limit at 4 workers: the test starts two processes more, not fourteen
    with ap.Loader(Waiting(10**6), 16, workers="auto", backend="auto", slots=5, epochs=None) as loader:
        until_decided(loader)
        assert loader.backend == "process" and loader.workers == 4
        assert "thread_safe = True" in loader.stats()["auto"]["threads"]


def test_cpu_burning_transform_stays_at_about_one_process_per_cpu():
    with ap.Loader(Waiting(10**6, wait_s=0, thread_safe=True), 8, workers="auto", backend="auto",
                   transform=Burning(0.002), epochs=None) as loader:
        until_decided(loader)
        # about one per CPU; a loaded machine (the rest of the suite) may measure a little
        # less than all CPU, but never I/O-bound: nowhere near the limit of 8 per CPU
        assert loader.backend == "process" and loader.workers <= 2 * math.ceil(CPUS)
        assert loader.stats()["auto"]["cpu_share"] > 0.5


def test_the_ring_and_counters_are_reserved_for_the_limit_up_front():
    with ap.Loader(Waiting(64, thread_safe=True), 4, workers="auto", backend="thread") as loader:
        limit = loader.stats()["auto"]["limit"]
        assert limit == min(64, max(4, 8 * math.ceil(CPUS)))
        assert loader.stats()["slots"] == plan_ring(limit, loader.layout.slot_bytes).slots
        assert "probing with" in repr(loader) and loader.workers == max(1, round(CPUS))


def test_auto_gives_the_same_batches_as_two_workers_and_resumes_exactly():
    def make(workers, backend):
        return ap.Loader(Waiting(240, wait_s=0.003, thread_safe=True), 6, workers=workers, backend=backend,
                         shuffle=True, seed=3, epochs=3, transform=add_noise)

    with make(2, "thread") as fixed:
        want = [(b["i"].tolist(), b["x"].copy()) for b in fixed]
    with make("auto", "auto") as auto:
        it = iter(auto)
        got = [(b["i"].tolist(), b["x"].copy()) for b in (next(it) for _ in range(70))]
        state = it.state_dict()
        assert auto.stats()["auto"]["decided"]
    with make("auto", "auto") as resumed:
        resumed.load_state_dict(state)
        got += [(b["i"].tolist(), b["x"].copy()) for b in resumed]
    assert [i for i, _ in got] == [i for i, _ in want]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_a_worker_dying_during_the_probe_is_reported():
    with ap.Loader(DiesAfter(400, bad=40), 4, workers="auto", backend="auto") as loader:
        with pytest.raises(WorkerDiedError, match="exited with code 7"):
            list(loader)


def test_cpu_budget_is_what_auto_reports():
    budget = CpuBudget(3.0, 4, 3.0, "cgroup v2 /sys/fs/cgroup/job")
    plan = plan_auto(Waiting(10), None, "process", 4096, None, budget=budget, room=None)
    assert plan.first == (3, "process") and plan.limit == 24 and plan.rows == 27


def test_a_pool_change_that_fails_stops_the_loader_with_a_loader_error(monkeypatch):
    from agnostic_prefetch import _pool

    # slots=5 caps the limit at 4 processes: the decision grows the probe's pool
    with ap.Loader(Waiting(10**6), 16, workers="auto", backend="auto", slots=5, epochs=None) as loader:
        def refuse(*args, **kwargs):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(_pool, "start", refuse)
        with pytest.raises(ap.LoaderError, match=r"workers='auto' could not change the pool.*Too many open files"):
            for _ in loader:
                pass
        assert loader.closed
