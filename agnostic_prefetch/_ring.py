"""The ring: one shared-memory region cut into fixed-size slots, reserved up front.

The region is an anonymous memory file (``memfd_create``) handed to workers by file
descriptor, so it has no name anywhere: a trainer killed with SIGKILL leaves nothing in
/dev/shm, and a small Docker /dev/shm does not matter. Where the OS has no memfd, a file is
created in /dev/shm (or the temp dir) and unlinked at once; workers inherit its descriptor,
so that name exists for microseconds only. (multiprocessing.shared_memory is avoided: on
Python < 3.13 every process that attaches registers the segment with a resource tracker,
which unlinks or warns when that process exits.)

Memory is checked against what the machine can give and reserved with ``posix_fallocate``
before the first batch, so running short is an error with numbers at start-up, never a
SIGBUS in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile

import numpy as np

from agnostic_prefetch import _fork
from agnostic_prefetch.errors import RingTooLargeError


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), if it has one."""
    candidates = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    for limit_path, usage_path in candidates:
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # v1 reports "no limit" as a huge number
                return None
            with open(usage_path) as f:
                return max(0, limit - int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_bytes(anonymous: bool, directory: str | None = None) -> tuple[int | None, str]:
    """How many bytes a new region can take, and where that figure comes from."""
    if not anonymous and directory is not None:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize, f"free space in {directory}"
    figures = [(v, what) for v, what in [
        (_meminfo_available(), "MemAvailable in /proc/meminfo"),
        (_cgroup_room(), "room under the cgroup memory limit"),
    ] if v is not None]
    if not figures:
        return None, "unknown"
    return min(figures)


_CLOSED_MAP = mmap.mmap(-1, mmap.PAGESIZE)  # what a closed ring's ``map`` is: closed, shared
_CLOSED_MAP.close()


class Ring:
    """``slots`` slots of ``slot_bytes`` each in one shared region.

    Args:
        slots: number of slots.
        slot_bytes: bytes per slot (a multiple of the page size).
        extra_bytes: bytes after the slots (the workers' accounting block, ``_accounts.py``).

    Raises:
        RingTooLargeError: the region does not fit in available memory, with the numbers and
            the remedies.
    """

    def __init__(self, slots: int, slot_bytes: int, extra_bytes: int = 0) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.extra_offset = slots * slot_bytes
        self.nbytes = self.extra_offset + extra_bytes
        self.kind, self.fd = self._create()
        try:
            self._reserve()
            self.map = mmap.mmap(self.fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.address = np.frombuffer(self.map, dtype=np.uint8, count=1).ctypes.data
        _fork.close_in_child(self)  # a forked child lets go of its copy (close() leaves the parent's)

    def _create(self) -> tuple[str, int]:
        if hasattr(os, "memfd_create"):
            try:
                return "memfd", os.memfd_create("agnostic_prefetch_ring", os.MFD_CLOEXEC)
            except OSError:
                pass
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="agnostic_prefetch_", dir=directory)
        os.unlink(path)  # workers inherit the descriptor; the name is never needed again
        self._directory = directory
        return f"unlinked file in {directory}", fd

    def _reserve(self) -> None:
        anonymous = self.kind == "memfd"
        have, source = available_bytes(anonymous, getattr(self, "_directory", None))
        if have is not None and self.nbytes > have:
            raise RingTooLargeError(self._too_large(have, source))
        os.ftruncate(self.fd, self.nbytes)
        if hasattr(os, "posix_fallocate") and self.nbytes:
            try:
                os.posix_fallocate(self.fd, 0, self.nbytes)
            except OSError as e:
                raise RingTooLargeError(self._too_large(have, f"{source}; fallocate said {e.strerror}")) from e

    def _too_large(self, have: int | None, source: str) -> str:
        return (
            f"the ring needs {self.nbytes:,} bytes ({self.slots} slots x {self.slot_bytes:,} "
            f"bytes, and {self.nbytes - self.extra_offset:,} of counters) but only {have if have is None else f'{have:,}'} bytes are available "
            f"({source}). Remedies: fewer slots (slots=), a smaller batch_size, smaller items "
            "(crop or resize in the transform), or free memory."
        )

    def slot_view(self, slot: int) -> memoryview:
        """The writable bytes of one slot (a view of the mapping, no copy)."""
        start = slot * self.slot_bytes
        return memoryview(self.map)[start : start + self.slot_bytes]

    def extra_view(self) -> memoryview:
        """The writable bytes after the slots."""
        return memoryview(self.map)[self.extra_offset :]

    def slot_array(self, slot: int) -> np.ndarray:
        """A fresh uint8 array over one slot; its lifetime is the lease of that slot."""
        return np.frombuffer(self.map, dtype=np.uint8, count=self.slot_bytes, offset=slot * self.slot_bytes)

    def close(self) -> None:
        """Drop the descriptor and the mapping; views still alive keep the mapping valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # Arrays that view the ring hold buffer exports on the mmap: it then cannot close
        # now. Let go of it: those arrays own it, and it is unmapped when the last of them
        # dies, however long this Ring lives on.
        with contextlib.suppress(BufferError):
            self.map.close()
        self.map = _CLOSED_MAP

    def __repr__(self) -> str:
        return f"Ring({self.slots} slots x {self.slot_bytes:,} B = {self.nbytes:,} B, {self.kind})"
