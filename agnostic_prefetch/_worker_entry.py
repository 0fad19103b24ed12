"""Entry point of a worker process: ``main()``, run by ``_pool`` with the descriptors as arguments.

A fresh interpreter (never a fork of the training process) that ignores SIGINT (the parent
owns shutdown), dies with its parent, receives the parent's ``sys.path``, working directory
and the cloudpickled job over its order pipe, maps the ring from the inherited descriptor,
and then serves orders like any other worker. A layout with ``ml_dtypes``' dtypes (bfloat16)
needs no import here: a dtype pickles as a reference to its scalar type, so unpickling the
job imports ``ml_dtypes``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib.abc
import importlib.util
import mmap
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from agnostic_prefetch._messages import StartFailed, encode
from agnostic_prefetch._stream_fill import make_filler
from agnostic_prefetch._worker import Job, picklable, serve


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)

    # PDEATHSIG follows the *thread* that started us, and is not everywhere; poll as well.
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` right after ``name`` is first imported (by the user's code)."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            loader, then = spec.loader, self.then
            run = loader.exec_module

            def exec_module(module: ModuleType) -> None:
                run(module)
                then(module)

            loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _one_torch_thread(torch: ModuleType) -> None:
    # As torch's own DataLoader workers: N workers of N threads each would oversubscribe the
    # CPUs. OMP_NUM_THREADS=1 (set unless the user set it) covers intra-op threads; the
    # inter-op pool must be sized before any parallel work, so right after the import.
    try:
        if "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == "1":
            torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    except (AttributeError, RuntimeError):
        pass  # another torch, or parallel work already started: leave it as it is


def main(argv: list[str] | None = None) -> None:
    """Run one worker process; the arguments are inherited descriptors and the parent pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    order_fd, result_fd, stack_fd, ring_fd, ring_bytes, parent_pid, use_pdeathsig = args
    for fd in (order_fd, result_fd, stack_fd, ring_fd):
        # pass_fds made them inheritable; a process the user's source starts must not hold
        # them (a helper that outlives this worker would keep its pipes open, and the ring).
        os.set_inheritable(fd, False)
    _die_with_parent(parent_pid, bool(use_pdeathsig))
    sys.meta_path.insert(0, _AfterImport("torch", _one_torch_thread))
    faulthandler.register(signal.SIGUSR1, file=os.fdopen(stack_fd, "w"), all_threads=True)
    orders = Connection(order_fd, writable=False)
    results = Connection(result_fd, readable=False)
    try:
        sys_path, cwd = orders.recv()
        sys.path[:] = sys_path
        os.chdir(cwd)
        job = _load_job(orders.recv_bytes())
    except (EOFError, OSError):
        return
    except BaseException as exc:
        results.send(encode(StartFailed(picklable(exc), f"could not unpickle the source/transform: "
                                        f"{type(exc).__name__}: {exc}", traceback.format_exc())))
        return
    ring = mmap.mmap(ring_fd, ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(ring_fd)
    slot_bytes = job.layout.slot_bytes
    view = memoryview(ring)

    worker_id = int(os.environ.get("AGNOSTIC_PREFETCH_WORKER_ID", "0"))
    filler = make_filler(job, lambda slot: view[slot * slot_bytes : (slot + 1) * slot_bytes],
                         view[job.board_offset :], worker_id, own_process=True)
    serve(filler, orders, results, worker_id)


def _load_job(payload: bytes) -> Job:
    import cloudpickle  # noqa: F401  (cloudpickle payloads unpickle with plain pickle once imported)

    return pickle.loads(payload)


if __name__ == "__main__":
    main()
