"""What bounds a pipeline's throughput, over a window, from its per-stage accounting.

``diagnose(loader_or_prefetcher)`` compares two snapshots of ``stats()`` and names the stage
that bounds throughput — the source (waiting on I/O, or decoding), the transform, the
hand-off, the device transfer — or ``"none"``: the consumer is slower than the pipeline,
which then is not what bounds the step. docs/diagnose.md says how to read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BOUNDS", "Diagnosis", "diagnose"]

BOUNDS = ("source_io", "source_decode", "transform", "handoff", "device_transfer", "none")
# The consumer waiting less than this share of the window is not input-bound.
INPUT_BOUND_WAIT = 0.10
# Workers busier than this share of their time are what the consumer waits for.
BUSY = 0.70
# A read whose CPU time is under this share of its wall time is mostly waiting (I/O).
IO_CPU_SHARE = 0.5

_LABELS = {
    "source_io": "the source, waiting on I/O",
    "source_decode": "the source, decoding (CPU)",
    "transform": "the transform",
    "handoff": "the hand-off (loader and ring)",
    "device_transfer": "the device transfer",
    "none": "nothing: the consumer is slower (not input-bound)",
}


@dataclass
class Diagnosis:
    """What bounds throughput over a window, the numbers behind it, and the remedy.

    Attributes:
        bound: one of :data:`BOUNDS` (machine-readable).
        remedy: what to change, in a sentence.
        window_s: seconds the window covers (warm-up excluded).
        numbers: the figures behind the verdict (shares of the window, rates, counts).
    """

    bound: str
    remedy: str
    window_s: float
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def input_bound(self) -> bool:
        return self.bound != "none"

    def line(self) -> str:
        """One log line."""
        n = self.numbers
        return (f"agnostic_prefetch: {n.get('batches_per_s', 0):.1f} batches/s over {self.window_s:.1f} s; "
                f"step waited {100 * n.get('consumer_wait', 0):.0f} %; workers busy "
                f"{100 * n.get('worker_busy', 0):.0f} %; bound: {self.bound}")

    def __str__(self) -> str:
        n = self.numbers
        if not n.get("batches"):
            return f"agnostic_prefetch diagnosis: no batch delivered in the window ({self.window_s:.2f} s)"
        lines = [
            f"agnostic_prefetch diagnosis over {self.window_s:.1f} s (warm-up excluded): "
            f"{n['batches']} batches, {n['batches_per_s']:.1f} batches/s, {n['items_per_s']:.0f} items/s",
            f"  bound: {_LABELS[self.bound]}",
            f"  step waited for data    {100 * n['consumer_wait']:5.1f} % of the time "
            f"({1e3 * n['wait_per_batch_s']:.2f} ms per batch)",
            f"  workers ({n['workers']}, {n['backend']})  busy {100 * n['worker_busy']:5.1f} %: "
            f"read {100 * n['read']:.0f} % (CPU {100 * n['read_cpu_share']:.0f} % of it), "
            f"transform {100 * n['transform']:.0f} %, write {100 * n['write']:.0f} %; "
            f"CPU {n['worker_cpus']:.2f} of {n['cpus']:g} CPUs",
            f"  loader hand-off         {1e3 * n['handoff_per_batch_s']:.3f} ms per batch; "
            f"workers held back by a full ring {100 * n['held']:.0f} %",
        ]
        if n.get("copied_out"):
            lines.append(
                f"  copied out of the ring   {n['copied_out']} batches: the consumer held up to "
                f"{n['held_peak']} at once; slots={n['slots_needed']} (now {n['slots']}) keeps them all in the ring")
        if "stage_pull" in n:
            lines.append(
                f"  device stage            pull {100 * n['stage_pull']:.0f} %, place "
                f"{100 * n['stage_place']:.0f} %, transfer {100 * n['stage_transfer']:.0f} %, "
                f"queue full {100 * n['stage_full']:.0f} % of its thread's time")
        lines.append(f"  remedy: {self.remedy}")
        return "\n".join(lines)


def diagnose(target: Any, *, seconds: float | None = None) -> Diagnosis:
    """What bounds ``target``'s throughput (a ``Loader``, its iterator, or a prefetcher).

    Args:
        target: what to diagnose; a prefetcher over a ``Loader`` covers both.
        seconds: the window: the last ``seconds``; ``None``: since the previous call (or,
            the first time, since the end of the warm-up: worker start-up and first batch).

    Example:
        >>> import time, numpy as np, agnostic_prefetch as ap
        >>> with ap.Loader(ap.ArraySource({"x": np.arange(64)}), 8, workers=1) as loader:
        ...     for _ in loader:
        ...         time.sleep(0.02)  # a step slower than loading 8 integers
        ...     ap.diagnose(loader).bound
        'none'
    """
    snapshots = getattr(target, "_snapshots", None)  # a LoaderIterator shares its loader's
    if snapshots is None:
        raise TypeError(f"diagnose() takes a Loader, its iterator or a prefetcher, not {type(target).__name__}")
    now = time.perf_counter()
    start = snapshots.start_of(seconds, now)
    end = snapshots.take(now)
    if seconds is None:
        snapshots.mark = end
    if start is None:  # no batch yet: the whole run so far is warm-up
        return Diagnosis("none", "iterate first: nothing was delivered yet", 0.0, {"batches": 0})
    return diagnose_between(start, end)


def diagnose_between(start: tuple[float, dict[str, Any]], end: tuple[float, dict[str, Any]]) -> Diagnosis:
    """The diagnosis of the window between two snapshots of one loader's or prefetcher's stats."""
    window = max(1e-9, end[0] - start[0])
    a, b = start[1], end[1]
    stage = None
    if "prefetch" in b:
        stage = _delta(a["prefetch"], b["prefetch"])
        loader = _delta(a["loader"], b["loader"]) if b.get("loader") is not None else None
    else:
        loader = _delta(a, b)
    n: dict[str, Any] = {}
    consumer = stage if stage is not None else loader
    assert consumer is not None
    batches = int(consumer["batches"])
    n["batches"] = batches
    n["batches_per_s"] = batches / window
    n["consumer_wait"] = consumer["wait_s"] / window
    n["wait_per_batch_s"] = consumer["wait_s"] / batches if batches else 0.0
    from agnostic_prefetch._cpus import cpu_budget

    n["cpus"] = cpu_budget().cpus
    if loader is not None:
        _loader_numbers(n, loader, b["loader"] if stage is not None else b, window)
    else:
        n.update(items_per_s=0.0, workers=0, backend="?", worker_busy=0.0, read=0.0, read_cpu_share=0.0,
                 busy_cpu_share=0.0,
                 transform=0.0, write=0.0, worker_cpus=0.0, handoff_per_batch_s=0.0, held=0.0, handoff=0.0)
    if stage is not None:
        thread_time = max(1e-9, stage["pull_s"] + stage["place_s"] + stage["transfer_s"] + stage["full_s"])
        n["stage_pull"] = stage["pull_s"] / thread_time
        n["stage_place"] = stage["place_s"] / thread_time
        n["stage_transfer"] = stage["transfer_s"] / thread_time
        n["stage_full"] = stage["full_s"] / thread_time
        n["stage_device"] = (stage["place_s"] + stage["transfer_s"]) / window
    bound, remedy = _verdict(n, loader is not None)
    if n.get("copied_out"):
        remedy += (f" Batches were copied out of the ring ({n['copied_out']} in the window): pass "
                   f"slots={n['slots_needed']} to the Loader, or hold fewer batches.")
    return Diagnosis(bound, remedy, window, n)


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: b[k] - a.get(k, 0) for k, v in b.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _loader_numbers(n: dict[str, Any], d: dict[str, float], latest: dict[str, Any], window: float) -> None:
    workers = max(1, int(latest["workers"]))
    n["workers"], n["backend"] = latest["workers"], latest["backend"] if latest["workers"] else "in the caller"
    n["items_per_s"] = d["items"] / window
    busy = d["read_s"] + d["transform_s"] + d["write_s"]
    capacity = workers * window
    n["worker_busy"] = min(1.0, busy / capacity)
    n["read"] = d["read_s"] / capacity
    n["transform"] = d["transform_s"] / capacity
    n["write"] = d["write_s"] / capacity
    n["read_cpu_share"] = d["read_cpu_s"] / d["read_s"] if d["read_s"] > 0 else 0.0
    cpu = d["read_cpu_s"] + d["transform_cpu_s"] + d["write_cpu_s"]
    n["worker_cpus"] = cpu / window
    n["busy_cpu_share"] = cpu / busy if busy > 0 else 0.0
    batches = max(1, int(d["batches"]))
    n["handoff_per_batch_s"] = d["handoff_s"] / batches
    n["handoff"] = d["handoff_s"] / window
    n["held"] = min(1.0, d["held_s"] / capacity)
    n["copied_out"] = int(d.get("copied_out", 0))
    n["slots"], n["slots_needed"] = latest.get("slots"), latest.get("slots_needed")
    n["held_peak"] = latest.get("held_peak")
    n["read_s_per_item"] = d["read_s"] / d["items_read"] if d["items_read"] else 0.0


def _verdict(n: dict[str, Any], have_loader: bool) -> tuple[str, str]:
    if n["consumer_wait"] < INPUT_BOUND_WAIT:
        return "none", (f"nothing to do for throughput: the step waited {100 * n['consumer_wait']:.0f} % "
                        "of the time. Fewer workers would free CPU for the step.")
    if n.get("stage_device", 0.0) > 0.5 and n.get("stage_place", 0) + n.get("stage_transfer", 0) > n.get("stage_pull", 0):
        return "device_transfer", ("placing batches takes most of the stage's time: move fewer bytes "
                                   "(uint8 on the host, convert on the device), fewer leaves, or page-"
                                   "locked memory for CUDA copies (torch_prefetch / cupy_prefetch).")
    if not have_loader:
        return "handoff", "the stage waits on a source that is not a Loader; time that source."
    if n["worker_busy"] >= BUSY:
        parts = {"read": n["read"], "transform": n["transform"], "write": n["write"]}
        top = max(parts, key=parts.__getitem__)
        if top == "read" and n["read_cpu_share"] < IO_CPU_SHARE:
            waiters = n["cpus"] / max(0.02, n["read_cpu_share"])
            return "source_io", (f"the workers wait in the source's __getitem__ (CPU {100 * n['read_cpu_share']:.0f} % "
                                 f"of its time): more workers (about {waiters:.0f} would keep {n['cpus']:g} CPUs "
                                 "busy), backend='thread' for a source that waits on I/O, or workers='auto'.")
        if n["busy_cpu_share"] < IO_CPU_SHARE:
            more = (f"the workers had a CPU only {100 * n['busy_cpu_share']:.0f} % of the time they were busy: "
                    "other processes (or the step) take the CPUs; fewer of them, or fewer workers; then")
        elif n["cpus"] - n["worker_cpus"] > 0.75:
            more = "more workers (CPUs are free), or"
        else:
            more = "the CPUs are busy, so not more workers, but"
        if top == "read":
            return "source_decode", (f"decoding in the source bounds it: {more} cheaper records (smaller or "
                                     "pre-resized images), or the simplejpeg decoder.")
        if top == "transform":
            return "transform", (f"the transform bounds it: {more} a cheaper transform (crop before "
                                 "converting, fewer float ops), or one that writes into the slot "
                                 "(writes_into_slot).")
        return "handoff", (f"writing items into the ring bounds it: {more} items already of the final "
                           "dtype and layout, or a transform that writes into the slot.")
    if n["held"] > 0.2:
        return "handoff", (f"the workers are idle because every ring slot is taken: the consumer held "
                           f"up to {n.get('held_peak')} batches at once. Pass slots="
                           f"{n.get('slots_needed')} to the Loader, or hold fewer batches.")
    return "handoff", (f"the workers are idle {100 * (1 - n['worker_busy']):.0f} % of the time while the step "
                       f"waits: the loader's own work per batch ({1e3 * n['handoff_per_batch_s']:.3f} ms) "
                       "bounds it. Larger batches, or fewer leaves per batch.")
