"""Benchmark G1/G2: host-to-device copies of each stager on an NVIDIA GPU, and how much of a step they overlap.

G1, throughput. Batches of ``--batch`` x 224x224x3 uint8 are taken from a Loader's ring once
and held (so every batch is a view of the ring, which the stagers page-lock), then replayed
``--batches`` times through each stager; the consumer does nothing but take them, and the
clock stops after a final synchronise. In the same run:

    pinned limit      torch: .to("cuda", non_blocking=True) of one page-locked torch buffer
    pageable          the same from ordinary (pageable) memory
    torch_prefetch    thread=True and thread=False
    cupy_prefetch     thread=True and thread=False (when CuPy is installed)
    prefetch_to_device  JAX, thread=True and thread=False (when JAX sees a GPU)

    end to end: Loader(workers=W) + torch_prefetch(device="cuda") against
    torch.utils.data.DataLoader(num_workers=W, pin_memory=True) + .cuda(non_blocking=True),
    the same synthetic source (a fresh image per item), the same workers.

G2, overlap. A GPU step that takes about as long as one batch's copy (a spin kernel) runs on
the consumer stream after every batch: overlap = (step alone + copies alone - both) /
min(step alone, copies alone); 1 means the copy is hidden entirely, 0 that it is serial.

Without a CUDA GPU it says so and exits 0. ``--smoke-cpu`` runs the same harness on the CPU
(torch CPU tensors, a sleep for the step) to check the script itself, not to measure.

    python benchmarks/bench_gpu.py [--batch 256] [--batches 300] [--repeats 3] [--workers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch and CuPy

from bench_core import IMAGE, FreshImages  # noqa: E402  (workers import it by name)


def held_ring_batches(batch: int, count: int) -> tuple[Any, list[dict[str, np.ndarray]]]:
    """``count`` batches that are views of one Loader's ring (kept leased while held)."""
    import agnostic_prefetch as ap

    loader = ap.Loader(FreshImages(batch * count), batch, workers=0, slots=count + 2)
    it = iter(loader)
    held = [next(it) for _ in range(count)]
    assert loader.stats()["copied_out"] == 0
    return loader, held


def replay(batches: list[Any], n: int) -> Iterator[Any]:
    for i in range(n):
        yield batches[i % len(batches)]


def timed(run: Callable[[], None], repeats: int) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times), "runs": times}


