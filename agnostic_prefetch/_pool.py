"""Starting and stopping loader workers: fresh processes, threads, or the caller itself.

Processes are started fresh through the package's own entry point — never a fork of the
training process, whose JAX threads would not survive a fork, and never a re-run of the
user's script (the spawn ``__main__`` trap). The source and transform travel by value
(cloudpickle) together with the parent's ``sys.path`` and working directory. Workers live
in their own process group, so a Ctrl-C at the terminal reaches only the parent, which
owns shutdown.

All three kinds take orders through one interface (``send``); processes and threads answer
through a result pipe that ``_supervisor.py`` watches, while the in-process worker
(``workers=0``) fills an order only when the loader waits for it, in the waiting thread.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from agnostic_prefetch import _fork
from agnostic_prefetch._messages import Done, Failed
from agnostic_prefetch._orders import Order, pack_orders
from agnostic_prefetch._pickling import dumps
from agnostic_prefetch._ring import Ring
from agnostic_prefetch._stream_fill import StreamFiller, make_filler
from agnostic_prefetch._worker import ALLOCATOR_ENV_VARS, THREAD_ENV_VARS, Filler, Job, serve

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not `-m`: that puts the working directory first on sys.path, so a directory there named
# agnostic_prefetch (another checkout, say) would be what the worker runs.
_ENTRY = (f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
          "from agnostic_prefetch._worker_entry import main; main()")


class WorkerHandle:
    """One worker process or thread: its order and result pipes, and what tells that it ended.

    Attributes:
        capacity: orders it holds at once (one filling, the rest queued).
        on_demand: False: it fills orders by itself, ahead of the caller.
        outstanding: ids of the orders sent and not yet answered, oldest first.
        sentinel: a pidfd, readable when the process ends (``None`` for threads, or where
            the OS has no pidfd).
    """

    def __init__(self, worker_id: int, orders: Connection, results: Connection, capacity: int) -> None:
        self.worker_id = worker_id
        self.orders = orders
        self.results: Connection | None = results
        self.capacity = capacity
        self.on_demand = False
        self.outstanding: collections.deque[int] = collections.deque()
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.sentinel: int | None = None
        self.stack_fd: int | None = None

    def send(self, orders: list[Order]) -> None:
        """Hand over orders in one write (each write wakes the worker). Raises OSError if it died."""
        self.orders.send_bytes(pack_orders(orders))

    def describe(self) -> str:
        if self.process is not None:
            return f"worker {self.worker_id} (pid {self.process.pid})"
        return f"worker thread {self.worker_id}"


class InProcessWorker:
    """``workers=0``: the same filler, run by the thread that waits for a batch, one order at a time.

    It holds one order at most, and is given one only when no batch is ready (``on_demand``),
    so the caller fills exactly what it is about to take.
    """

    worker_id = 0
    capacity = 1
    on_demand = True
    results = None
    sentinel = None
    process = None
    thread = None

    def __init__(self, job: Job, ring: Ring) -> None:
        self.outstanding: collections.deque[int] = collections.deque()
        self._orders: collections.deque[Order] = collections.deque()
        self._filler: Filler | StreamFiller | None = make_filler(job, ring.slot_view, ring.extra_view(), 0,
                                                                 own_process=False)
        self._filler.always_flush = True
        if job.worker_init is not None:
            job.worker_init(0)

    def send(self, orders: list[Order]) -> None:
        self._orders.extend(orders)

    @property
    def has_work(self) -> bool:
        return bool(self._orders) and self._filler is not None

    def run_next(self) -> Done | Failed:
        """Fill the oldest order now, in this thread; return the worker's message."""
        assert self._filler is not None
        return self._filler.fill(self._orders.popleft())

    def describe(self) -> str:
        return "the caller (workers=0)"

    def stop(self) -> None:
        # Its slot writers view the ring: let go of them so the ring can be unmapped.
        self._filler = None
        self._orders.clear()


Worker = WorkerHandle | InProcessWorker


def start(count: int, backend: str, job: Job, ring: Ring, capacity: int, first_id: int = 0) -> list[Worker]:
    """``count`` workers of ``backend`` (``"process"`` or ``"thread"``), with ids (accounting
    rows) from ``first_id`` on; 0 gives the in-process one."""
    if count == 0:
        return [InProcessWorker(job, ring)]
    if backend == "thread":
        return _start_threads(count, job, ring, capacity, first_id)
    return _start_processes(count, job, ring, capacity, first_id)


