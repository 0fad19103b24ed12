"""``workers="auto"``: the largest pool the ring is reserved for, a short probe, one decision.

The loader reserves its ring and accounting rows for the largest pool :func:`plan_limit`
allows, starts ``start_count(cpus)`` workers, and hands a :class:`Tuner` to the scheduler,
which calls :meth:`Tuner.step` from every dispatch until it returns its decision. The tuner lets each worker finish one
batch (cold start: imports, first page faults, a database opening), then measures until the
workers have spent about a quarter second each on batches, and decides with :func:`decide`:

- the CPU share ``f`` of an item: (CPU time + time waiting for a CPU) / busy wall time, from
  the workers' accounting rows and the kernel's per-thread ``schedstat``. Waiting for a CPU
  (other processes, or our own workers) is not waiting for I/O, so it counts as CPU: a
  CPU-bound pool never grows past the CPUs it may use because the machine is busy.
- ``n = ceil(0.9 * cpus / f)`` workers keep the CPUs busy (``f`` near 1: about ``cpus``;
  an item waiting on I/O for 30 times its CPU: many), at most the limit.
- threads where they are allowed (the source and transform declare ``thread_safe = True``,
  or the user asked for ``backend="thread"``) and the items are I/O-bound and the pool's
  Python work, as the probe measures it, is at most ``GIL_ROOM`` CPUs (docs/design.md says
  why that is above one); processes otherwise.
- a consumer slower than the workers (it hardly waited while the ring held workers back)
  gets no more workers: they would only fill the ring sooner.

Nothing here decodes or orders batches, or starts workers: the scheduler applies the
decision (``Membership.resize`` starts and retires workers), and batch contents never
depend on the pool (orders are a function of the sampler).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agnostic_prefetch._accounts import FIELDS, Board, worker_totals
from agnostic_prefetch._cpus import CpuBudget, cpu_budget
from agnostic_prefetch._ring import available_bytes
from agnostic_prefetch._sizing import plan_ring

log = logging.getLogger("agnostic_prefetch")

PER_CPU = 8  # workers per CPU at most: enough waiters for items that wait 7x their CPU time
MOST, LEAST = 64, 4  # bounds of the limit: file descriptors and slots; a few waiters on 1 CPU
RING_SHARE = 0.5  # the ring for the limit takes at most this share of the memory available
PROCESS_SHARE = 0.5  # worker processes may take at most this share of what is left after it
GIL_ROOM = 1.5  # threads while the pool's Python work needs at most this many CPUs, as the probe measures it
CONSUMER_WAITED, RING_HELD = 0.05, 0.2  # a consumer-bound probe: caller blocked / ring-held shares
PROBE_BUSY_S = 0.25  # busy seconds per worker the probe measures (after each worker's first batch)
PROBE_MAX_S = 1.5  # ... or this much wall time, once a batch completed in it
WARM_MAX_S = 3.0  # longest wait for every worker's first batch before measuring anyway
GIVE_UP_S = 10.0  # no batch in the probe by then: keep the starting pool
CHECK_S = 0.02  # the tuner looks at the accounting at most this often

_F = {name: k for k, name in enumerate(FIELDS)}


def threads_allowed(source: Any, transform: Any) -> bool:
    """Whether the source (and the transform, if any) declare ``thread_safe = True``."""
    return getattr(source, "thread_safe", False) is True and (
        transform is None or getattr(transform, "thread_safe", False) is True)


def start_count(cpus: float) -> int:
    """Workers the probe runs with: one per CPU this process may use (at least one)."""
    return max(1, round(cpus))


def plan_limit(cpus: float, slot_bytes: int, slots: int | None, room: int | None) -> tuple[int, str]:
    """The most workers auto may pick, and why: ``PER_CPU`` per CPU within ``[LEAST, MOST]``,
    lowered until ``slots`` (if given) and the ring for it (at most ``RING_SHARE`` of ``room``)
    allow it; never below the starting pool."""
    limit = min(MOST, max(LEAST, PER_CPU * math.ceil(cpus)))
    why = f"{PER_CPU} per CPU, within [{LEAST}, {MOST}]"
    floor = start_count(cpus)
    if slots is not None and slots - 1 < limit:
        limit, why = max(floor, slots - 1), f"slots={slots} leaves room for {max(floor, slots - 1)}"
    if room is not None:
        budget = RING_SHARE * room
        while limit > floor and plan_ring(limit, slot_bytes, slots).slots * slot_bytes > budget:
            limit -= 1
            why = f"the ring for more would exceed {RING_SHARE:.0%} of {room / 2**30:.1f} GiB available"
    return limit, why


def check(workers: Any, backend: str) -> None:
    """Refuse what ``workers=`` and ``backend=`` cannot mean together, naming the remedy."""
    if backend not in ("process", "thread", "auto"):
        raise ValueError(f"backend must be 'process', 'thread' or 'auto', got {backend!r}")
    if isinstance(workers, str):
        if workers != "auto":
            raise ValueError(f"workers must be a count or 'auto', got {workers!r}")
    elif backend == "auto":
        raise ValueError(f"backend='auto' picks the backend together with the count: pass workers='auto', "
                         f"or backend='process' or 'thread' with workers={workers}")


@dataclass(frozen=True)
class AutoPlan:
    """What the loader reserves and starts for ``workers="auto"``, before any measurement."""

    budget: CpuBudget
    limit: int
    limit_why: str
    asked: str  # the backend the user asked for
    allowed: bool  # threads declared safe
    first: tuple[int, str]  # the probe's pool: count and backend

    @property
    def rows(self) -> int:
        """Accounting rows: the probe's pool, then at most ``limit`` new workers."""
        return self.first[0] + self.limit


