"""Microbenchmark: what the per-stage accounting costs, per item in a worker and per batch in the parent.

Both compare this tree with a baseline revision (``--baseline REV``), in alternation:

    worker, per item   ``Filler.fill`` of batches of 64 trivial items (a one-int64 record,
                       no transform) into a ring: µs per item. The baseline's ``_worker.py``
                       (from ``git show REV:...``) and ours run in one process, alternately,
                       on the same ring and orders: the fairest comparison on a noisy machine.
    worker, per batch  the same with batches of 1: µs per batch
    parent, per batch  a ``workers=0`` loader of batches of 1, the caller filling each batch
                       itself, less the fill's own cost: the loader's per-batch work in the
                       parent. Two packages cannot share a process, so each round runs a fresh
                       interpreter per tree (the baseline from a git worktree made for the
                       run), started from /tmp so that only ``PYTHONPATH`` decides which runs.

Each figure is the minimum over repeats within a round (the least disturbed run); the
reported cost is the median over rounds of (this tree − baseline).

    python benchmarks/bench_accounting.py --baseline 43c86e1 [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class Tiny:
    """Each item is one int64."""

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": np.int64(i)}


def fill_us(batch: int, batches: int, repeats: int, worker: Any = None) -> float:
    """µs per item (batch > 1) or per batch (batch == 1) of ``Filler.fill`` (of ``worker``,
    a ``_worker`` module: ours by default)."""
    from agnostic_prefetch import _worker
    from agnostic_prefetch._layout import layout_from_example
    from agnostic_prefetch._ring import Ring

    worker = worker or _worker
    layout = layout_from_example(Tiny()[0], batch)
    ring = Ring(2, layout.slot_bytes)
    filler = worker.Filler(worker.Job(Tiny(), None, layout, 0, False), ring.slot_view)
    orders = [worker.Order(k, k % 2, 0, k, np.arange(k * batch, (k + 1) * batch, dtype=np.int64), k * batch)
              for k in range(batches)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for order in orders:
            filler.fill(order)
        best = min(best, time.perf_counter() - started)
    del filler
    ring.close()
    return best / (batches * batch) * 1e6


def loop_us(batches: int, repeats: int) -> float:
    """µs per batch of a ``workers=0`` loader of batches of 1 (the caller fills them)."""
    import agnostic_prefetch as ap

    best = float("inf")
    with ap.Loader(Tiny(), 1, workers=0, epochs=None) as loader:
        it = iter(loader)
        for _ in range(1000):
            next(it)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(batches):
                next(it)
            best = min(best, time.perf_counter() - started)
    return best / batches * 1e6


def baseline_worker(revision: str) -> Any:
    """The baseline's ``_worker`` module, loaded next to ours (it imports our other modules)."""
    import types

    text = subprocess.run(["git", "-C", REPO, "show", f"{revision}:agnostic_prefetch/_worker.py"],
                          check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("baseline_worker")
    sys.modules[module.__name__] = module  # its dataclasses look their module up there
    exec(compile(text, f"{revision}:_worker.py", "exec"), module.__dict__)
    return module


def worker_ab(revision: str, rounds: int, quick: bool) -> dict[str, dict[str, float]]:
    """Ours against the baseline's ``Filler.fill``, alternately in this process."""
    old = baseline_worker(revision)
    n = 200 if quick else 2000
    out: dict[str, dict[str, float]] = {}
    for name, batch, batches in (("fill_per_item_us", 64, n // 10), ("fill_per_batch_us", 1, n * 5)):
        ours, theirs = [], []
        for _ in range(rounds):
            theirs.append(fill_us(batch, batches, 3, old))
            ours.append(fill_us(batch, batches, 3))
        out[name] = {"this tree": statistics.median(ours), "baseline": statistics.median(theirs),
                     "cost": statistics.median(a - b for a, b in zip(ours, theirs, strict=True)),
                     "cost_of_minima": min(ours) - min(theirs)}
    return out


def child(quick: bool) -> dict[str, float]:
    n = 200 if quick else 2000
    item = fill_us(64, n // 10, 5)
    per_batch = fill_us(1, n * 5, 5)
    loop = loop_us(n * 5, 5)
    return {"fill_per_item_us": item, "fill_per_batch_us": per_batch, "loop_per_batch_us": loop,
            "parent_per_batch_us": loop - per_batch}


def run_child(pythonpath: str, quick: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *(["--quick"] if quick else [])],
                         cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="git revision to compare with (a worktree is made)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.quick)))
        return {}
    worktree = None
    try:
        if args.baseline:
            worktree = tempfile.mkdtemp(prefix="ap_baseline_")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", worktree, args.baseline],
                           check=True, capture_output=True)
        rows: dict[str, list[dict[str, float]]] = {"this tree": [], "baseline": []}
        for _ in range(args.rounds):
            rows["this tree"].append(run_child(REPO, args.quick))
            if worktree:
                rows["baseline"].append(run_child(worktree, args.quick))
    finally:
        if worktree:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", worktree], capture_output=True)
            shutil.rmtree(worktree, ignore_errors=True)
    result: dict[str, Any] = {}
    keys = ("fill_per_item_us", "fill_per_batch_us", "parent_per_batch_us", "loop_per_batch_us")
    print("fresh interpreters, alternating (µs)")
    print(f"{'':24}" + "".join(f"{k:>22}" for k in keys))
    for name, runs in rows.items():
        if runs:
            medians = {k: statistics.median(r[k] for r in runs) for k in keys}
            result[name] = medians
            print(f"{name:24}" + "".join(f"{medians[k]:22.3f}" for k in keys))
    if rows["baseline"]:
        costs = {k: statistics.median(a[k] - b[k] for a, b in zip(rows["this tree"], rows["baseline"], strict=True))
                 for k in keys}
        result["cost"] = costs
        print(f"{'cost (median of pairs)':24}" + "".join(f"{costs[k]:22.3f}" for k in keys))
        result["worker_in_one_process"] = ab = worker_ab(args.baseline, args.rounds, args.quick)
        print("Filler.fill, both in this process, alternating (µs)")
        for name, figures in ab.items():
            print(f"  {name:20} this tree {figures['this tree']:.3f}  baseline {figures['baseline']:.3f}  "
                  f"cost {figures['cost']:.3f} (of minima {figures['cost_of_minima']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
