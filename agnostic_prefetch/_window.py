"""Snapshots of a loader's or prefetcher's stats over time, so a diagnosis covers a window.

The iterating thread takes snapshots after its batches, at most once per :data:`PERIOD_S`
(checked against the clock it already reads per batch). The first ones mark the end of the
warm-up: once every worker has finished a batch (its start-up and the ring's first fill are
behind it), or :data:`WARM_MAX_S` after the first batch, whichever comes first. ``diagnose()`` compares the latest figures with a
snapshot: its own previous call's, or the one nearest ``seconds`` ago.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

PERIOD_S = 0.5
WARM_MAX_S = 2.0
KEPT = 1200  # ten minutes of snapshots

log = logging.getLogger("agnostic_prefetch")


class Snapshots:
    """Timed copies of the owner's stats; every ``log_every`` seconds, a diagnosis line in the log.

    Args:
        stats_of: a weak reference to the owner's stats method (``weakref.WeakMethod``): the
            owner's finalizer must not wait for a garbage collection cycle.
        log_every: seconds between log lines, or ``None``.
    """

    def __init__(self, stats_of: Callable[[], Callable[[], dict[str, Any]] | None],
                 log_every: float | None = None) -> None:
        self._stats_of = stats_of
        self.kept: collections.deque[tuple[float, dict[str, Any]]] = collections.deque(maxlen=KEPT)
        self.warm: tuple[float, dict[str, Any]] | None = None
        self.mark: tuple[float, dict[str, Any]] | None = None  # diagnose()'s previous call
        self.next_at = 0.0  # 0: the first batch takes the warm snapshot
        self.log_every = log_every
        self._logged: tuple[float, dict[str, Any]] | None = None
        self._first: float | None = None

    def tick(self, now: float) -> None:
        """Called by the iterating thread when ``now >= next_at``."""
        snapshot = self.take(now)
        if self.warm is None:
            if self._first is None:
                self._first = now
            if not (_every_worker_done(snapshot[1]) or now - self._first >= WARM_MAX_S):
                return  # still warming up: look again after the next batch
            self.warm = self._logged = snapshot
        self.next_at = now + PERIOD_S
        if self.log_every is not None and self._logged is not None and now - self._logged[0] >= self.log_every:
            from agnostic_prefetch.diagnosis import diagnose_between

            log.info("%s", diagnose_between(self._logged, snapshot).line())
            self._logged = snapshot

    def take(self, now: float | None = None) -> tuple[float, dict[str, Any]]:
        stats_of = self._stats_of()
        snapshot = (time.perf_counter() if now is None else now, stats_of() if stats_of is not None else {})
        self.kept.append(snapshot)
        return snapshot

    def start_of(self, seconds: float | None, now: float) -> tuple[float, dict[str, Any]] | None:
        """The snapshot a window ending ``now`` starts at (never inside the warm-up)."""
        if self.warm is None:
            return None
        if seconds is None:
            return self.mark if self.mark is not None else self.warm
        wanted = now - seconds
        best = self.warm
        for snapshot in self.kept:
            if snapshot[0] <= wanted and snapshot[0] >= best[0]:
                best = snapshot
        return best


def _every_worker_done(stats: dict[str, Any]) -> bool:
    """Whether every worker has finished a batch (a prefetcher: its loader's)."""
    if "prefetch" in stats:
        stats = stats["loader"]
        if stats is None:
            return True
    rows = stats["per_worker"]
    return len(rows) >= max(1, stats["workers"]) and all(r["batches"] >= 1 for r in rows)
