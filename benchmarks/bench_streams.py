"""Benchmark: streams (a torch IterableDataset) through our Loader and torch's DataLoader, one run.

The issue's scenario: an ``IterableDataset`` that shards itself by ``get_worker_info()``,
2 workers, batch 64, the same dataset object given to both loaders; tiny items (one int64)
and large ones (a new 224x224x3 uint8 array each, consumed as bench_core's S1 does: one
copy of each batch into a preallocated array). Both streams are endless, so no epoch
boundary falls in a window. For reference, the map-style pair of each (bench_core's
sources, torch's map-style DataLoader) is measured in the same rounds.

Every figure is batches/s, the median of ``--repeats`` windows of ``--seconds``, the
contenders of one scenario measured in interleaved rounds (``bench_core.compare``).

    python benchmarks/bench_streams.py [--seconds 3] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.utils.data as tud

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core as core  # noqa: E402


class EndlessStream(tud.IterableDataset):
    """Worker ``w`` of ``W`` yields items ``w, w + W, ...`` forever: tiny ones or fresh images."""

    def __init__(self, large: bool) -> None:
        super().__init__()
        self.large = large

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = tud.get_worker_info()
        i, step = (info.id, info.num_workers) if info is not None else (0, 1)
        large = self.large
        while True:
            yield {"image": np.full(core.IMAGE, i % 256, np.uint8)} if large else {"x": np.int64(i)}
            i += step


def make_torch_stream(dataset: Any, batch_size: int) -> tuple[Iterator[Any], Callable[[], None]]:
    loader = tud.DataLoader(dataset, batch_size=batch_size, num_workers=core.WORKERS, persistent_workers=True)
    it = iter(loader)
    return it, it._shutdown_workers


def scenario(name: str, large: bool, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    stream = EndlessStream(large)
    mapped = core.FreshImages(core.BATCH * 100_000) if large else core.TinyRecords(core.BATCH * 1_000_000)
    consume = core.copy_out() if large else (lambda batch: None)
    contenders = {
        "ours stream": lambda: core.make_ours(stream, core.BATCH),
        "torch stream": lambda: make_torch_stream(stream, core.BATCH),
        "ours map-style": lambda: core.make_ours(mapped, core.BATCH),
        "torch map-style": lambda: core.make_torch(mapped, core.BATCH),
    }
    log(f"{name}: batch {core.BATCH}, {core.WORKERS} process workers")
    results = core.compare(contenders, consume, args.warmup, args.seconds, args.repeats, log, args.settle)
    rate = {k: v.get("batches_per_s") for k, v in results.items()}
    out = {"loaders": results}
    if rate["ours stream"] and rate["torch stream"]:
        out["stream_ratio"] = rate["ours stream"] / rate["torch stream"]
    if rate["ours map-style"] and rate["torch map-style"]:
        out["map_ratio"] = rate["ours map-style"] / rate["torch map-style"]
    log(f"  {name}: ours/torch over the stream {out.get('stream_ratio', float('nan')):.2f}x, "
        f"map-style {out.get('map_ratio', float('nan')):.2f}x")
    return out


def in_process(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, float]:
    """Tiny items with ``workers=0``: one core filling and delivering, the per-item cost alone."""
    import time

    import agnostic_prefetch as ap

    def rate(source: Any, batches: int = 3000) -> float:
        with ap.Loader(source, core.BATCH, workers=0, epochs=None) as loader:
            it = iter(loader)
            for _ in range(200):
                next(it)
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            return batches / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"stream": [], "map-style": []}
    for _ in range(args.repeats):
        rates["stream"].append(rate(EndlessStream(False)))
        rates["map-style"].append(rate(core.TinyRecords(core.BATCH * 1_000_000)))
    out = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    log(f"workers=0, tiny items: stream {out['stream']:,.0f}, map-style {out['map-style']:,.0f} batches/s")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = {"machine": {"cpus": os.cpu_count(), "cpu": core.cpu_model()},
               "tiny": scenario("tiny items (one int64)", False, args, print),
               "large": scenario("224x224x3 uint8 items", True, args, print),
               "in_process": in_process(args, print)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
