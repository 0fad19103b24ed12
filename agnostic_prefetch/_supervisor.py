"""Watching workers: results, deaths, hangs and wake-ups in one selector; the wording of failures.

The loader waits in :meth:`Supervisor.wait`, blocked in one ``select`` over every worker's
result pipe, every process's pidfd and a wake-up pipe. So it uses no CPU while it waits, it
notices a dead worker at once, and whoever must interrupt the wait (``close()`` or
``cancel()`` from another thread) writes one byte to the wake-up pipe instead of the waiter
polling for it. Two documented exceptions wake it on a timer: to look at the workers'
progress counters (``_progress.py``: a quarter of ``stall_warning``, 15 s by default, or of
``timeout``; the counters live in shared memory, which no descriptor signals), and an OS
without pidfds, where dead processes are looked for every 0.1 s.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import sys
import time
import traceback

from agnostic_prefetch._messages import Failed, Message, StartFailed, decode
from agnostic_prefetch._pool import InProcessWorker, Worker
from agnostic_prefetch.errors import LoaderTimeoutError, WorkerDiedError, WorkerError

_NO_PIDFD_POLL_S = 0.1
_SIGNALS_S = 1.0  # the longest a wait lasts: signal handlers run once it returns
_WAKE = "wake"


class Supervisor:
    """The selector every wait for workers blocks in.

    Args:
        workers: the loader's workers (an in-process worker is run instead of waited for).
        period: seconds between wake-ups to look at the workers' progress (``_progress.py``), or ``None``.
    """

    def __init__(self, workers: list[Worker], period: float | None) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, (None, _WAKE))
        self._local = [w for w in workers if isinstance(w, InProcessWorker)]
        self._poll_for_deaths = False
        self._progress_period = period
        self._workers: list[Worker] = []
        for w in workers:
            self.add(w)

    def add(self, w: Worker) -> None:
        """Watch one more worker (a pool that grows: ``workers="auto"``)."""
        if w.results is not None:
            self.selector.register(w.results, selectors.EVENT_READ, (w, "results"))
        if w.sentinel is not None:
            self.selector.register(w.sentinel, selectors.EVENT_READ, (w, "sentinel"))
        elif w.process is not None:
            self._poll_for_deaths = True
        self._workers.append(w)
        # Wake often enough to see a stalled progress counter in time (timeout=, stall_warning=),
        # and to run a Ctrl-C's handler: the kernel may deliver SIGINT to another thread of the
        # process (a BLAS thread), and Python runs handlers in the main thread only once its
        # wait returns.
        periods = [p for p in (self._progress_period, _SIGNALS_S,
                               _NO_PIDFD_POLL_S if self._poll_for_deaths else None) if p]
        self._period = min(periods)

    def remove(self, w: Worker) -> None:
        """Stop watching a worker that is retired: its exit is expected, not a failure."""
        for fileobj in (w.results, w.sentinel):
            if fileobj is not None:
                try:
                    self.selector.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
        if w in self._workers:
            self._workers.remove(w)

    def wake(self) -> None:
        """Make a wait in progress (in any thread) return at once; safe from any thread."""
        fd = self._wake_w
        if fd < 0:
            return  # closed: nobody waits (and the number may belong to another file by now)
        try:
            os.write(fd, b"!")
        except (BlockingIOError, OSError):
            pass  # a byte is already waiting, or the pipe is closed: either way nobody sleeps

    def wait(self) -> tuple[list[tuple[Worker, Message]], list[Worker]]:
        """Block until a worker reports or dies, a wake-up, or the period; return the reports
        and the workers that died (after their last reports: one that answered, then died,
        has its answer taken in).

        An in-process worker with an order is run now instead, in this thread.
        """
        for w in self._local:
            if w.has_work:
                return [(w, w.run_next())], []
        events = self.selector.select(self._period)
        messages = []
        dead: list[Worker] = []
        for key, _ in events:
            worker, kind = key.data
            if kind == _WAKE:
                self._drain_wake()
            elif kind == "results" and worker not in dead:
                try:
                    messages.append((worker, decode(worker.results.recv())))
                except (EOFError, OSError):
                    dead.append(worker)
        for key, _ in events:
            worker, kind = key.data
            if kind == "sentinel" and worker not in dead and exit_reason(worker) is not None:
                dead.append(worker)
        if not events and self._poll_for_deaths:
            dead += [w for w in self._workers if w.process is not None and exit_reason(w) is not None]
        return messages, dead

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        fds = (self._wake_r, self._wake_w)
        self._wake_r = self._wake_w = -1
        self.selector.close()
        for fd in fds:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass


def exit_reason(worker: Worker) -> str | None:
    """Why a worker ended, or ``None`` while it runs."""
    if worker.process is None:
        return None if worker.thread is None or worker.thread.is_alive() else "thread ended"
    code = worker.process.poll()
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


def died(worker: Worker, remedy: str | None = None) -> WorkerDiedError:
    """The error for a worker that ended, or closed its pipe, while the loader needed it."""
    return WorkerDiedError(
        f"{worker.describe()} {final_reason(worker)} unexpectedly while loading. The loader has "
        f"stopped; {remedy or 'build a new one to continue (load_state_dict resumes exactly)'}."
    )


def final_reason(worker: Worker) -> str:
    """Why a worker that is gone (or closed its pipe) ended; a process still running is killed."""
    reason = exit_reason(worker)
    if worker.process is not None and reason is None:
        try:
            worker.process.wait(1.0)  # the pipe closed first: the exit status follows shortly
        except Exception:
            worker.process.kill()  # alive without its pipe: of no use, and must not linger
            worker.process.wait()
        reason = exit_reason(worker) or "closed its pipe"
    return reason or "ended"


def failed_to_start(worker: Worker, message: StartFailed) -> WorkerError:
    tb = message.traceback
    error = WorkerError(f"{worker.describe()} failed to start: {message.description}\n\nWorker traceback:\n{tb}",
                        index=None, epoch=-1, batch=-1, worker_traceback=tb)
    error.__cause__ = message.exception
    return error


def record_failed(worker: Worker, message: Failed, epoch: int, number: int) -> WorkerError:
    """The error for a ``Failed`` report: the record (and where it comes from), batch, epoch,
    worker, cause, and a remedy that fits: the source's own, or skipping bad records — but
    not for a record whose shape or structure differs, which every such record would repeat."""
    index, exc, description, tb = message.index, message.exception, message.description, message.traceback
    where = f"record {index}" if index is not None else "a batch"
    if message.where:
        where += f" ({message.where})"
    if message.remedy:
        remedy = f"Remedy: {message.remedy}."
    elif description.startswith("LayoutError"):
        remedy = ""  # its message names the remedy
    else:
        remedy = "Use on_error='skip' to leave bad records out (they are counted in stats()['skipped'])."
    error = WorkerError(
        f"{where} (epoch {epoch}, batch {number}) failed in {worker.describe()}: {description}\n\n"
        f"Worker traceback:\n{tb}\n{remedy}".rstrip(), index=index, epoch=epoch, batch=number,
        worker_traceback=tb)
    if exc is not None:
        error.__cause__ = exc
    return error


def hung(worker: Worker, stalled_s: float, timeout: float, index: int | None, where: str | None,
         epoch: int, number: int) -> LoaderTimeoutError:
    """The error for a worker without progress for ``timeout``: the record (``None``: a batch
    of padding only), where it comes from, and the worker's stack."""
    return LoaderTimeoutError(
        f"{worker.describe()} made no progress for {stalled_s:.1f} s (timeout={timeout}) on "
        f"{_on(index, where)} of batch {number}, epoch {epoch}. Its stack:\n{stack_of(worker)}\n"
        "Raise timeout= if records are this slow, or fix the source where it blocks."
    )


