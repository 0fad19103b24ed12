"""Page-locking the loader's ring: find the mapping behind a batch, register it once.

A loader batch is a numpy view whose chain of ``.base`` ends in a memoryview of the ring's
``mmap``. Registering that whole mapping with the CUDA driver once (``cudaHostRegister``)
makes every later copy out of any slot a true asynchronous DMA; registering per batch would
cost a driver call per step and pin memory piecemeal.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("agnostic_prefetch")


def mapping_of(a: Any) -> mmap.mmap | None:
    """The open ``mmap`` a numpy array views (a loader ring), or None."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if isinstance(base, mmap.mmap) and not base.closed and len(base) > 0:
        return base
    return None


def _address(m: mmap.mmap) -> int:
    return np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data


class PinnedRegistry:
    """Mappings registered as page-locked by one stager; unregistered by :meth:`close`.

    Args:
        register: ``register(address, nbytes) -> error code`` (0 on success).
        unregister: ``unregister(address) -> error code``.

    A registration that fails is logged once and the stager copies from pageable memory
    instead: slower, never wrong. A registered mapping is kept mapped (the registry holds a
    view of it, so the loader's ``close()`` cannot unmap it) until :meth:`close` has
    unregistered it: CUDA must not keep page-locked memory that is gone.
    """

    def __init__(self, register: Callable[[int, int], int], unregister: Callable[[int], int]) -> None:
        self._register = register
        self._unregister = unregister
        self._mappings: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # address -> (map, a view)
        self._failed: set[int] = set()

    @property
    def registered(self) -> int:
        """Mappings page-locked now."""
        return len(self._mappings)

    @property
    def failed(self) -> int:
        """Mappings whose registration failed (copied from pageable memory instead)."""
        return len(self._failed)

    def ensure(self, a: Any) -> bool:
        """Register the mapping behind ``a`` if it has one; True if ``a`` is page-locked."""
        m = mapping_of(a)
        if m is None:
            return False
        address = _address(m)
        known = self._mappings.get(address)
        if known is not None and known[0] is m:
            return True
        if address in self._failed:
            return False
        code = int(self._register(address, len(m)))
        if code != 0:
            self._failed.add(address)
            log.warning("cudaHostRegister of the %d-byte loader ring failed (cudaError %d); "
                        "copying from pageable memory instead (slower)", len(m), code)
            return False
        self._mappings[address] = (m, np.frombuffer(m, dtype=np.uint8, count=1))
        return True

    def close(self) -> None:
        """Unregister every mapping, then let it go (the loader may unmap it from then on)."""
        mappings, self._mappings = self._mappings, {}
        for address in mappings:
            self._unregister(address)