class Env:
    """What this machine can run: torch CUDA, CuPy, JAX on a GPU; the step and the sync."""

    def __init__(self, smoke_cpu: bool) -> None:
        import torch

        self.torch = torch
        self.cpu = smoke_cpu
        self.device = "cpu" if smoke_cpu else "cuda"
        self.cupy = None if smoke_cpu else _optional_cupy()
        self.jax = None if smoke_cpu else _optional_gpu_jax()
        self.cycles_per_ms = 0.0 if smoke_cpu else self._calibrate()

    def sync(self) -> None:
        if not self.cpu:
            self.torch.cuda.synchronize()
            if self.cupy is not None:
                self.cupy.cuda.Device().synchronize()

    def _calibrate(self) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        return 10_000_000 / start.elapsed_time(end)

    def torch_step(self, ms: float) -> Callable[[Any], None]:
        if self.cpu:
            return lambda batch: time.sleep(ms / 1000)
        cycles = int(ms * self.cycles_per_ms)
        return lambda batch: self.torch.cuda._sleep(cycles)  # on the current (consumer) stream

    def cupy_step(self, ms: float) -> Callable[[Any], None]:
        cupy = self.cupy
        spin = cupy.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
            long long start = clock64(); while (clock64() - start < cycles) {} }''', "spin")
        cycles = int(ms * self.cycles_per_ms)
        return lambda batch: spin((1,), (1,), (np.int64(cycles),))


def _optional_cupy() -> Any:
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def _optional_gpu_jax() -> Any:
    try:
        import jax

        return jax if jax.default_backend() == "gpu" else None
    except Exception:
        return None


# ---- G1: throughput -------------------------------------------------------------------------


def copy_limits(env: Env, nbytes: int, n: int, repeats: int) -> dict[str, Any]:
    torch = env.torch
    out: dict[str, Any] = {}
    for name, pinned in (("pinned limit", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and not env.cpu)
        host.fill_(7)

        def run(host: Any = host) -> None:
            for _ in range(n):
                host.to(env.device, non_blocking=True)
            env.sync()

        out[name] = timed(run, repeats)
    return out


def stager_runs(env: Env, held: list[Any], n: int, repeats: int) -> dict[str, Any]:
    from agnostic_prefetch import prefetch_to_device
    from agnostic_prefetch.adapters import cupy_prefetch, torch_prefetch

    makers: dict[str, Callable[[Iterator[Any]], Any]] = {}
    for thread in (True, False):
        makers[f"torch_prefetch thread={thread}"] = (
            lambda src, t=thread: torch_prefetch(src, 2, device=env.device, thread=t))
        if env.cupy is not None:
            makers[f"cupy_prefetch thread={thread}"] = lambda src, t=thread: cupy_prefetch(src, 2, thread=t)
        if env.jax is not None:
            makers[f"prefetch_to_device (JAX) thread={thread}"] = (
                lambda src, t=thread: prefetch_to_device(src, 2, thread=t))
    out: dict[str, Any] = {}
    for name, make in makers.items():
        out[name] = guarded(lambda make=make: timed(lambda: drain(env, make(replay(held, n))), repeats))
    return out


def drain(env: Env, stage: Any) -> None:
    last = None
    for batch in stage:
        last = batch
    if env.jax is not None and last is not None and type(last["image"]).__module__.startswith("jax"):
        env.jax.block_until_ready(last)
    env.sync()


def end_to_end(env: Env, batch: int, n: int, workers: int, repeats: int) -> dict[str, Any]:
    """Both pipelines started and warmed up by one batch first: start-up is not timed."""
    import torch.utils.data

    import agnostic_prefetch as ap
    from agnostic_prefetch.adapters import torch_prefetch

    def ours() -> dict[str, Any]:
        with ap.Loader(FreshImages(batch * (n * repeats + 1)), batch, workers=workers) as loader:
            stage = torch_prefetch(loader, 2, device=env.device)
            next(stage)
            env.sync()
            return timed(lambda: drain_some(env, stage, n, lambda b: b), repeats)

    def theirs() -> dict[str, Any]:
        loader = torch.utils.data.DataLoader(
            TorchImages(batch * (n * repeats + 1)), batch_size=batch, num_workers=workers,
            pin_memory=not env.cpu, persistent_workers=True,
            multiprocessing_context="spawn")  # no fork of a process with CUDA and JAX threads
        it = iter(loader)
        next(it)["image"].to(env.device, non_blocking=True)
        env.sync()
        try:
            return timed(lambda: drain_some(env, it, n, lambda b: b["image"].to(env.device, non_blocking=True)),
                         repeats)
        finally:
            it._shutdown_workers()

    return {"ours: Loader + torch_prefetch": guarded(ours),
            "torch DataLoader(pin_memory=True) + .cuda(non_blocking=True)": guarded(theirs)}


def drain_some(env: Env, batches: Iterator[Any], n: int, use: Callable[[Any], Any]) -> None:
    for _ in range(n):
        use(next(batches))
    env.sync()


class TorchImages(FreshImages):
    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        return {"image": torch.from_numpy(super().__getitem__(i)["image"])}


# ---- G2: overlap ----------------------------------------------------------------------------


def overlap(env: Env, held: list[Any], n: int, repeats: int, copy_ms: float) -> dict[str, Any]:
    from agnostic_prefetch.adapters import cupy_prefetch, torch_prefetch

    cases: list[tuple[str, Callable[[Iterator[Any], bool], Any], Callable[[Any], None]]] = [
        ("torch_prefetch", lambda src, t: torch_prefetch(src, 2, device=env.device, thread=t), env.torch_step(copy_ms))]
    if env.cupy is not None:
        cases.append(("cupy_prefetch", lambda src, t: cupy_prefetch(src, 2, thread=t), env.cupy_step(copy_ms)))
    out: dict[str, Any] = {}
    for name, make, step in cases:
        for thread in (True, False):
            def copies(make: Any = make, thread: bool = thread) -> None:
                drain(env, make(replay(held, n), thread))

            def steps(make: Any = make, step: Any = step) -> None:
                fixed = next(iter(make(iter(held[:1]), False)))
                for _ in range(n):
                    step(fixed)
                env.sync()

            def both(make: Any = make, thread: bool = thread, step: Any = step) -> None:
                for batch in make(replay(held, n), thread):
                    step(batch)
                env.sync()

            def measure(copies: Any = copies, steps: Any = steps, both: Any = both) -> dict[str, Any]:
                a, s, b = (timed(f, repeats)["seconds"] for f in (copies, steps, both))
                return {"copies_s": a, "steps_s": s, "both_s": b,
                        "overlap": (a + s - b) / min(a, s) if min(a, s) > 0 else float("nan")}

            out[f"{name} thread={thread}"] = guarded(measure)
    return out


# ---- driver ---------------------------------------------------------------------------------


def guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One measurement; its error is recorded instead of ending a run that cannot be repeated."""
    try:
        return run()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def machine(env: Env) -> dict[str, Any]:
    torch = env.torch
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if not env.cpu:
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = _driver_version()
        info["cupy"] = getattr(env.cupy, "__version__", None)
        info["jax"] = getattr(env.jax, "__version__", None)
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=300, help="batches per timed run")
    p.add_argument("--held", type=int, default=6, help="ring batches replayed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--smoke-cpu", action="store_true", help="run the harness on the CPU (no figures)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    if not args.smoke_cpu and not torch.cuda.is_available():
        print("bench_gpu: skipped, no CUDA GPU here (torch.cuda.is_available() is False)")
        return {"skipped": "no CUDA GPU"}
    env = Env(args.smoke_cpu)
    nbytes = args.batch * int(np.prod(IMAGE))
    results: dict[str, Any] = {"machine": machine(env), "batch_bytes": nbytes, "args": vars(args)}
    print(f"machine: {results['machine']}; batch {args.batch} x {IMAGE} uint8 = {nbytes / 1e6:.1f} MB", flush=True)
    loader, held = held_ring_batches(args.batch, args.held)
    try:
        throughput = {**copy_limits(env, nbytes, args.batches, args.repeats),
                      **stager_runs(env, held, args.batches, args.repeats)}
        results["G1"] = throughput
        results["G1 end to end"] = end_to_end(env, args.batch, max(20, args.batches // 5), args.workers, args.repeats)
        limit = throughput["pinned limit"]["seconds"]
        copy_ms = 1000 * limit / args.batches
        results["G2"] = overlap(env, held, max(50, args.batches // 3), args.repeats, copy_ms)
    finally:
        del held
        loader.close()
    report(results, args.batches, nbytes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def report(results: dict[str, Any], n: int, nbytes: int) -> None:
    limit = results["G1"]["pinned limit"]["seconds"]
    print(f"\nG1 host-to-device, {n} batches of {nbytes / 1e6:.1f} MB (median of runs)")
    print(f"{'path':58} {'GB/s':>8} {'of pinned limit':>16}")
    for name, r in results["G1"].items():
        if "error" in r:
            print(f"{name:58} FAILED {r['error']}")
            continue
        print(f"{name:58} {n * nbytes / r['seconds'] / 1e9:8.2f} {limit / r['seconds']:15.0%}")
    print(f"\nG1 end to end, {max(20, n // 5)} batches (loader and copy together; the same source and workers)")
    e2e = results["G1 end to end"]
    rates = {k: v for k, v in e2e.items() if "error" not in v}
    for name, r in e2e.items():
        print(f"{name:58} " + (f"FAILED {r['error']}" if "error" in r else f"{r['seconds']:.3f} s"))
    if len(rates) == 2:
        ours, theirs = (v["seconds"] for v in rates.values())
        print(f"ours over the DataLoader: {theirs / ours:.2f}x")
    print("\nG2 overlap of the copies with a GPU step as long as one copy (1 = hidden)")
    for name, r in results["G2"].items():
        print(f"{name:58} " + (f"FAILED {r['error']}" if "error" in r else
              f"overlap {r['overlap']:.0%} (copies {r['copies_s']:.3f} s, steps {r['steps_s']:.3f} s, both {r['both_s']:.3f} s)"))


@pytest.mark.bench
def test_bench_gpu_harness_runs_on_the_cpu() -> None:
    pytest.importorskip("torch")
    results = main(["--smoke-cpu", "--batch", "4", "--batches", "12", "--held", "3", "--repeats", "1", "--workers", "1"])
    failures = {k: v["error"] for part in ("G1", "G1 end to end", "G2") for k, v in results[part].items() if "error" in v}
    assert not failures, failures


if __name__ == "__main__":
    main(sys.argv[1:])
