"""Benchmark S1/S4/S5: the core loader against torch DataLoader and Grain, in one run.

    S1 hand-off     new 224x224x3 uint8 item per record, batch 64, 2 workers; the consumer
                    copies each batch once into a preallocated array. Bound by memory
                    bandwidth: reports bytes per batch, the machine's copy bandwidth with 1
                    and 2 threads, and a 2-core bound for the same work without any loader.
    S4 first batch  seconds from the constructor to the first batch, each run in a fresh
                    interpreter (imports happen before the clock), 2 process workers.
    S5 per batch    batch_size=1 of a one-int64 record, 2 process workers: batches/s.

Every throughput figure is the median of ``--repeats`` windows of ``--seconds`` each. The
loaders of one scenario are all built and warmed up first (worker start-up and the first
``--warmup`` seconds excluded), then measured in rounds, one window each per round, so a
ratio compares windows taken seconds apart. Each stream is endless (our ``epochs=None``,
an endless sampler for torch, ``num_epochs=None`` for Grain): no epoch boundary falls
inside a window.

    python benchmarks/bench_core.py [--quick] [--only S1,S4,S5] [--json out.json]
    pytest -m bench benchmarks/test_bench_core.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = (224, 224, 3)
IMAGE_BYTES = int(np.prod(IMAGE))
BATCH = 64
WORKERS = 2


# ---- sources (module level, so cloudpickle/spawn pickle them by reference) ---------------


class FreshImages:
    """Each item is a newly allocated 224x224x3 uint8 array (S1, S4)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": np.full(IMAGE, int(i) % 256, np.uint8)}


class TinyRecords:
    """Each item is one int64 (S5)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": np.int64(i)}


class Endless:
    """A torch sampler that cycles over ``range(n)`` forever (no epoch boundary in a window)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            yield i % self.n
            i += 1


# ---- loader factories: each returns (iterator, close) ----------------------------------------


def make_ours(source: Any, batch_size: int, workers: int = WORKERS, backend: str = "process") -> tuple[Iterator[Any], Callable[[], None]]:
    import agnostic_prefetch as ap

    loader = ap.Loader(source, batch_size, workers=workers, backend=backend, epochs=None)
    return iter(loader), loader.close


def make_torch(source: Any, batch_size: int, workers: int = WORKERS) -> tuple[Iterator[Any], Callable[[], None]]:
    import torch.utils.data as tud

    loader = tud.DataLoader(source, batch_size=batch_size, sampler=Endless(len(source)),
                            num_workers=workers, persistent_workers=True)
    it = iter(loader)

    def close() -> None:
        it._shutdown_workers()  # the documented way is dropping every reference; be explicit

    return it, close


def grain_ready() -> Any:
    import grain.python as grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags and refuses to run before they are parsed
        flags.FLAGS.mark_as_parsed()
    return grain


def make_grain(source: Any, batch_size: int, workers: int = WORKERS,
               transform: Callable[[Any, np.random.Generator], Any] | None = None,
               shuffle: bool = False) -> tuple[Iterator[Any], Callable[[], None]]:
    """Grain's DataLoader over ``source``, endless; ``transform(item, rng)`` runs as a RandomMapTransform."""
    grain = grain_ready()
    operations: list[Any] = []
    if transform is not None:
        class Augment(grain.RandomMapTransform):  # Grain cloudpickles operations into its workers
            def random_map(self, element: Any, rng: np.random.Generator) -> Any:
                return transform(element, rng)

        operations.append(Augment())
    sampler = grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=shuffle, num_epochs=None, seed=0)
    loader = grain.DataLoader(data_source=source, sampler=sampler,
                              operations=[*operations, grain.Batch(batch_size)], worker_count=workers)
    it = iter(loader)
    holder = [it]

    def close() -> None:
        it_ = holder.pop() if holder else None
        stop = getattr(it_, "stop", None) or getattr(it_, "close", None)
        if stop is not None:
            stop()
        del it_
        gc.collect()

    return it, close


# ---- measurement ------------------------------------------------------------------------------


def window(it: Iterator[Any], consume: Callable[[Any], None], seconds: float, min_batches: int = 5) -> tuple[float, int]:
    """Batches/s over at least ``seconds`` and ``min_batches`` (time.perf_counter)."""
    n = 0
    start = time.perf_counter()
    while True:
        consume(next(it))
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= min_batches:
            return n / elapsed, n


