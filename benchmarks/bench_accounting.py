"""Microbenchmark: what the per-stage accounting costs, per item in a worker and per batch in the parent.

This tree is compared with a baseline revision (``--baseline REV``, before the accounting)
in one process: the baseline's package is extracted with ``git archive`` and imported under
another name (``ap_baseline``), so both run side by side, alternating many short runs, with
the garbage collector paused (it would otherwise strike at random points of either). On a
noisy machine the minimum of many short runs is the undisturbed cost; the cost reported is
the difference of the minima.

    worker, per item    ``Filler.fill`` of batches of 64 trivial items (a one-int64 record,
                        no transform) into a ring, ours against the baseline's: µs per item
    worker, per batch   the same with batches of 1: µs per batch (the per-item cost included)
    parent, per batch   a ``workers=0`` loader of batches of 1 (the caller fills each batch):
                        ours with the baseline's ``Filler.fill`` bound into its worker,
                        against the baseline's loader: what our loader's own per-batch work
                        costs more, with the filling held equal
    in the loop         the same loop, ours whole against the baseline's: both together

    python benchmarks/bench_accounting.py --baseline 43c86e1 [--rounds 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASELINE = "ap_baseline"


class Tiny:
    """Each item is one int64."""

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": np.int64(i)}


@contextlib.contextmanager
def baseline_package(revision: str) -> Iterator[types.ModuleType]:
    """The baseline's ``agnostic_prefetch``, importable as ``ap_baseline`` next to ours."""
    with tempfile.TemporaryDirectory(prefix="ap_baseline_") as root:
        archive = subprocess.run(["git", "-C", REPO, "archive", revision, "agnostic_prefetch"],
                                 check=True, capture_output=True).stdout
        archive_path = os.path.join(root, "pkg.tar")
        with open(archive_path, "wb") as f:
            f.write(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(root, filter="data")
        os.rename(os.path.join(root, "agnostic_prefetch"), os.path.join(root, BASELINE))
        for folder, _, files in os.walk(os.path.join(root, BASELINE)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(re.sub(r"\bagnostic_prefetch\b", BASELINE, text))
        sys.path.insert(0, root)
        try:
            yield importlib.import_module(BASELINE)
        finally:
            sys.path.remove(root)


def alternate(runs: dict[str, Callable[[], None]], rounds: int, per_run: int) -> dict[str, float]:
    """The minimum time of each run over ``rounds`` alternations, per unit of ``per_run``."""
    best = dict.fromkeys(runs, float("inf"))
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - started)
    finally:
        gc.enable()
    return {name: seconds / per_run * 1e6 for name, seconds in best.items()}


def fill_runs(packages: dict[str, Any], batch: int, batches: int) -> dict[str, Callable[[], None]]:
    runs = {}
    for name, package in packages.items():
        layout_mod = importlib.import_module(f"{package.__name__}._layout")
        ring_mod = importlib.import_module(f"{package.__name__}._ring")
        worker = importlib.import_module(f"{package.__name__}._worker")
        layout = layout_mod.layout_from_example(Tiny()[0], batch)
        ring = ring_mod.Ring(2, layout.slot_bytes)
        filler = worker.Filler(worker.Job(Tiny(), None, layout, 0, False), ring.slot_view)
        orders = [worker.Order(k, k % 2, 0, k, np.arange(k * batch, (k + 1) * batch, dtype=np.int64),
                               k * batch) for k in range(batches)]

        def run(filler: Any = filler, orders: list[Any] = orders) -> None:
            for order in orders:
                filler.fill(order)

        runs[name] = run
    return runs


def baseline_fill(revision: str) -> Any:
    """The baseline's ``Filler.fill``, compiled against our modules (its layout and tree
    types must be ours to fill our loader's slots)."""
    text = subprocess.run(["git", "-C", REPO, "show", f"{revision}:agnostic_prefetch/_worker.py"],
                          check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("ap_baseline_worker")
    sys.modules[module.__name__] = module  # its dataclasses look their module up there
    exec(compile(text, f"{revision}:agnostic_prefetch/_worker.py", "exec"), module.__dict__)
    return module.Filler.fill


def loop_runs(ours: Any, baseline: Any, base_fill: Any, batches: int) -> tuple[dict[str, Callable[[], None]], list[Any]]:
    loaders, runs = [], {}
    for name, package, borrowed in (("baseline", baseline, False), ("ours, baseline fill", ours, True),
                                    ("ours", ours, False)):
        loader = package.Loader(Tiny(), 1, workers=0, epochs=None)
        loaders.append(loader)
        if borrowed:  # the same filling as the baseline's: what differs is the parent's work
            filler = loader._scheduler.workers[0]._filler
            filler.fill = types.MethodType(base_fill, filler)
        it = iter(loader)
        for _ in range(500):
            next(it)

        def run(it: Any = it) -> None:
            for _ in range(batches):
                next(it)

        runs[name] = run
    return runs, loaders


def measure(revision: str, rounds: int) -> dict[str, Any]:
    import agnostic_prefetch as ours

    with baseline_package(revision) as baseline:
        packages = {"baseline": baseline, "ours": ours}
        item = alternate(fill_runs(packages, 64, 10), rounds, 640)
        batch = alternate(fill_runs(packages, 1, 300), rounds, 300)
        runs, loaders = loop_runs(ours, baseline, baseline_fill(revision), 200)
        try:
            loop = alternate(runs, rounds, 200)
        finally:
            for loader in loaders:
                loader.close()
    return {
        "worker_per_item_us": {**item, "cost": item["ours"] - item["baseline"]},
        "worker_per_batch_us": {**batch, "cost": batch["ours"] - batch["baseline"]},
        "parent_per_batch_us": {"baseline": loop["baseline"], "ours": loop["ours, baseline fill"],
                                "cost": loop["ours, baseline fill"] - loop["baseline"]},
        "loop_per_batch_us": {"baseline": loop["baseline"], "ours": loop["ours"],
                              "cost": loop["ours"] - loop["baseline"]},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=300, help="alternations (default 300)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.baseline, args.rounds)
    print(f"accounting cost against {args.baseline} (minima of {args.rounds} alternating runs, µs)")
    for name, figures in result.items():
        print(f"  {name:22} baseline {figures['baseline']:8.3f}   ours {figures['ours']:8.3f}   "
              f"cost {figures['cost']:+7.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"baseline": args.baseline, **result}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
