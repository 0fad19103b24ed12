"""One LMDB environment per database and process, shared and counted (py-lmdb allows one).

py-lmdb refuses to open one environment twice in a process, yet several sources (train and
val views, an unpickled copy, thread-backend workers) may read one database. So each process
keeps one environment per database; the last user closes it. A forked child closes what it
inherited.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import lmdb

__all__ = ["acquire_env", "release_env"]

_envs: dict[tuple[int, str], list[Any]] = {}
# Reentrant: a source's finalizer (release_env) can run inside acquire_env on the same thread,
# whenever the collector runs there (lmdb.open allocates), and would otherwise wait on itself.
_envs_lock = threading.RLock()


def acquire_env(path: str, *, subdir: bool, readahead: bool) -> Any:
    """This process's read-only environment of ``path`` (opened on first use), counted.

    Raises:
        FileNotFoundError: no database there; RuntimeError: opened outside this registry.
    """
    key = (os.getpid(), os.path.realpath(path))
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            try:
                env = lmdb.open(
                    path,
                    subdir=subdir,
                    readonly=True,
                    lock=False,  # read-only: no lock file, no reader table to exhaust
                    readahead=readahead,
                    meminit=False,
                    max_readers=2048,
                    create=False,
                )
            except lmdb.Error as exc:
                if "already open" in str(exc):
                    raise RuntimeError(
                        f"the LMDB database at {path!r} is already open in this process outside "
                        "agnostic_prefetch (an lmdb.open() of your own, say), and py-lmdb allows one "
                        "environment per path and process. Close that environment before the source "
                        "reads (the Loader's workers open their own), or read through the source."
                    ) from None
                raise FileNotFoundError(
                    errno.ENOENT, f"cannot open the LMDB database at {path!r}: {exc}. Point to an "
                    "LMDB (the directory agnostic-prefetch convert or write_array_records wrote)",
                    path) from None
            entry = _envs[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def release_env(path: str, pid: int) -> None:
    """One user fewer of ``path``'s environment in process ``pid``; the last one closes it."""
    key = (pid, os.path.realpath(path))
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _envs[key]
            entry[0].close()  # also invalidates any transaction still open on it


def _close_inherited_envs() -> None:
    """In a forked child: close the parent's environments (LMDB handles must not cross a fork).

    py-lmdb would otherwise refuse to open the same path again in the child, and the lock
    may have been held by another parent thread at the moment of the fork.
    """
    global _envs_lock
    _envs_lock = threading.RLock()
    inherited = [env for env, _ in _envs.values()]
    _envs.clear()
    for env in inherited:
        try:
            env.close()  # read-only and lock=False: unmaps the child's copy, parent unaffected
        except lmdb.Error:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_envs)
