"""Benchmark S2: decoding JPEG Datums + CaffeTransform — one core, our Loader, torch DataLoader, Grain.

Builds an LMDB of encoded-JPEG Caffe Datums (256×256, random crops and flips of the
scikit-image photographs), then reads one epoch with random crop 224 + mirror + mean
(CaffeTransform), batch 64, four ways:

    (a) one core in this process: source[i] + transform, item by item
    (b) agnostic_prefetch.Loader, 2 worker processes
    (c) torch.utils.data.DataLoader over the same source object (num_workers=2, persistent)
    (d) grain.python.DataLoader (worker_count=2), if it runs here

Each loader first runs one warm-up epoch (worker start-up excluded), then a timed epoch.

    python benchmarks/bench_s2_decode.py [--records 2000] [--workers 2]
    pytest -m bench benchmarks/bench_s2_decode.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agnostic_prefetch.sampler import item_rng
from agnostic_prefetch.sources._datum import Datum, encode_datum
from agnostic_prefetch.sources._lmdb_write import LMDBWriter
from agnostic_prefetch.sources._resize import resize_bilinear
from agnostic_prefetch.sources.lmdb import LMDBSource
from agnostic_prefetch.transforms import CaffeTransform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry")
BATCH = 64


def build_db(path: str, records: int, seed: int = 0) -> None:
    """Random 256×256 crops (with flips) of the photographs, JPEG quality 90, as encoded Datums."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # some data files are downloaded on demand; skip those offline
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 256:
            photos.append(np.ascontiguousarray(img[:, :, :3]))
    rng = np.random.default_rng(seed)
    with LMDBWriter(path) as writer:
        for i in range(records):
            photo = photos[i % len(photos)]
            h, w = photo.shape[:2]
            side = int(rng.integers(256, min(h, w) + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = resize_bilinear(photo[top : top + side, left : left + side], 256, 256)
            if rng.integers(0, 2):
                crop = crop[:, ::-1]
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
            writer.put(b"%08d_photo.jpg" % i, encode_datum(Datum(data=buf.getvalue(), label=i % 10, encoded=True)))


def timed(run: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    items = run()
    return time.perf_counter() - start, items


def bench_single_core(source: Any, transform: Any) -> tuple[float, int]:
    def run() -> int:
        for i in range(len(source)):
            transform(source[i], item_rng(0, 0, i))
        return len(source)

    return timed(run)


def bench_ours(source: Any, transform: Any, workers: int) -> tuple[float, int]:
    from agnostic_prefetch.loader import Loader

    with Loader(source, BATCH, workers=workers, shuffle=True, seed=0, epochs=None, transform=transform) as loader:
        it = iter(loader)
        per_epoch = -(-len(source) // BATCH)
        for _ in range(per_epoch):  # warm-up epoch: workers started, caches warm
            next(it)

        def run() -> int:
            items = 0
            for _ in range(per_epoch):
                items += len(next(it)["label"])
            return items

        return timed(run)


class _TorchDataset:
    def __init__(self, source: Any, transform: Any) -> None:
        self.source, self.transform, self.epoch = source, transform, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.source[i], item_rng(0, self.epoch, i))


def bench_torch(source: Any, transform: Any, workers: int) -> tuple[float, int]:
    import torch.utils.data

    dataset = _TorchDataset(source, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True)
    for _ in loader:  # warm-up epoch
        pass

    def run() -> int:
        return sum(len(b["label"]) for b in loader)

    return timed(run)


def bench_grain(source: Any, transform: Any, workers: int) -> tuple[float, int]:
    import grain.python as grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags and refuses to run before they are parsed
        flags.FLAGS.mark_as_parsed()

    class Augment(grain.RandomMapTransform):
        def random_map(self, element: Any, rng: np.random.Generator) -> Any:
            return transform(element, rng)

    def make(epochs: int) -> Any:
        sampler = grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=True, num_epochs=epochs, seed=0)
        return grain.DataLoader(data_source=source, sampler=sampler, operations=[Augment(), grain.Batch(BATCH)], worker_count=workers)

    loader = make(2)
    it = iter(loader)
    per_epoch = -(-len(source) // BATCH)
    # Grain batches across the epoch boundary; warm up with all but the last batch of epoch 1
    for _ in range(per_epoch - 1):
        next(it)

    def run() -> int:
        return sum(len(b["label"]) for b in it)

    return timed(run)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: torch,grain")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "db")
        start = time.perf_counter()
        build_db(db, args.records)
        print(f"built {args.records} JPEG datums (256×256) in {time.perf_counter() - start:.1f} s")
        source = LMDBSource(db)
        transform = CaffeTransform(crop_size=224, mirror=True, mean=(123.68, 116.78, 103.94))
        runs: list[tuple[str, Callable[[], tuple[float, int]]]] = [
            ("(a) one core, source + transform", lambda: bench_single_core(source, transform)),
            (f"(b) agnostic_prefetch.Loader, {args.workers} workers", lambda: bench_ours(source, transform, args.workers)),
        ]
        if "torch" not in skip:
            runs.append((f"(c) torch DataLoader, {args.workers} workers", lambda: bench_torch(source, transform, args.workers)))
        if "grain" not in skip:
            runs.append((f"(d) grain DataLoader, {args.workers} workers", lambda: bench_grain(source, transform, args.workers)))
        for name, run in runs:
            try:
                seconds, items = run()
                results[name] = items / seconds
            except Exception as exc:  # a competitor that does not run here is reported, not fatal
                results[name] = f"did not run: {type(exc).__name__}: {exc}"
    base = results["(a) one core, source + transform"]
    print(f"\n{'reader':45} {'items/s':>10} {'vs (a)':>8}")
    for name, rate in results.items():
        if isinstance(rate, float):
            print(f"{name:45} {rate:10.0f} {rate / base:7.2f}x")
        else:
            print(f"{name:45} {rate}")
    sys.stdout.flush()
    return results


@pytest.mark.bench
def test_bench_s2_decode_runs():
    results = main(["--records", "256"])
    assert all(isinstance(v, float) and v > 0 for k, v in results.items() if k.startswith(("(a)", "(b)")))


if __name__ == "__main__":
    main()
