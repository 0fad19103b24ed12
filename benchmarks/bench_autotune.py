"""Benchmark: ``workers="auto"`` against fixed worker counts, over windows that include start-up.

Each setting gets one fixed window of wall time (``--window`` seconds) that begins before
the Loader is built, so worker start-up and auto's own probing count against it; the
figure is the items delivered in the window. Two sources:

    S2: JPEG Datums in an LMDB (bench_s2_decode's builder), CaffeTransform crop 224,
        mirror, mean, batch 64 (decode bound): 1, 2, 3, 4 process workers vs auto.
    I/O: each item waits 2 ms (``time.sleep``) with little CPU, ``thread_safe = True``,
        batch 32: 1, 2, 4, 8, 16 workers of each backend vs auto (backend="auto").

Settings alternate within a round, and each round runs them in the reverse order of the
last. Reported: items per second per setting (the median over rounds), and auto's ratio
to the best fixed setting (targets: S2 >= 0.90, I/O >= 0.80).

    cd /tmp && python /work/main/benchmarks/bench_autotune.py [--window 15] [--rounds 1] [--json out.json]
    pytest -m bench benchmarks/bench_autotune.py       # --quick, as a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_s2_decode import BATCH as S2_BATCH  # noqa: E402
from bench_s2_decode import build_db  # noqa: E402

from agnostic_prefetch.caffe.lmdb import LMDBSource  # noqa: E402
from agnostic_prefetch.caffe.transform import CaffeTransform  # noqa: E402
from agnostic_prefetch.loader import Loader  # noqa: E402

IO_BATCH = 32
TARGETS = {"S2": 0.90, "I/O": 0.80}


class WaitingItems:
    """Items that each wait 2 ms (as on a disk or a network) and cost little CPU."""

    thread_safe = True

    def __init__(self, n: int, wait_s: float = 0.002) -> None:
        self.n, self.wait_s = n, wait_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        time.sleep(self.wait_s)
        return {"x": np.full(64, i, np.float32), "y": np.int64(i)}


def s2_transform() -> CaffeTransform:
    return CaffeTransform(crop_size=224, mirror=True, mean=(123.68, 116.78, 103.94))


def run_window(make: Any, window: float) -> dict[str, Any]:
    """Items delivered within ``window`` seconds from before ``make()`` builds the loader."""
    start = time.perf_counter()
    deadline = start + window
    items = 0
    with make() as loader:
        for batch in loader:
            items += len(next(iter(batch.values())))
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        picked = f"{loader.workers} {loader.backend}"
        auto = loader.stats().get("auto")
    out = {"items": items, "seconds": elapsed, "items_per_s": items / elapsed, "picked": picked}
    if auto is not None:
        out["auto"] = {k: auto.get(k) for k in ("workers", "backend", "reason", "cpu_share", "item_ms",
                                                 "item_cpu_ms", "limit", "threads", "probe")}
    return out


def settings(db: str | None, quick: bool) -> dict[str, dict[str, Any]]:
    """{scenario: {name: loader factory}}."""
    out: dict[str, dict[str, Any]] = {}
    if db is not None:
        source, transform = LMDBSource(db), s2_transform()

        def s2(workers: Any, backend: str = "process") -> Any:
            return lambda: Loader(source, S2_BATCH, workers=workers, backend=backend, transform=transform,
                                  shuffle=True, epochs=None)

        counts = (1, 2) if quick else (1, 2, 3, 4)
        out["S2"] = {**{f"process w={n}": s2(n) for n in counts}, "auto": s2("auto", "auto")}
    items = WaitingItems(10**7)

    def io(workers: Any, backend: str) -> Any:
        return lambda: Loader(items, IO_BATCH, workers=workers, backend=backend, epochs=None)

    counts = (2, 8) if quick else (1, 2, 4, 8, 16)
    out["I/O"] = {**{f"{b} w={n}": io(n, b) for b in ("process", "thread") for n in counts},
                  "auto": io("auto", "auto")}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=15.0, help="seconds per setting, start-up included")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--only", choices=("S2", "I/O"), default=None)
    parser.add_argument("--quick", action="store_true", help="a short run: few settings, short windows")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.records = min(args.window, 2.0), min(args.records, 200)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("agnostic_prefetch").setLevel(logging.INFO)  # auto's one line per decision
    results: dict[str, Any] = {"window_s": args.window, "rounds": args.rounds, "cpus": os.cpu_count(),
                               "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        db = None
        if args.only in (None, "S2"):
            db = os.path.join(tmp, "db")
            build_db(db, args.records)
        plan = settings(db, args.quick)
        if args.only is not None:
            plan = {args.only: plan[args.only]}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {n: [] for n in p} for s, p in plan.items()}
        for r in range(args.rounds):
            for scenario, factories in plan.items():
                names = list(factories) if r % 2 == 0 else list(reversed(factories))
                for name in names:
                    result = run_window(factories[name], args.window)
                    runs[scenario][name].append(result)
                    print(f"  round {r + 1} {scenario:4s} {name:16s} {result['items_per_s']:9.1f} items/s "
                          f"(ran {result['picked']})", flush=True)
    for scenario, by_name in runs.items():
        rates = {n: statistics.median(x["items_per_s"] for x in rs) for n, rs in by_name.items()}
        best = max((n for n in rates if n != "auto"), key=rates.get)  # type: ignore[arg-type]
        ratio = rates["auto"] / rates[best]
        results["scenarios"][scenario] = {"rates": rates, "best_fixed": best, "ratio": ratio,
                                          "target": TARGETS[scenario], "runs": by_name}
    print(f"\nworkers='auto' vs fixed settings: items/s over {args.window:g} s windows that include start-up "
          f"(median of {args.rounds} round{'s' * (args.rounds > 1)})")
    for scenario, res in results["scenarios"].items():
        print(f"\n{scenario}")
        for name, rate in res["rates"].items():
            picked = ""
            if name == "auto":
                picked = "  → " + ", ".join(sorted({x["picked"] for x in res["runs"]["auto"]}))
            print(f"  {name:16s} {rate:9.1f}{'  (best fixed)' if name == res['best_fixed'] else ''}{picked}")
        verdict = "meets" if res["ratio"] >= res["target"] else "MISSES"
        print(f"  auto / best fixed = {res['ratio']:.3f} ({verdict} the target {res['target']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


@pytest.mark.bench
def test_quick_run_reports_every_setting_and_a_ratio(tmp_path: Any) -> None:
    results = main(["--quick", "--window", "1.5", "--json", str(tmp_path / "out.json")])
    for scenario in ("S2", "I/O"):
        res = results["scenarios"][scenario]
        assert res["rates"]["auto"] > 0 and res["ratio"] > 0
        assert res["runs"]["auto"][0]["auto"]["workers"] >= 1
    assert json.loads((tmp_path / "out.json").read_text())["scenarios"]["I/O"]["best_fixed"]


if __name__ == "__main__":
    main()