def compare(contenders: dict[str, Callable[[], tuple[Iterator[Any], Callable[[], None]]]],
            consume: Callable[[Any], None], warmup: float, seconds: float, repeats: int,
            log: Callable[[str], None], settle: float = 1.0) -> dict[str, dict[str, Any]]:
    """Build and warm up every contender, then measure them in interleaved rounds.

    Before each window the machine gets ``settle`` seconds, so the loader measured just
    before has refilled its read-ahead (torch's prefetch, Grain's 500-element buffers, our
    free slots) and gone idle instead of competing for the two cores."""
    live: dict[str, tuple[Iterator[Any], Callable[[], None]]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, make in contenders.items():
            try:
                t0 = time.perf_counter()
                it, close = make()
                live[name] = (it, close)
                window(it, consume, warmup)
                log(f"  {name}: started and warmed up in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:  # a competitor that does not run here is reported, not fatal
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"  {name}: FAILED {results[name]['error']}")
        rates: dict[str, list[float]] = {name: [] for name in live}
        for r in range(repeats):
            for name, (it, _) in live.items():
                time.sleep(settle)
                rate, n = window(it, consume, seconds)
                rates[name].append(rate)
                log(f"  round {r + 1}: {name:<22} {rate:9.1f} batches/s ({n} batches)")
        for name, rs in rates.items():
            results[name] = {"batches_per_s": statistics.median(rs), "windows": rs}
    finally:
        for name, (_it, close) in live.items():
            try:
                close()
            except Exception as exc:
                log(f"  {name}: close failed: {exc}")
        live.clear()
        gc.collect()
    return results


def copy_bandwidth(nbytes: int, threads: int, seconds: float) -> float:
    """Bytes copied per second by ``threads`` threads each running np.copyto on its own buffers."""
    pairs = [(np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)) for _ in range(threads)]
    for src, dst in pairs:
        np.copyto(dst, src)  # fault the pages in

    def run(pair: tuple[np.ndarray, np.ndarray], deadline: float) -> int:
        src, dst = pair
        done = 0
        while time.perf_counter() < deadline:
            np.copyto(dst, src)  # numpy releases the GIL for plain copies
            done += nbytes
        return done

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        total = sum(pool.map(run, pairs, [start + seconds] * threads))
        elapsed = time.perf_counter() - start
    return total / elapsed


def _work_loop(start: float, seconds: float, slots: int) -> float:
    """One process's share of :func:`work_bound`: batches/s from ``start`` (time.monotonic)."""
    ring = [np.empty((BATCH, *IMAGE), np.uint8) for _ in range(slots)]
    dst = np.empty_like(ring[0])
    for slot in ring:
        slot.fill(0)  # fault the pages in
    dst.fill(0)
    while time.monotonic() < start:  # start together with the other process
        time.sleep(0.001)
    done = 0
    began = time.perf_counter()
    while True:
        slot = ring[done % slots]
        for j in range(BATCH):
            slot[j] = np.full(IMAGE, j, np.uint8)
        np.copyto(dst, slot)
        done += 1
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            return done / elapsed


def work_bound(processes: int, seconds: float, slots_per_process: int = 3) -> float:
    """Batches/s for S1's unavoidable work with no loader at all: per batch, make 64 fresh
    items, write each once into a batch buffer (our worker's one write into the ring), copy
    the batch once more (the consumer's copy). Each process (fresh, spawned: no GIL shared)
    does whole batches and rotates over ``slots_per_process`` batch buffers as the ring does
    (2 x 3 = the default 6 slots), so the buffers do not sit in the 32 MB last-level cache.
    With 2 processes this is what the two cores can do: no loader here can beat it by much."""
    import multiprocessing

    if processes == 1:
        return _work_loop(0.0, seconds, slots_per_process)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        # spawn the processes first, then start them together
        list(pool.map(time.sleep, [0.0] * processes))
        start = time.monotonic() + 0.5
        rates = list(pool.map(_work_loop, [start] * processes, [seconds] * processes,
                              [slots_per_process] * processes))
    return sum(rates)


# ---- scenarios -----------------------------------------------------------------------------


def copy_out() -> Callable[[Any], None]:
    """S1's consumer: copies each batch's images once into one preallocated array."""
    dst = np.empty((BATCH, *IMAGE), np.uint8)

    def consume(batch: Any) -> None:
        image = batch["image"]
        if hasattr(image, "numpy"):
            image = image.numpy()
        np.copyto(dst, image)

    return consume


