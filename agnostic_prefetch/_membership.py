"""Pool membership: which workers a loader has, and whether each serves, starts, retires or is done.

The one owner of that state. With a fixed worker count every worker serves from the start
and stays until close; with ``workers="auto"`` the scheduler applies the tuner's decision
through :meth:`Membership.resize`: new workers start (watched at once, given orders once they
serve) and others retire (no new orders; told to exit once their orders are answered).
"""

from __future__ import annotations

from collections.abc import Callable

from agnostic_prefetch import _pool
from agnostic_prefetch._supervisor import Supervisor

# Starts ``count`` workers of a backend with ids from ``first_id`` (``_pool.start`` with the
# loader's job, ring and orders per worker bound).
Spawn = Callable[[int, str, int], list[_pool.Worker]]


class Membership:
    """The loader's workers by state, and the supervisor that watches them.

    Only the thread driving the scheduler calls these methods (or ``close()``, once it
    holds the drive), so no lock guards the lists.

    Args:
        workers: the started workers (``_pool.start``).
        backend: their backend (``"process"`` or ``"thread"``; ignored for the in-process one).
        spawn: starts more workers (``workers="auto"``), or ``None`` for a fixed pool.
        period: seconds between the supervisor's wake-ups to look at progress, or ``None``.

    Attributes:
        serving: workers that take new orders (dispatch picks among these).
        starting, retiring: workers started and not yet serving; workers that get no new
            orders and are let go once theirs are answered (read them; only the methods
            here change them).
        count, backend: the pool as it is meant to be now: the configured one, or the
            tuner's decision once applied (0 for the in-process worker).
        supervisor: the selector every wait for workers blocks in.
    """

    def __init__(self, workers: list[_pool.Worker], backend: str, spawn: Spawn | None,
                 period: float | None, start: Spawn | None = None) -> None:
        self.serving: list[_pool.Worker] = list(workers)
        self.starting: list[_pool.Worker] = []  # watched; given orders once their row says they serve
        self.retiring: list[_pool.Worker] = []  # no new orders; let go once their orders are answered
        self._retired: list[_pool.Worker] = []  # told to exit; reaped at close
        in_process = any(isinstance(w, _pool.InProcessWorker) for w in workers)
        self.count = 0 if in_process else len(workers)
        self.backend = backend
        self._spawn = spawn
        self._start = start  # starts a worker of a given id: a replacement (None: none are made)
        self._next_id = len(workers)  # ids are rows of the accounting block: never reused
        self.supervisor = Supervisor(workers, period)

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes that serve or start now."""
        return [w.process.pid for w in (*self.serving, *self.starting) if w.process is not None]

    @property
    def watched(self) -> tuple[_pool.Worker, ...]:
        """Workers that may be filling an order: those serving and those retiring."""
        return (*self.serving, *self.retiring)

    def admit(self, serves: Callable[[int], bool]) -> None:
        """Give orders from now on to the starting workers whose row says they serve (or to
        all of them when no worker serves: someone must fill the next batch)."""
        ready = [w for w in self.starting if not self.serving or serves(w.worker_id)]
        if ready:
            self.starting = [w for w in self.starting if w not in ready]
            self.serving += ready

    def resize(self, count: int, backend: str) -> None:
        """Make the pool ``count`` workers of ``backend``: start the missing ones, retire the rest.

        Raises:
            RuntimeError: the pool is fixed (no ``spawn``).
            OSError, ...: whatever starting a worker raised (the workers started before it
                are watched, so close() stops them).
        """
        if self._spawn is None:
            raise RuntimeError("this loader's pool is fixed; only workers='auto' resizes it")
        current = list(self.serving)
        keep = current[:count] if backend == self.backend else []
        self.count, self.backend = count, backend
        if count > len(keep):
            started = self._spawn(count - len(keep), backend, self._next_id)
            self._next_id += len(started)
            for worker in started:
                self.supervisor.add(worker)
            self.starting += started
        for worker in current:
            if worker not in keep:
                self._retire(worker)

    def replace(self, dead: _pool.Worker) -> _pool.Worker | None:
        """A new worker in ``dead``'s place (its id, so its accounting row and, for a stream, its
        part), or ``None`` for a retiring one; ``dead`` is let go (reaped at close).

        Raises:
            RuntimeError: no worker can be started here (no ``start``).
            OSError, ...: whatever starting it raised.
        """
        if self._start is None:
            raise RuntimeError("this pool cannot start workers")
        self.supervisor.remove(dead)
        self._retired.append(dead)
        if dead in self.retiring:
            self.retiring.remove(dead)
            return None
        new = self._start(1, self.backend, dead.worker_id)[0]
        self.supervisor.add(new)
        group = self.serving if dead in self.serving else self.starting
        group[group.index(dead)] = new
        return new

    def answered(self, worker: _pool.Worker) -> None:
        """``worker`` answered an order: a retiring one with nothing left is let go (the
        scheduler calls this only while some worker retires)."""
        if not worker.outstanding and worker in self.retiring:
            self.retiring.remove(worker)
            self._let_go(worker)

    def _retire(self, worker: _pool.Worker) -> None:
        self.serving.remove(worker)
        if worker.outstanding:
            self.retiring.append(worker)
        else:
            self._let_go(worker)

    def _let_go(self, worker: _pool.Worker) -> None:
        # End of file on its order pipe makes it exit; its exit is no failure now, so it
        # leaves the selector first. It is reaped (and its pipes closed) at close.
        self.supervisor.remove(worker)
        if isinstance(worker, _pool.WorkerHandle):
            _pool.close_quietly(worker.orders)
        self._retired.append(worker)

    def stop(self, grace: float) -> bool:
        """Stop every worker and the supervisor; whether all of those that ran in this
        process (threads, the in-process worker) have ended."""
        workers = [*self.serving, *self.starting, *self.retiring, *self._retired]
        self.serving, self.starting, self.retiring, self._retired = [], [], [], []
        _pool.stop(workers, grace)
        self.supervisor.close()
        return not any(w.thread is not None and w.thread.is_alive() for w in workers)
