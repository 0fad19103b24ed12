"""Benchmark: the formats people keep data in, shuffled random access, against peers in one run.

Every peer reads the same files with the same workers (``--workers``, 2), global batches of
``--batch`` (64), shuffled, records of about 1 KB and about 100 KB (``--sizes``; 20,000 and
2,000 of them, ``--records``), measured after one epoch of warm-up (caches full, as in
training), over one epoch or 60 batches, whichever is more:

    arrayrecord   ours: ap.ArrayRecordSource(path, decode=as_array)  vs  Grain's DataLoader over
                  its ArrayRecordDataSource on the same file (the same as_array map), both with
                  2 workers; files written by array_record's writer with group_size:1 (one record
                  per chunk, the setting Grain recommends for random access).
    parquet       ours: ap.ParquetSource(path) over the same rows  vs  torch's DataLoader over
                  the Hugging Face dataset below in numpy format.
    huggingface   ours: the datasets.Dataset itself, passed to ap.Loader  vs  torch's
                  DataLoader(dataset.with_format("numpy"), shuffle=True, num_workers=2).
    s3            ours over the Parquet file on a local S3-compatible server (moto's server
                  mode, started here) against the same file on disk: with the row-group cache
                  (warm after the first epoch) and without it (cache_bytes=0: every batch reads
                  the row groups it touches).

An item is ``{"data": uint8[size], "label": int64}`` (from the Hugging Face dataset in numpy
format, ``data`` is int64, as datasets gives a list of integers, for ours and torch alike).
Reported: items/s, medians of ``--repeats`` interleaved rounds, and ours over the peer as the
median of per-round ratios.

    python benchmarks/bench_formats.py [--sizes 1000,100000 --records 20000,2000] [--json out.json]
    pytest -m bench benchmarks/bench_formats.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from bench_core import cpu_model, grain_ready, leftover_workers

import agnostic_prefetch as ap

Peer = Callable[[], tuple[Iterator[Any], Callable[[], None]]]


def as_array(record: bytes) -> dict[str, Any]:
    """A record's bytes as the item every peer delivers: the payload and its label (first 8 bytes)."""
    data = np.frombuffer(record, np.uint8)
    return {"data": data, "label": data[:8].view(np.int64)[0]}


class GrainAsArray:  # made a grain.MapTransform subclass at run time (grain is imported lazily)
    def map(self, record: bytes) -> dict[str, Any]:
        return as_array(record)


def payloads(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = rng.integers(0, 256, size, np.uint8)
        body[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)
        out.append(body.tobytes())
    return out


# ---- the files ----------------------------------------------------------------------------

def write_arrayrecord(path: str, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


def write_parquet_and_hf(directory: str, records: list[bytes], size: int) -> tuple[str, Any]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pa.array([np.frombuffer(r, np.uint8) for r in records], pa.list_(pa.uint8(), size))
    labels = pa.array(np.arange(len(records), dtype=np.int64))
    table = pa.table({"data": data, "label": labels})
    path = os.path.join(directory, f"rows-{size}.parquet")
    pq.write_table(table, path, row_group_size=max(1, (1 << 20) // size))
    features = datasets.Features({"data": datasets.Sequence(datasets.Value("uint8"), length=size),
                                  "label": datasets.Value("int64")})
    hf = datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))
    hf_dir = os.path.join(directory, f"hf-{size}")
    hf.save_to_disk(hf_dir)
    return path, datasets.load_from_disk(hf_dir)


# ---- the peers ----------------------------------------------------------------------------

def ours(source: Any, batch: int, workers: int) -> Peer:
    def make() -> tuple[Iterator[Any], Callable[[], None]]:
        loader = ap.Loader(source, batch, workers=workers, shuffle=True, seed=0, epochs=None)
        return iter(loader), loader.close
    return make


def grain_arrayrecord(path: str, batch: int, workers: int) -> Peer:
    def make() -> tuple[Iterator[Any], Callable[[], None]]:
        grain = grain_ready()
        transform = type("AsArray", (grain.MapTransform,), {"map": GrainAsArray.map})()
        source = grain.ArrayRecordDataSource([path])
        sampler = grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=True,
                                     num_epochs=None, seed=0)
        loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[transform, grain.Batch(batch)],
                                  worker_count=workers)
        it = iter(loader)
        return it, lambda: _stop(it)
    return make


def torch_hf(dataset: Any, batch: int, workers: int) -> Peer:
    def make() -> tuple[Iterator[Any], Callable[[], None]]:
        import torch

        loader = torch.utils.data.DataLoader(dataset.with_format("numpy"), batch_size=batch, shuffle=True,
                                             num_workers=workers, persistent_workers=True, drop_last=True)

        def endless() -> Iterator[Any]:
            while True:
                yield from loader
        return endless(), lambda: _stop(loader)
    return make