def s1(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    source = FreshImages(BATCH * 100_000)
    consume = copy_out()
    contenders = {
        "ours process w=2": lambda: make_ours(source, BATCH),
        "ours thread w=2": lambda: make_ours(source, BATCH, backend="thread"),
        "ours workers=0": lambda: make_ours(source, BATCH, workers=0),
        "torch w=2": lambda: make_torch(source, BATCH),
        "grain w=2": lambda: make_grain(source, BATCH),
    }
    log("S1 hand-off: 224x224x3 uint8, batch 64")
    out: dict[str, Any] = {"loaders": compare(contenders, consume, args.warmup, args.seconds, args.repeats, log, args.settle)}
    bw = max(0.5, args.seconds / 2)
    out["copy_GBps_1"] = statistics.median(copy_bandwidth(256 << 20, 1, bw) / 1e9 for _ in range(args.repeats))
    out["copy_GBps_2"] = statistics.median(copy_bandwidth(256 << 20, 2, bw) / 1e9 for _ in range(args.repeats))
    out["bound_1"] = statistics.median(work_bound(1, bw) for _ in range(args.repeats))
    out["bound_2"] = statistics.median(work_bound(2, bw) for _ in range(args.repeats))
    log(f"  copy bandwidth {out['copy_GBps_1']:.1f} GB/s (1 thread), {out['copy_GBps_2']:.1f} GB/s (2 threads); "
        f"no-loader work bound {out['bound_1']:.1f} / {out['bound_2']:.1f} batches/s (1 / 2 processes)")
    return out


FIRST_BATCH_CODE = r"""
import json, sys, time
sys.path.insert(0, {here!r})
import numpy as np
import bench_core as b
kind = {kind!r}
if kind == "ours":
    import agnostic_prefetch  # noqa: F401
elif kind == "torch":
    import torch.utils.data  # noqa: F401
else:
    b.grain_ready()
source = b.FreshImages(b.BATCH * 1000)
start = time.perf_counter()
it, close = getattr(b, "make_" + kind)(source, b.BATCH)
batch = next(it)
elapsed = time.perf_counter() - start
assert batch["image"].shape[0] == b.BATCH
close()
print(json.dumps({{"seconds": elapsed}}))
"""


def first_batch_once(kind: str) -> float:
    code = FIRST_BATCH_CODE.format(here=HERE, kind=kind)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} first-batch run failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def s4(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    log("S4 time to first batch: fresh interpreter, 224x224x3 uint8, batch 64, 2 process workers")
    times: dict[str, list[float]] = {"ours": [], "torch": [], "grain": []}
    errors: dict[str, str] = {}
    for r in range(args.first_batch_runs):
        for kind in times:  # interleaved, so drift in machine load hits all three alike
            if kind in errors:
                continue
            try:
                times[kind].append(first_batch_once(kind))
                log(f"  run {r + 1}: {kind:<6} {times[kind][-1]:.3f} s")
            except Exception as exc:
                errors[kind] = str(exc)
                log(f"  {kind}: FAILED {exc}")
    out: dict[str, Any] = {}
    for kind, ts in times.items():
        out[kind] = {"error": errors[kind]} if kind in errors else {"median_s": statistics.median(ts), "runs": ts}
    return out


def s5(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    source = TinyRecords(1_000_000)

    def consume(batch: Any) -> None:
        pass

    contenders = {
        "ours process w=2": lambda: make_ours(source, 1),
        "torch w=2": lambda: make_torch(source, 1),
        "grain w=2": lambda: make_grain(source, 1),
    }
    log("S5 per-batch overhead: batch_size=1, one int64 per record, 2 process workers")
    return {"loaders": compare(contenders, consume, args.warmup, args.seconds, args.repeats, log, args.settle)}


# ---- report --------------------------------------------------------------------------------


def _rate(res: dict[str, Any], name: str) -> float | None:
    return res.get(name, {}).get("batches_per_s")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def table(results: dict[str, Any]) -> str:
    lines = []
    if "S1" in results:
        r = results["S1"]
        loaders = r["loaders"]
        batch_mb = BATCH * IMAGE_BYTES / 1e6
        torch_r, grain_r = _rate(loaders, "torch w=2"), _rate(loaders, "grain w=2")
        dram_limit = r["copy_GBps_2"] * 1e9 / (2 * BATCH * IMAGE_BYTES)
        lines += [
            f"S1 hand-off (batch {BATCH} x 224x224x3 uint8 = {batch_mb:.2f} MB), median of windows",
            f"{'loader':<20} {'batches/s':>10} {'GB/s':>7} {'vs torch':>9} {'vs grain':>9} {'vs work bound':>14} {'vs copy limit':>14}",
        ]
        for name in loaders:
            rate = _rate(loaders, name)
            if rate is None:
                lines.append(f"{name:<20} {loaders[name].get('error', '')}")
                continue
            lines.append(f"{name:<20} {rate:10.1f} {rate * batch_mb / 1e3:7.2f} {_ratio(rate, torch_r):>9} "
                         f"{_ratio(rate, grain_r):>9} {rate / r['bound_2']:14.0%} {rate / dram_limit:14.0%}")
        lines += [
            f"copy bandwidth (np.copyto 256 MB): {r['copy_GBps_1']:.1f} GB/s 1 thread, {r['copy_GBps_2']:.1f} GB/s 2 threads",
            f"copy limit: 2 copies of the batch through memory (worker -> slot, slot -> consumer) at the "
            f"2-thread copy bandwidth = {dram_limit:.1f} batches/s",
            f"work bound: the same work with no loader (make 64 items, write into a rotating batch buffer, "
            f"copy once more): {r['bound_1']:.1f} batches/s 1 process, {r['bound_2']:.1f} batches/s 2 processes",
            "",
        ]
    if "S4" in results:
        r = results["S4"]
        lines.append("S4 time to first batch (fresh interpreter, constructor -> first next()), median")
        for kind in ("ours", "torch", "grain"):
            x = r.get(kind, {})
            if "median_s" in x:
                runs = ", ".join(f"{t:.3f}" for t in x["runs"])
                lines.append(f"{kind:<20} {x['median_s']:8.3f} s   runs: {runs}")
            else:
                lines.append(f"{kind:<20} {x.get('error', 'n/a')[:200]}")
        lines.append("")
    if "S5" in results:
        loaders = results["S5"]["loaders"]
        torch_r, grain_r = _rate(loaders, "torch w=2"), _rate(loaders, "grain w=2")
        lines += ["S5 per-batch overhead (batch_size=1, one int64), median of windows",
                  f"{'loader':<20} {'batches/s':>10} {'vs torch':>9} {'vs grain':>9}"]
        for name in loaders:
            rate = _rate(loaders, name)
            if rate is None:
                lines.append(f"{name:<20} {loaders[name].get('error', '')}")
                continue
            lines.append(f"{name:<20} {rate:10.1f} {_ratio(rate, torch_r):>9} {_ratio(rate, grain_r):>9}")
        lines.append("")
    return "\n".join(lines)


def child_pids() -> dict[int, str]:
    """Live processes whose parent is this one, with their command lines (left-over workers
    would show here; multiprocessing's resource_tracker, which Grain's shared memory starts
    and which exits with this process, is listed apart by the caller)."""
    me, found = os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    return found


def leftover_workers() -> dict[int, str]:
    """Children still alive that are not multiprocessing's resource tracker."""
    return {pid: cmd for pid, cmd in child_pids().items() if "resource_tracker" not in cmd}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows and fewer runs (a smoke test)")
    parser.add_argument("--only", default="S1,S4,S5", help="comma-separated scenarios")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measured window (default 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds after start-up (default 1)")
    parser.add_argument("--settle", type=float, default=None, help="idle seconds before each window (default 1.5)")
    parser.add_argument("--repeats", type=int, default=None, help="measured windows per loader (default 3)")
    parser.add_argument("--first-batch-runs", type=int, default=None, help="fresh-interpreter runs for S4 (default 7)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (0.5 if quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.settle = args.settle if args.settle is not None else (0.3 if quick else 1.5)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    args.first_batch_runs = args.first_batch_runs if args.first_batch_runs is not None else (1 if quick else 7)
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    unknown = only - {"S1", "S4", "S5"}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from S1,S4,S5")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": {"nproc": os.cpu_count(), "cpu": cpu_model()},
                               "settings": {k: getattr(args, k) for k in ("seconds", "warmup", "settle", "repeats", "first_batch_runs")}}
    for name, fn in (("S1", s1), ("S4", s4), ("S5", s5)):
        if name in only:
            results[name] = fn(args, log)
    time.sleep(0.2)  # let just-closed workers finish exiting
    leftover = leftover_workers()
    results["leftover_children"] = leftover
    print(table(results))
    print(f"left-over child processes (besides multiprocessing's resource_tracker): {leftover or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