def _start_processes(count: int, job: Job, ring: Ring, capacity: int, first_id: int) -> list[Worker]:
    payload = dumps(job)
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env.setdefault(var, "1")
    if not any(var in env for var in ALLOCATOR_ENV_VARS):
        env.update(ALLOCATOR_ENV_VARS)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    use_pdeathsig = threading.current_thread() is threading.main_thread()
    handles: list[Worker] = []
    try:
        for worker_id in range(first_id, first_id + count):
            order_r, order_w = os.pipe()
            result_r, result_w = os.pipe()
            stack_r, stack_w = os.pipe()
            env["AGNOSTIC_PREFETCH_WORKER_ID"] = str(worker_id)
            args = [order_r, result_w, stack_w, ring.fd, ring.nbytes, os.getpid(), int(use_pdeathsig)]
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", _ENTRY, *map(str, args)],
                    pass_fds=(order_r, result_w, stack_w, ring.fd),
                    env=env,
                    cwd=os.getcwd(),
                    stdin=subprocess.DEVNULL,
                    process_group=0,
                )
            finally:
                for fd in (order_r, result_w, stack_w):
                    os.close(fd)
            handle = WorkerHandle(worker_id, Connection(order_w, readable=False),
                                  Connection(result_r, writable=False), capacity)
            _fork.close_in_child(handle.orders, handle.results)  # a forked child's copies hold no pipe open
            handle.process = process
            handle.stack_fd = stack_r
            os.set_blocking(stack_r, False)
            handle.sentinel = _pidfd(process.pid)
            handles.append(handle)
        for handle in handles:
            assert isinstance(handle, WorkerHandle)
            handle.orders.send((list(sys.path), os.getcwd()))
            handle.orders.send_bytes(payload)
    except BaseException:
        stop(handles)
        raise
    return handles


def _pidfd(pid: int) -> int | None:
    """A descriptor readable when process ``pid`` ends, or ``None`` where the OS gives none
    (no ``pidfd_open``, or a kernel or seccomp filter that refuses it: ENOSYS, EPERM); the
    supervisor then looks for dead processes on a timer instead."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:
        return None


def _start_threads(count: int, job: Job, ring: Ring, capacity: int, first_id: int) -> list[Worker]:
    handles: list[Worker] = []
    for worker_id in range(first_id, first_id + count):
        order_r, order_w = os.pipe()
        result_r, result_w = os.pipe()
        handle = WorkerHandle(worker_id, Connection(order_w, readable=False),
                              Connection(result_r, writable=False), capacity)
        worker_orders, worker_results = Connection(order_r, writable=False), Connection(result_w, readable=False)
        _fork.close_in_child(handle.orders, handle.results, worker_orders, worker_results)
        filler = make_filler(job, ring.slot_view, ring.extra_view(), worker_id, own_process=False)

        def run(filler: Filler | StreamFiller = filler, o: Connection = worker_orders, r: Connection = worker_results,
                worker_id: int = worker_id) -> None:
            try:
                serve(filler, o, r, worker_id)
            finally:
                o.close()
                r.close()  # the parent sees end of file: a thread that ends is noticed at once

        handle.thread = threading.Thread(target=run, name=f"agnostic_prefetch-worker-{worker_id}", daemon=True)
        handle.thread.start()
        handles.append(handle)
    return handles


def stop(handles: list[Worker], grace: float = 0.5) -> None:
    """Stop workers: close their order pipes (end of file means exit), then kill stragglers.

    An idle worker exits within milliseconds of end of file; one busy in a record cannot
    notice it, and holds nothing worth waiting for, so it is killed after ``grace``.
    """
    for h in handles:
        if isinstance(h, InProcessWorker):
            h.stop()
        else:
            close_quietly(h.orders)
    deadline = time.monotonic() + grace
    for h in handles:
        if h.process is not None:
            try:
                h.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.process.kill()
                h.process.wait()
        elif h.thread is not None:
            # A thread stuck in user code cannot be stopped; it is a daemon and holds no pipe.
            h.thread.join(max(0.0, deadline - time.monotonic()))
    for h in handles:
        if isinstance(h, InProcessWorker):
            continue
        if h.results is not None:
            close_quietly(h.results)
        for fd in (h.sentinel, h.stack_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        h.sentinel = h.stack_fd = None


def close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except OSError:
        pass