def plan_auto(source: Any, transform: Any, backend: str, slot_bytes: int, slots: int | None,
              budget: CpuBudget | None = None, room: int | None | str = "measure") -> AutoPlan:
    """The limit and the probe's pool for ``source``/``transform`` on this machine."""
    budget = cpu_budget() if budget is None else budget
    if room == "measure":
        room = available_bytes(True)[0]
    assert not isinstance(room, str)
    limit, why = plan_limit(budget.cpus, slot_bytes, slots, room)
    first = (start_count(budget.cpus), "thread" if backend == "thread" else "process")
    return AutoPlan(budget, limit, why, backend, threads_allowed(source, transform), first)


@dataclass(frozen=True)
class Probe:
    """What the probe measured, summed over its workers (seconds unless named otherwise)."""

    workers: int
    elapsed_s: float  # wall time of the measurement
    items: float
    busy_s: float  # worker wall time in read + transform + write
    cpu_s: float  # their CPU time (estimated from sampled items)
    runq_s: float  # time the workers waited for a CPU while runnable (schedstat; 0 if unknown)
    blocked_s: float  # the caller blocked waiting for a worker
    held_s: float  # worker-seconds held back because every slot was taken


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` picked, and the figures it picked from (``stats()["auto"]``)."""

    workers: int
    backend: str
    reason: str  # one phrase: "CPU-bound", "I/O-bound", "consumer-bound", ...
    cpu_share: float  # f: (CPU + waiting for a CPU) / busy wall time of an item
    item_ms: float  # busy wall time per item
    item_cpu_ms: float  # CPU time per item
    limit: int
    threads: str  # why threads were or were not used


def decide(probe: Probe, cpus: float, limit: int, *, backend: str, allowed: bool, current: str,
           process_bytes: int | None = None, room: int | None = None) -> Decision:
    """The pool to run after ``probe`` (a pure function: every figure comes in as an argument).

    Args:
        probe: the measurement.
        cpus: CPUs this process may use.
        limit: the most workers (the ring is reserved for it).
        backend: what the user asked: ``"process"``, ``"thread"`` or ``"auto"``.
        allowed: the source and transform declare ``thread_safe``.
        current: the backend the probe ran on.
        process_bytes: private memory of one worker process, if known.
        room: bytes of memory available now, if known.
    """
    items = max(probe.items, 1.0)
    busy = max(probe.busy_s, 1e-9)
    share = min(1.0, max(0.01, (probe.cpu_s + probe.runq_s) / busy))
    # CPU per wall time of an item that never waits for a CPU: what each thread would ask
    # of the one GIL
    pure = min(1.0, probe.cpu_s / max(busy - probe.runq_s, 1e-9))
    item_ms, item_cpu_ms = 1e3 * probe.busy_s / items, 1e3 * probe.cpu_s / items
    elapsed = max(probe.elapsed_s, 1e-9)
    consumer_bound = (probe.blocked_s / elapsed < CONSUMER_WAITED
                      and probe.held_s / (probe.workers * elapsed) > RING_HELD)
    if consumer_bound:
        count, reason = probe.workers, "consumer-bound: the caller hardly waited while the ring was full"
    else:
        count = min(limit, max(1, math.ceil(0.9 * cpus / share)))
        reason = "CPU-bound" if count <= math.ceil(cpus) else "I/O-bound"
    if consumer_bound:
        chosen, threads = current, "consumer-bound: the pool stays as it is"
    elif backend == "thread":
        chosen, threads = "thread", "backend='thread' was asked for"
    elif backend == "process":
        chosen, threads = "process", "backend='process' was asked for"
    elif not allowed:
        chosen, threads = "process", ("threads not allowed: declare thread_safe = True on the source "
                                      "(and the transform) to let auto use them")
    elif reason == "I/O-bound" and count * pure <= GIL_ROOM:
        chosen, threads = "thread", f"thread_safe declared, and {count} workers need {count * pure:.2f} CPUs of Python"
    else:
        chosen, threads = "process", f"{count} workers need {count * pure:.2f} CPUs: more than one GIL gives"
    if chosen == "process" and process_bytes and room is not None and not consumer_bound:
        fit = (probe.workers if current == "process" else 0) + int(PROCESS_SHARE * room // process_bytes)
        if fit < count:
            count = max(1, fit)
            reason += f", {count} processes of {process_bytes / 2**20:.0f} MiB fit in memory"
    return Decision(count, chosen, reason, share, item_ms, item_cpu_ms, limit, threads)


def _schedstat(pid: int, tid: int) -> tuple[float, float] | None:
    """(CPU seconds, seconds waiting for a CPU) of one thread, from the kernel's schedstat."""
    path = f"/proc/{pid}/task/{tid}/schedstat"
    try:
        with open(path) as f:
            run, delay, _ = f.read().split()
        return int(run) / 1e9, int(delay) / 1e9
    except (OSError, ValueError):
        return None


def _private_bytes(pid: int) -> int | None:
    """A process's private resident memory (``RssAnon``): what one more such process costs."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Tuner:
    """Runs the probe from the scheduler's dispatches and returns its decision once.

    Called by the thread driving the loader's scheduler only (:meth:`step`); ``summary``,
    ``log_line`` and ``report`` may be read from any thread (they read fields that are
    replaced whole).

    Args:
        plan: the limit, the starting pool and what threads are allowed.
    """

    def __init__(self, plan: AutoPlan) -> None:
        self.budget, self.limit, self.limit_why = plan.budget, plan.limit, plan.limit_why
        self.asked, self.allowed = plan.asked, plan.allowed
        self.workers, self.backend = plan.first
        self.decision: Decision | None = None
        self.probe: Probe | None = None
        self.process_bytes: int | None = None
        self.room: int | None = None
        self._born = time.perf_counter()
        self._next_check = 0.0
        self._start: tuple[float, np.ndarray, float, float, float] | None = None
        self._probed_on = plan.first[1]

    def step(self, board: Board, blocked_s: float, held_s: float, pids: list[int]) -> Decision | None:
        """Measure when due; once the probe has seen enough, the pool to run (else ``None``).

        Args:
            board: the workers' accounting rows.
            blocked_s, held_s: the scheduler's totals so far (the caller blocked; workers
                held back by a full ring).
            pids: the worker processes now (one is measured for its memory).
        """
        now = time.perf_counter()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_S
        table = board.table()
        rows = table[: self.workers]
        if self._start is None:
            if (rows[:, _F["batches"]] >= 1).all() or now - self._born >= WARM_MAX_S:
                self._start = (now, table, self._runq(table), blocked_s, held_s)
            return None
        began, first, runq0, blocked0, held0 = self._start
        delta = table - first
        batches = float(delta[: self.workers, _F["batches"]].sum())
        totals = worker_totals(delta)
        busy = totals["read_s"] + totals["transform_s"] + totals["write_s"]
        elapsed = now - began
        enough = busy >= PROBE_BUSY_S * self.workers and batches >= self.workers
        if not (enough or (batches >= 1 and elapsed >= PROBE_MAX_S) or now - self._born >= GIVE_UP_S):
            return None
        if batches < 1:  # nothing finished since the first batches: decide from everything so far
            delta, elapsed = table, now - self._born
            totals = worker_totals(delta)
            busy = totals["read_s"] + totals["transform_s"] + totals["write_s"]
            runq0 = 0.0
        cpu = totals["read_cpu_s"] + totals["transform_cpu_s"] + totals["write_cpu_s"]
        runq = max(0.0, self._runq(table) - runq0)
        self.probe = Probe(self.workers, elapsed, totals["items_read"], busy, cpu, min(runq, busy),
                           blocked_s - blocked0, held_s - held0)
        self.room = available_bytes(True)[0]
        self.process_bytes = _private_bytes(pids[0]) if pids else None
        if self.probe.items == 0:
            decision = Decision(self.workers, self.backend, f"no item finished in {elapsed:.1f} s: kept",
                                1.0, 0.0, 0.0, self.limit, "not measured")
        else:
            decision = decide(self.probe, self.budget.cpus, self.limit, backend=self.asked,
                              allowed=self.allowed, current=self.backend,
                              process_bytes=self.process_bytes, room=self.room)
        self._probed_on = self.backend
        self.decision = decision
        self.workers, self.backend = decision.workers, decision.backend
        log.info("%s", self.log_line())
        return decision

    def _runq(self, table: np.ndarray) -> float:
        total = 0.0
        for row in table[: self.workers]:
            pid, tid = int(row[_F["pid"]]), int(row[_F["thread"]])
            if pid and tid:
                stat = _schedstat(pid, tid)
                if stat is not None:
                    total += stat[1]
        return total

    def summary(self) -> str:
        """For ``repr``: what was picked, in a few words."""
        if self.decision is None:
            return (f"workers='auto' → probing with {self.workers} {self.backend} workers "
                    f"(up to {self.limit} on {self.budget.cpus:g} CPUs)")
        d = self.decision
        return (f"workers='auto' → {d.workers} {d.backend} workers ({d.reason.split(':')[0]}, "
                f"CPU share {d.cpu_share:.2f}, {self.budget.cpus:g} CPUs, up to {d.limit})")

    def log_line(self) -> str:
        d, p = self.decision, self.probe
        assert d is not None and p is not None
        memory = (f"; {self.room / 2**30:.1f} GiB available" if self.room is not None else "") + (
            f", {self.process_bytes / 2**20:.0f} MiB per worker process" if self.process_bytes else "")
        return (f"workers='auto': {d.workers} {d.backend} workers — {d.reason}; CPU share of an item "
                f"{d.cpu_share:.2f} ({d.item_ms:.2f} ms wall, {d.item_cpu_ms:.2f} ms CPU, "
                f"{1e3 * p.runq_s / max(p.items, 1):.2f} ms waiting for a CPU) over {p.items:.0f} items in "
                f"{p.elapsed_s:.2f} s on {p.workers} {self._probed_on} "
                f"workers; {self.budget}; up to {d.limit} ({self.limit_why}); {d.threads}{memory}")

    def report(self) -> dict[str, Any]:
        """``stats()["auto"]``: the decision and the numbers behind it."""
        out: dict[str, Any] = {"decided": self.decision is not None, "cpus": self.budget.cpus,
                               "cpus_from": str(self.budget), "limit": self.limit, "limit_why": self.limit_why,
                               "asked_backend": self.asked, "threads_allowed": self.allowed,
                               "process_bytes": self.process_bytes, "room_bytes": self.room}
        if self.probe is not None:
            out["probe"] = asdict(self.probe)
        if self.decision is not None:
            out.update(asdict(self.decision))
        else:
            out.update(workers=self.workers, backend=self.backend)
        return out

