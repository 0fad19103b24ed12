"""Shared fixtures: every test must leave no worker process and no /dev/shm entry behind."""

from __future__ import annotations

import gc
import os
import time

import pytest


def worker_pids() -> list[int]:
    """Live loader worker processes started by this test process (direct children)."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] != me or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"agnostic_prefetch._worker_entry" in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if "agnostic_prefetch" in n}
    except FileNotFoundError:
        return set()


def pytest_collection_finish(session):
    # Once JAX and torch are imported, a full collection walks their millions of objects
    # (over 0.1 s each time). Nothing created while importing and collecting is ever
    # garbage the tests care about: leave it out of every later collection.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def no_leftovers():
    before = shm_entries()
    yield
    if not worker_pids() and shm_entries() <= before:
        return
    # Something is left: a loader dropped in a reference cycle stops its workers only when
    # the cycle is collected. Collect, and give the workers time to exit.
    gc.collect()
    deadline = time.monotonic() + 5
    while worker_pids() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not worker_pids(), f"worker processes left running: {worker_pids()}"
    assert shm_entries() <= before, f"left in /dev/shm: {shm_entries() - before}"


@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto) with one bucket; see tests/s3_server.py."""
    pytest.importorskip("moto.server", reason="the object-storage tests need moto[server] (the test extra)")
    pytest.importorskip("s3fs", reason="the object-storage tests need s3fs (the test extra)")
    from s3_server import s3_server

    with s3_server(monkeypatch) as server:
        yield server