def _stop(obj: Any) -> None:
    it = getattr(obj, "_iterator", None) or obj
    for name in ("stop", "_shutdown_workers", "close"):
        fn = getattr(it, name, None)
        if callable(fn):
            fn()
            break
    gc.collect()


def rate(make: Peer, batch: int, warmup: int, batches: int) -> float:
    it, close = make()
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batch * batches / (time.perf_counter() - start)
    finally:
        del it
        close()


def compare(peers: dict[str, Peer], pairs: list[tuple[str, str]], args: argparse.Namespace,
            label: str) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in peers}
    for r in range(args.repeats):
        for name, make in peers.items():
            warmup = args.epoch_batches if args.warmup < 0 else args.warmup
            batches = args.batches or max(60, args.epoch_batches)
            rates[name].append(rate(make, args.batch, warmup, batches))
        print(f"  {label} round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}/s" for n, v in rates.items()), flush=True)
    out = {name: {"items_per_s": statistics.median(v), "runs": v} for name, v in rates.items()}
    for a, b in pairs:
        out[a][f"vs {b}"] = statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000", help="record sizes in bytes")
    parser.add_argument("--records", default="20000,2000", help="records per size (20 MB and 200 MB)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=0, help="measured batches (0: one epoch, at least 60)")
    parser.add_argument("--warmup", type=int, default=-1, help="batches before measuring (-1: one epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated: grain, torch, s3")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"machine": {"nproc": os.cpu_count(), "cpu": cpu_model()}, "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp, _s3_server(skip) as s3:
        for size, n in zip((int(s) for s in args.sizes.split(",")), (int(r) for r in args.records.split(",")),
                           strict=True):
            epoch = -(-n // args.batch)
            args.epoch_batches = epoch
            print(f"records of {size:,} bytes: {n:,} ({n * size / 1e6:,.0f} MB), {epoch} batches an epoch", flush=True)
            records = payloads(n, size)
            ar = os.path.join(tmp, f"records-{size}.array_record")
            write_arrayrecord(ar, records)
            parquet, hf = write_parquet_and_hf(tmp, records, size)
            del records
            peers: dict[str, Peer] = {"ours arrayrecord": ours(ap.ArrayRecordSource(ar, decode=as_array),
                                                               args.batch, args.workers)}
            pairs = []
            if "grain" not in skip:
                peers["grain arrayrecord"] = grain_arrayrecord(ar, args.batch, args.workers)
                pairs.append(("ours arrayrecord", "grain arrayrecord"))
            peers["ours parquet"] = ours(ap.ParquetSource(parquet), args.batch, args.workers)
            peers["ours huggingface"] = ours(hf, args.batch, args.workers)
            if "torch" not in skip:
                peers["torch huggingface"] = torch_hf(hf, args.batch, args.workers)
                pairs += [("ours parquet", "torch huggingface"), ("ours huggingface", "torch huggingface")]
            if s3 is not None:  # warm: the row-group cache holds the file; cold: every batch reads
                url = s3.upload(parquet, f"rows-{size}.parquet")
                peers["ours parquet s3"] = ours(ap.ParquetSource(url), args.batch, args.workers)
                peers["ours parquet uncached"] = ours(ap.ParquetSource(parquet, cache_bytes=0), args.batch,
                                                      args.workers)
                peers["ours parquet s3 uncached"] = ours(ap.ParquetSource(url, cache_bytes=0), args.batch,
                                                         args.workers)
                pairs += [("ours parquet s3", "ours parquet"), ("ours parquet s3 uncached", "ours parquet uncached")]
            results[f"size {size}"] = compare(peers, pairs, args, f"{size:,} B")
            _print(results[f"size {size}"], size)
    results["leftover_children"] = leftover_workers()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def _print(found: dict[str, Any], size: int) -> None:
    print(f"\nrecords of {size:,} bytes; items/s, medians (ratios: medians of per-round ratios)")
    for name, r in found.items():
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r.items() if k.startswith("vs "))
        print(f"  {name:<22} {r['items_per_s']:>12,.0f}  {ratios}")
    print(flush=True)


class _s3_server:
    """A local S3-compatible server (moto) for the object-storage rows, unless skipped."""

    def __init__(self, skip: set[str]) -> None:
        self.skip = "s3" in skip
        self.patch: Any = None

    def __enter__(self) -> Any:
        if self.skip:
            return None
        try:
            sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
            from s3_server import s3_server
        except ImportError as exc:
            print(f"s3 rows skipped: {exc}")
            return None
        self.patch = pytest.MonkeyPatch()
        self.cm = s3_server(self.patch)
        return self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.patch is not None:
            self.cm.__exit__(*exc)
            self.patch.undo()


@pytest.mark.bench
def test_formats_short_run() -> None:
    out = main(["--sizes", "1000", "--records", "2000", "--batches", "5", "--warmup", "2", "--repeats", "1"])
    assert out["size 1000"]["ours arrayrecord"]["items_per_s"] > 0
    assert not out["leftover_children"]


if __name__ == "__main__":
    main()
