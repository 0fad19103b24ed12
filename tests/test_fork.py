"""os.fork() of a process that holds a live loader: the child cannot load from it (a clear
LoaderError), and nothing the child does or its exit disturbs the parent's workers or ring."""

from __future__ import annotations

import functools
import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable

import pytest
import stream_sources as ss
from concurrent_sources import note_clean_exit, numbered, rows, with_draw
from sources_for_tests import OnHost

import agnostic_prefetch as ap
from agnostic_prefetch.errors import LoaderError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")

BACKENDS = [("process", 2), ("thread", 2), ("process", 0)]
IDS = ["processes", "threads", "workers=0"]


def build(workers: int = 2, backend: str = "process", epochs: int = 1) -> ap.Loader:
    return ap.Loader(numbered(90), 4, workers=workers, backend=backend, shuffle=True, seed=7,
                     epochs=epochs, transform=with_draw, stall_warning=None)


def alone(epochs: int = 1) -> list[tuple[int, float]]:
    """What the loader gives when nothing else happens (the in-process path: the same contents)."""
    with build(0, epochs=epochs) as loader:
        return rows(loader)


def in_child(check: Callable[[], None], seconds: float = 30.0) -> None:
    """Run ``check`` in a forked child, which then ends with ``os._exit``; fail with the
    child's traceback if it raised, or if it did not end within ``seconds`` (it is killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            check()
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    report, deadline = b"", time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 0.1)
            if ready:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                report += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"the child ended with status {status}:\n{report.decode(errors='replace') or '(hung: killed)'}")


@pytest.mark.parametrize(("backend", "workers"), BACKENDS, ids=IDS)
def test_a_forked_child_cannot_load_from_its_parents_loader_and_the_parent_goes_on(backend, workers):
    expected = alone()
    held = {"loader": build(workers, backend)}
    held["it"] = iter(held["loader"])
    got = rows(next(held["it"]) for _ in range(3))
    pids, state, parent = held["loader"].worker_pids, held["it"].state_dict(), os.getpid()

    def child() -> None:
        loader, it = held["loader"], held["it"]
        refused = {"next()": lambda: next(it), "iter()": lambda: iter(loader),
                   "load_state_dict()": lambda: loader.load_state_dict(state),
                   "the iterator's load_state_dict()": lambda: it.load_state_dict(state)}
        for use in refused.values():
            with pytest.raises(LoaderError, match=f"belongs to process {parent}.*Build a new Loader"):
                use()
        assert it.state_dict() == state and loader.state_dict() == state  # reading is allowed
        assert loader.stats()["batches"] == 3
        loader.close()  # does nothing to the parent's
        it.cancel()
        refused.clear()
        held.clear()
        loader = it = None
        gc.collect()  # the child's copy is collected: its finalizer must not stop the workers

    in_child(child)
    with held["loader"]:
        assert held["loader"].worker_pids == pids
        got += rows(held["it"])
    assert got == expected


def test_the_remedy_a_new_loader_in_the_child_continues_from_the_parents_state():
    expected = alone()
    with build() as loader:
        it = iter(loader)
        got = rows(next(it) for _ in range(5))
        state = it.state_dict()

        def child() -> None:
            with build() as own:
                own.load_state_dict(it.state_dict())
                assert got + rows(own) == expected

        in_child(child)
        assert got + rows(it) == expected
        assert it.state_dict() != state


@pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])
def test_a_prefetcher_in_a_forked_child_refuses_at_once_and_the_parents_goes_on(thread):
    expected = alone()
    with build() as loader, ap.Prefetcher(loader, 2, OnHost(), thread=thread) as stage:
        got = rows([next(stage)])

        def child() -> None:
            # Its thread does not exist here: waiting for it would never end.
            with pytest.raises(LoaderError, match="belongs to process .*Build a new Loader and a new prefetcher"):
                next(stage)
            with pytest.raises(LoaderError, match="belongs to process"):
                stage.load_state_dict(loader.state_dict())
            assert stage.state_dict() is not None
            stage.close()

        in_child(child, seconds=10)
        got += rows(stage)
    assert got == expected


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_child_alive_while_the_parent_closes_holds_none_of_the_workers_pipes_open(backend, tmp_path):
    """A worker exits on end of file of its order pipe, which comes only once every copy of
    the write end is closed: a child that lives on must not hold one (else close() kills
    worker processes after its grace, and worker threads never end)."""
    release_r, release_w = os.pipe()
    started_r, started_w = os.pipe()
    earlier = set(threading.enumerate())  # (a worker thread of an earlier test, stuck in a record, is not this one)
    noted = functools.partial(note_clean_exit, str(tmp_path)) if backend == "process" else None
    loader = ap.Loader(numbered(90), 4, workers=2, backend=backend, stall_warning=None, worker_init=noted)
    next(iter(loader))
    pid = os.fork()
    if pid == 0:
        os.write(started_w, b"!")
        os.read(release_r, 1)  # lives on, holding whatever the fork gave it
        os._exit(0)
    try:
        os.read(started_r, 1)
        loader.close()
        deadline = time.monotonic() + 10  # a busy machine: a thread in a batch ends after it
        while True:
            workers = [t.name for t in threading.enumerate()
                       if t not in earlier and t.name.startswith("agnostic_prefetch-worker")]
            if not workers or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        os.write(release_w, b"!")
        os.waitpid(pid, 0)
        for fd in (release_r, release_w, started_r, started_w):
            os.close(fd)
    if backend == "thread":
        assert workers == []  # they saw end of file and ended
    else:
        assert sorted(os.listdir(tmp_path)) == ["0", "1"], "a worker was killed: it saw no end of file"


_NORMAL_EXIT = textwrap.dedent("""
    import os, sys
    sys.path[:0] = {paths!r}
    from concurrent_sources import note_clean_exit, numbered, rows, with_draw
    from sources_for_tests import OnHost
    import agnostic_prefetch as ap

    def build(workers, **more):
        return ap.Loader(numbered(90), 4, workers=workers, backend={backend!r}, shuffle=True, seed=7,
                         transform=with_draw, stall_warning=None, **more)

    with build(0) as alone:
        expected = rows(alone)
    loader = build(2, trace={trace!r})  # written when the loader is closed, and only then
    stage = ap.Prefetcher(loader, 2, OnHost())
    got = rows([next(stage), next(stage)])
    pids = loader.worker_pids
    if os.fork() == 0:
        sys.exit(0)  # a normal exit: atexit, finalizers, the collection at shutdown
    os.wait()
    assert not os.path.exists({trace!r}), "the child's exit closed the parent's loader"
    got += rows(stage)
    assert loader.worker_pids == pids
    assert got == expected, "the parent's batches changed"
    stage.close()
    loader.close()
    assert os.path.exists({trace!r})
    print("parent ok")
""")


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_child_that_exits_normally_releases_nothing_of_the_parents(backend, tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    script = _NORMAL_EXIT.format(paths=[here, os.path.dirname(here)], backend=backend,
                                 trace=str(tmp_path / "trace.json"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "parent ok" in done.stdout, done.stderr


def test_a_loader_over_a_stream_is_refused_in_a_forked_child_too():
    def stream_loader() -> ap.Loader:
        return ap.Loader(ap.Stream(ss.stateful((9, 7))), 2, workers=2, stall_warning=None)

    with stream_loader() as loader:
        expected = [b["x"].tolist() for b in loader]
    with stream_loader() as loader:
        it = iter(loader)
        got = [next(it)["x"].tolist() for _ in range(2)]

        def child() -> None:
            for use in (lambda: next(it), lambda: iter(loader), lambda: loader.load_state_dict(loader.state_dict())):
                with pytest.raises(LoaderError, match="belongs to process .*Build a new Loader"):
                    use()

        in_child(child)
        got += [b["x"].tolist() for b in it]
    assert got == expected
