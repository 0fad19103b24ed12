"""The ring's descriptor and the workers' pipes reach our workers only: never an unrelated
process, never another worker, never a process a worker's source starts."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import combinations

import pytest
from concurrent_sources import LIST_OWN_DESCRIPTORS, ListsItsSubprocessDescriptors, links, numbered

import agnostic_prefetch as ap

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/<pid>/fd")


def ours(target: str) -> bool:
    return target.startswith("pipe:") or "agnostic_prefetch" in target


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_an_unrelated_subprocess_inherits_no_descriptor_of_a_running_loader(backend):
    before = set(links().values())
    with ap.Loader(numbered(64), 4, workers=2, backend=backend) as loader:
        it = iter(loader)
        next(it)  # mid-epoch: orders out, batches in the ring
        loader_fds = {t for t in links().values() if ours(t)} - before
        assert any("agnostic_prefetch" in t for t in loader_fds)  # the ring, by descriptor
        # close_fds=False: the child gets every descriptor that is not close-on-exec.
        listing = subprocess.run([sys.executable, "-c", LIST_OWN_DESCRIPTORS], close_fds=False,
                                 capture_output=True, text=True, check=True).stdout
        next(it)
    held = {line.split(" ", 1)[1] for line in listing.splitlines()}
    assert not held & loader_fds, f"an unrelated process holds the loader's {sorted(held & loader_fds)}"
    assert not [t for t in held if "agnostic_prefetch" in t]


def test_each_worker_holds_only_its_own_pipes_and_its_own_loaders_ring():
    with ap.Loader(numbered(64), 4, workers=2) as first, ap.Loader(numbered(64, 1), 4, workers=2) as second:
        next(iter(first)), next(iter(second))
        held = {pid: links(pid) for pid in first.worker_pids + second.worker_pids}
    pipes = {pid: {t for fd, t in fds.items() if fd > 2 and t.startswith("pipe:")} for pid, fds in held.items()}
    rings = {pid: [t for t in fds.values() if "agnostic_prefetch" in t] for pid, fds in held.items()}
    for pid in held:
        assert len(pipes[pid]) == 3, f"worker {pid} holds {sorted(pipes[pid])}: its order, result and stack pipes only"
        assert len(rings[pid]) == 1, f"worker {pid} holds {rings[pid]}: its loader's ring only"
    for a, b in combinations(held, 2):
        assert not pipes[a] & pipes[b], f"workers {a} and {b} share {sorted(pipes[a] & pipes[b])}"


def test_workers_of_one_loader_map_one_ring_and_another_loaders_workers_another():
    with ap.Loader(numbered(64), 4, workers=2) as first, ap.Loader(numbered(64, 1), 4, workers=2) as second:
        next(iter(first)), next(iter(second))

        def ring_inode(pid: int) -> int:
            fd = next(fd for fd, t in links(pid).items() if "agnostic_prefetch" in t)
            return os.stat(f"/proc/{pid}/fd/{fd}").st_ino

        a = {ring_inode(pid) for pid in first.worker_pids}
        b = {ring_inode(pid) for pid in second.worker_pids}
    assert len(a) == 1 and len(b) == 1 and a != b


def test_a_process_that_a_workers_source_starts_inherits_none_of_the_workers_descriptors():
    source = ListsItsSubprocessDescriptors(2)
    with ap.Loader(source, 1, workers=1) as loader:
        counts = [(int(b["pipes"][0]), int(b["rings"][0])) for b in loader]
    # capture_output's own pipes are its stdout and stderr (descriptors 1 and 2): none beyond.
    assert counts == [(0, 0), (0, 0)], counts
