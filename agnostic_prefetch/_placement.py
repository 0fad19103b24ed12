"""What a prefetch stage asks of a framework: how one batch reaches a device (the placement protocol).

The stage (``_stage.py``, ``prefetch.py``) is written once; ``device.py`` (JAX) and
``adapters/`` (torch, CuPy) implement this protocol. Nothing here imports a framework.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Placement"]


class Placement(Protocol):
    """How one batch reaches a device. ``put`` runs in the stage's thread, the rest in the caller's.

    Optional, for ``stats()["transfer_s"]``: ``wait(token)`` blocks until the copy is
    complete (the stage's thread calls it right after ``put``), or ``transfer_time(token)``
    gives the seconds a copy took once ``done`` (CUDA timing events: nothing waits).

    Optional attribute ``aliases_host`` (default ``True``): whether the arrays handed out
    view the host batch (torch tensors and JAX arrays on the CPU do; CUDA copies do not).
    A placement that does not alias lets each host batch (its ring slot) go once its copy
    is done, so the stage and its caller hold few ring slots (``Prefetcher.held_at_peak``).
    Optional attribute ``copies_when_pressed`` (default ``False``): the stage may hand the
    placement a copy of a batch instead of the ring's views when its loader's ring runs
    short (JAX on the CPU, whose queued steps keep aliased batches alive).
    """

    def put(self, host: Any) -> tuple[Any, Any]:
        """Start moving ``host``; return the device tree and a token for :meth:`done`."""
        ...

    def hand_out(self, device: Any, token: Any) -> None:
        """Called in the caller's ``next()`` just before ``device`` is returned."""
        ...

    def done(self, token: Any) -> bool:
        """Whether the copy no longer reads the host batch (its ring slot may then be reused)."""
        ...

    def close(self) -> None:
        """Wait for pending copies and release what the placement holds (page-locking, streams)."""
        ...
