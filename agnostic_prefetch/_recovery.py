"""Surviving a dead worker: what is known of each death, the limit, and finding a record that kills.

Every map-style batch is a pure function of its number, so the batches a dead worker was
filling can be filled again by its replacement, with the same items and the same random
draws: the caller sees the batches of a run without the fault. The scheduler
(``_schedule.py``) replaces the worker and orders the batches again; this module keeps the
account: each death (worker, exit, the OOM killer where the cgroup says, the batches redone),
the limit (more than ``max_deaths`` in any :data:`WINDOW_S` seconds stops the loader, naming
every one), and the record under suspicion. A worker's slot header says which item it was
on when it died (``H_PROGRESS``); a record two workers died on (in any batch) is read alone
in a fresh worker (a *probe*): if the probe dies too, the record is to blame and
``on_error`` decides (``"raise"`` names it, ``"skip"`` leaves it out of the batch); if the probe
survives, the deaths came from outside (a kill, the OOM killer) and the batch is simply
filled again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from agnostic_prefetch.errors import WorkerDiedError

log = logging.getLogger("agnostic_prefetch")

__all__ = ["WINDOW_S", "Death", "Recovery", "oom_kills"]

WINDOW_S = 60.0
_OOM_HINT = " (SIGKILL is what the kernel's OOM killer sends: check memory)"  # _supervisor.exit_reason's
REDO, PROBE, CULPRIT = "redo", "probe", "culprit"


@dataclass
class Death:
    """One worker's death: when, who, why, and what was filled again."""

    at: float
    worker: str
    reason: str
    batches: list[tuple[int, int]]  # (epoch, number) of the batches ordered again
    record: str | None = None  # the record it was on, where the slot says
    blamed: bool = False  # the record was found to kill (these deaths are explained)

    def as_dict(self) -> dict[str, object]:
        return {"worker": self.worker, "reason": self.reason, "batches": self.batches, "record": self.record,
                "record_blamed": self.blamed}


@dataclass
class Recovery:
    """The deaths so far and the records under suspicion (owned by the scheduler's thread).

    Args:
        max_deaths: deaths survived in any ``WINDOW_S`` seconds (not counting those a record
            was found to cause); one more raises.
        skip: ``on_error="skip"``: a record found to kill is left out, else named in an error.
    """

    max_deaths: int
    skip: bool = False  # on_error="skip": a record found to kill is left out
    deaths: list[Death] = field(default_factory=list)
    _strikes: dict[int, list[Death]] = field(default_factory=dict)  # record -> the deaths on it
    _culprits: set[int] = field(default_factory=set)  # records found to kill their worker
    _oom: int | None = field(default_factory=lambda: oom_kills())

    def reason(self, exit_reason: str) -> str:
        """``exit_reason`` with what the cgroup says of the OOM killer since the last look."""
        now = oom_kills()
        before, self._oom = self._oom, now
        if now is not None and before is not None:
            bare = exit_reason.replace(_OOM_HINT, "")
            if now > before:
                return (f"{bare}: the kernel's OOM killer (this cgroup counts {now - before} "
                        "more oom_kill); lower the memory per worker or raise the limit")
            if bare != exit_reason:
                return f"{bare} (not by the OOM killer: this cgroup counts no new oom_kill)"
        return exit_reason

    def died(self, death: Death, seq: int | None, record: int | None, probe: bool) -> str:
        """Count ``death`` (of the worker filling batch ``seq`` on ``record``, or reading it
        alone when ``probe``) and say what to do: fill the batch again, probe the record, or
        blame it.

        Raises:
            WorkerDiedError: more deaths than the limit in the window, naming every one.
        """
        self.deaths.append(death)
        action = REDO
        if seq is not None and record is not None:
            strikes = self._strikes.setdefault(record, [])
            strikes.append(death)
            # A culprit kills again where a batch holding it was ordered before it was found:
            # explained at once, not probed (the probe would skip it, as left out, and clear it).
            if probe or record in self._culprits:
                action = CULPRIT
                self._culprits.add(record)
                for d in strikes:
                    d.blamed = True
            elif len(strikes) >= 2:
                action = PROBE
        recent = [d for d in self.deaths if d.at > death.at - WINDOW_S and not d.blamed]
        if len(recent) > self.max_deaths:
            listing = "\n".join(f"  {d.worker} {d.reason} (batches {d.batches}"
                                f"{f', on {d.record}' if d.record else ''})" for d in recent)
            raise WorkerDiedError(
                f"{len(recent)} workers died within {WINDOW_S:.0f} s, more than max_worker_deaths="
                f"{self.max_deaths}; the loader has stopped. The deaths:\n{listing}\nFind what kills them "
                "(memory: the OOM killer; a library that crashes), or raise max_worker_deaths. "
                "load_state_dict resumes exactly in a new loader.")
        return action

    def cleared(self, record: int) -> None:
        """The record read alone did not kill its worker: the deaths on it came from outside."""
        self._strikes.pop(record, None)


def oom_kills() -> int | None:
    """The ``oom_kill`` count of this process's memory cgroup (v2 ``memory.events``, v1
    ``memory.oom_control``), if the kernel shows one here."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    places = []
    for _, controllers, path in (parts for parts in lines if len(parts) == 3):
        if controllers == "":
            places.append(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "memory.events"))
        elif "memory" in controllers.split(","):
            places.append(os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.oom_control"))
    for place in places:
        try:
            with open(place) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def warn_death(death: Death, replacement: str, recent: int, limit: int) -> None:
    count = ("the record is to blame: its deaths do not count against max_worker_deaths" if death.blamed else
             f"death {recent} in the last {WINDOW_S:.0f} s; more than max_worker_deaths={limit} stop the loader")
    log.warning("%s %s while loading%s; %s replaces it and batches %s (epoch, number) are filled again, so "
                "nothing is lost or repeated (%s)", death.worker, death.reason,
                f" (on {death.record})" if death.record else "", replacement, death.batches, count)


def now() -> float:
    return time.monotonic()
