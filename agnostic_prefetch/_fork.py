"""Loaders across ``os.fork()``: in a forked child, every loader and prefetcher is the parent's.

A fork copies a Loader object into the child with the descriptors of the parent's workers
and ring, but not what makes it work: its workers answer the parent, and the threads that
drive it (a prefetch stage's, thread-backend workers) exist only there. Used in the child,
it would send orders to the parent's workers and take their results, write into slots the
parent's batches occupy (the ring is shared memory), or wait forever for a thread or a
lock of the parent's. Even closing it would harm the parent: the workers' selector is an
epoll set that parent and child share, and stopping the workers is the parent's call.

So, in a forked child (``os.register_at_fork``):

* an owner (a loader core, a prefetcher) refuses to load: :func:`check` raises
  :class:`~agnostic_prefetch.errors.LoaderError` naming the parent and the remedy;
* the finalizers :func:`adopt` was given are detached: the child's exit, garbage collection
  and ``close()`` stop nothing and release nothing of the parent's;
* what :func:`close_in_child` was given is closed there: the child's copies of pipe ends
  and of the ring's descriptor (a worker sees end of file on its order pipe only when every
  copy of its write end is closed, so a child that lives on must not hold one).

Nothing here takes a lock in the child: another thread of the parent may have held it.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from agnostic_prefetch.errors import LoaderError

__all__ = ["adopt", "check", "close_in_child", "pid"]

pid = os.getpid()  # this process; set again in a forked child (owners compare theirs to it)

# Finalizers to detach in a child. ``weakref.finalize`` objects take no weak reference, and
# a detached or called one holds nothing, so dead ones are kept until the next prune.
_finalizers: set[weakref.finalize] = set()
_prune_at = 64
_copies: weakref.WeakSet[Any] = weakref.WeakSet()  # objects whose close() lets go of the child's copy
_lock = threading.Lock()  # adopt() from several threads in the parent


def adopt(finalizer: weakref.finalize) -> int:
    """Detach ``finalizer`` in a forked child; return this process's id (its owner's)."""
    global _prune_at
    with _lock:
        if len(_finalizers) >= _prune_at:
            for dead in [f for f in _finalizers if not f.alive]:
                _finalizers.discard(dead)
            _prune_at = max(64, 2 * len(_finalizers))
        _finalizers.add(finalizer)
    return pid


def close_in_child(*objects: Any) -> None:
    """Call each object's ``close()`` in a forked child (a ``Connection``, a ``Ring``)."""
    for obj in objects:
        _copies.add(obj)


def check(owner_pid: int, what: str, remedy: str) -> None:
    """Raise unless the owner of ``owner_pid`` belongs to this process.

    Raises:
        LoaderError: ``what`` was copied into this process by a fork of its owner's; the
            message names both processes and ``remedy``.
    """
    if owner_pid != pid:
        raise LoaderError(
            f"this {what} belongs to process {owner_pid}, which forked this one (pid {pid}); its "
            f"workers, ring and threads serve that process, so it cannot load here. {remedy}. "
            "(close() here leaves the parent's alone.)")


def _after_fork_in_child() -> None:
    global pid, _lock
    pid = os.getpid()
    _lock = threading.Lock()
    # The set and the WeakSet were whole at the fork: the forking thread held the GIL.
    for finalizer in list(_finalizers):
        finalizer.detach()
    _finalizers.clear()
    for obj in list(_copies):
        try:
            obj.close()
        except (OSError, ValueError):
            pass
    _copies.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
