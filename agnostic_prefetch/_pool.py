"""Starting, watching and stopping loader workers (fresh processes, or threads).

Processes are started fresh through the package's own entry point — never a fork of the
training process, whose JAX threads would not survive a fork, and never a re-run of the
user's script (the spawn ``__main__`` trap). The source and transform travel by value
(cloudpickle) together with the parent's ``sys.path`` and working directory. Workers live
in their own process group, so a Ctrl-C at the terminal reaches only the parent, which
owns shutdown.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from agnostic_prefetch._ring import Ring
from agnostic_prefetch._worker import THREAD_ENV_VARS, Filler, Job, serve

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerHandle:
    """One worker: its pipes, and its process (or thread)."""

    def __init__(self, worker_id: int, orders: Connection, results: Connection) -> None:
        self.worker_id = worker_id
        self.orders = orders
        self.results = results
        self.outstanding: list[int] = []  # order ids sent and not yet answered, oldest first
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.sentinel: int | None = None  # a pidfd: readable when the process ends
        self.stack_fd: int | None = None

    def describe(self) -> str:
        if self.process is not None:
            return f"worker {self.worker_id} (pid {self.process.pid})"
        return f"worker thread {self.worker_id}"

    def exit_reason(self) -> str | None:
        """Why the process ended, or ``None`` while it runs."""
        if self.process is None:
            return None if self.thread is not None and self.thread.is_alive() else "thread ended"
        code = self.process.poll()
        if code is None:
            return None
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (SIGKILL is what the kernel's OOM killer sends: check memory)" if -code == signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        return f"exited with code {code}"

    def stack(self) -> str:
        """The worker's current Python stack, for a hung-worker report."""
        if self.thread is not None:
            frame = sys._current_frames().get(self.thread.ident or -1)
            import traceback

            return "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
        if self.process is None or self.stack_fd is None or self.process.poll() is not None:
            return "(process gone)"
        os.kill(self.process.pid, signal.SIGUSR1)
        chunks: list[bytes] = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.stack_fd], [], [], 0.2)
            if not ready:
                if chunks:
                    break
                continue
            chunk = os.read(self.stack_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace") or "(the worker did not answer SIGUSR1)"


def start_processes(count: int, job: Job, ring: Ring) -> list[WorkerHandle]:
    """Start ``count`` worker processes and send each the job; returns when all are started."""
    payload = cloudpickle.dumps(job)
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env.setdefault(var, "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    use_pdeathsig = threading.current_thread() is threading.main_thread()
    handles: list[WorkerHandle] = []
    try:
        for worker_id in range(count):
            order_r, order_w = os.pipe()
            result_r, result_w = os.pipe()
            stack_r, stack_w = os.pipe()
            env["AGNOSTIC_PREFETCH_WORKER_ID"] = str(worker_id)
            args = [order_r, result_w, stack_w, ring.fd, ring.nbytes, os.getpid(), int(use_pdeathsig)]
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "agnostic_prefetch._worker_entry", *map(str, args)],
                    pass_fds=(order_r, result_w, stack_w, ring.fd),
                    env=env,
                    cwd=os.getcwd(),
                    stdin=subprocess.DEVNULL,
                    process_group=0,
                )
            finally:
                for fd in (order_r, result_w, stack_w):
                    os.close(fd)
            handle = WorkerHandle(worker_id, Connection(order_w, readable=False), Connection(result_r, writable=False))
            handle.process = process
            handle.stack_fd = stack_r
            os.set_blocking(stack_r, False)
            handle.sentinel = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else None
            handles.append(handle)
        for handle in handles:
            handle.orders.send((list(sys.path), os.getcwd()))
            handle.orders.send_bytes(payload)
    except BaseException:
        stop(handles)
        raise
    return handles


def start_threads(count: int, job: Job, ring: Ring) -> list[WorkerHandle]:
    """Start ``count`` worker threads sharing this process's ring mapping."""
    handles = []
    for worker_id in range(count):
        order_r, order_w = os.pipe()
        result_r, result_w = os.pipe()
        handle = WorkerHandle(worker_id, Connection(order_w, readable=False), Connection(result_r, writable=False))
        worker_orders, worker_results = Connection(order_r, writable=False), Connection(result_w, readable=False)
        filler = Filler(job, ring.slot_view)

        def run(filler: Filler = filler, o: Connection = worker_orders, r: Connection = worker_results,
                worker_id: int = worker_id) -> None:
            try:
                serve(filler, o, r, worker_id)
            finally:
                o.close()
                r.close()

        handle.thread = threading.Thread(target=run, name=f"agnostic_prefetch-worker-{worker_id}", daemon=True)
        handle.thread.start()
        handles.append(handle)
    return handles


def stop(handles: list[WorkerHandle], grace: float = 0.5) -> None:
    """Stop workers: close their order pipes (end of file means exit), then kill stragglers.

    An idle worker exits within milliseconds of end of file; one busy in a record cannot
    notice it, and holds nothing worth waiting for, so it is killed after ``grace``.
    """
    for h in handles:
        _close_quietly(h.orders)
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
        _close_quietly(h.results)
        for fd in (h.sentinel, h.stack_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        h.sentinel = h.stack_fd = None


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except OSError:
        pass
