"""How many CPUs this process may really use: its affinity, and the cgroup CPU quota above it.

``os.cpu_count()`` counts the machine. A container or a batch scheduler usually allows less:
a CPU affinity mask (``sched_getaffinity``), or a CFS quota on a cgroup, under cgroup v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the ``cpu`` controller) or v2 (``cpu.max``).
A quota applies to a cgroup and everything below it, so every cgroup from this process's
up to its mount's root counts, and the tightest wins. The process's cgroups come from
``/proc/self/cgroup`` and their mount points from ``/proc/self/mountinfo`` (where a
container's mount may start below the hierarchy's root).

Every path is read below ``root``, so tests run on fake trees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CpuBudget", "cpu_budget"]


@dataclass(frozen=True)
class CpuBudget:
    """CPUs this process may use, and why: ``cpus`` = min(affinity, quota)."""

    cpus: float
    affinity: int
    quota: float | None  # CPUs the tightest cgroup quota allows; None without one
    source: str  # where the quota came from, for a log line

    def __str__(self) -> str:
        limit = f", cgroup quota {self.quota:g} CPUs ({self.source})" if self.quota is not None else ""
        return f"{self.cpus:g} CPUs (affinity {self.affinity}{limit})"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _mounts(root: str) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount."""
    text = _read(os.path.join(root, "proc/self/mountinfo")) or ""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return mounts


def _ancestors(mount_root: str, path: str) -> list[str]:
    """``path``, then each parent, as paths relative to a mount whose root is ``mount_root``."""
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        path = path[len(mount_root.rstrip("/")):] or "/"
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _quota_v2(directory: str) -> float | None:
    text = _read(os.path.join(directory, "cpu.max"))
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _quota_v1(directory: str) -> float | None:
    quota, period = _read(os.path.join(directory, "cpu.cfs_quota_us")), _read(os.path.join(directory, "cpu.cfs_period_us"))
    if quota is None or period is None or int(quota) <= 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def _cgroup_quota(root: str) -> tuple[float | None, str]:
    text = _read(os.path.join(root, "proc/self/cgroup")) or ""
    best: tuple[float | None, str] = (None, "")
    mounts = _mounts(root)
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        v2 = number == "0" and controllers == ""
        for mount_root, point, fstype, options in mounts:
            if v2:
                if fstype != "cgroup2":
                    continue
            elif fstype != "cgroup" or "cpu" not in controllers.split(",") or "cpu" not in options:
                continue
            for relative in _ancestors(mount_root, path):
                directory = os.path.join(root, point.lstrip("/"), relative)
                quota = _quota_v2(directory) if v2 else _quota_v1(directory)
                if quota is not None and (best[0] is None or quota < best[0]):
                    where = f"cgroup {'v2' if v2 else 'v1'} {os.path.join(point, relative) if relative else point}"
                    best = (quota, where)
            break
    return best


def cpu_budget(root: str = "/") -> CpuBudget:
    """The CPUs this process may use (see the module); ``root`` prefixes every path read.

    Example:
        >>> budget = cpu_budget()
        >>> 0 < budget.cpus <= (os.cpu_count() or 1)
        True
    """
    if root == "/" and hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
    else:
        affinity = _affinity_of(root)
    quota, source = _cgroup_quota(root)
    cpus = float(affinity) if quota is None else min(float(affinity), quota)
    return CpuBudget(cpus, affinity, quota, source)


def _affinity_of(root: str) -> int:
    """The affinity list of a fake tree's ``proc/self/status`` (``Cpus_allowed_list``)."""
    for line in (_read(os.path.join(root, "proc/self/status")) or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            count = 0
            for part in line.split(":", 1)[1].strip().split(","):
                lo, _, hi = part.partition("-")
                count += int(hi or lo) - int(lo) + 1
            return count
    return os.cpu_count() or 1