def stalled(worker: Worker, stalled_s: float, after: float, index: int | None, where: str | None,
            epoch: int, number: int) -> str:
    """The warning for a worker without progress for ``stall_warning`` seconds (once per stall)."""
    return (
        f"{worker.describe()} has made no progress for {stalled_s:.0f} s on {_on(index, where)} of "
        f"batch {number}, epoch {epoch}; the loader keeps waiting (stall_warning={after:g}; "
        f"timeout= makes a stall an error). Its stack:\n{stack_of(worker)}")


def _on(index: int | None, where: str | None) -> str:
    if index is None:
        return "a batch of padding only"
    return f"record {index}" + (f" ({where})" if where else "")


def stack_of(worker: Worker) -> str:
    """The worker's current Python stack, for a hung-worker report."""
    if worker.thread is not None:
        frame = sys._current_frames().get(worker.thread.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
    stack_fd = getattr(worker, "stack_fd", None)
    if worker.process is None or stack_fd is None or worker.process.poll() is not None:
        return "(process gone)"
    os.kill(worker.process.pid, signal.SIGUSR1)  # the worker's faulthandler writes its stacks
    chunks: list[bytes] = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stack_fd], [], [], 0.2)
        if not ready:
            if chunks:
                break
            continue
        chunk = os.read(stack_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace") or "(the worker did not answer SIGUSR1)"

