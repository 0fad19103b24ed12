"""Benchmark S3: does the training step wait for data? Device stage vs none vs flax over torch.

Data: the demo's LMDB of JPEG Caffe Datums (random crops of the scikit-image photographs,
64×64), decoded and augmented (mirror, scale to float32) per item, batch 64.

Part 1, an accelerator-like step: a real ``jax.device_put`` of the batch (the arrays are
touched on device), then ``time.sleep(step)`` — the step holds the loop for a fixed time
without using a host core, as an accelerator would. ``step`` is set to the loader's own
time per batch, measured first. The ideal wall time is ``max(steps × step, steps × load)``,
with the step timed alone on one reused batch (a sleep step overshoots its sleep a little).

    (a) no prefetch: each batch loaded in the loop (Loader with workers=0), then the step
    (b) flax.jax_utils.prefetch_to_device(size=2) over torch's DataLoader (2 workers)
    (c) Loader (2 workers) + prefetch_to_device(size=2, thread=False): pull and dispatch in next()
    (d) the same with thread=True, the default (pull and dispatch in a background thread)
    (h) Loader (2 workers) + torch_prefetch(size=2, device="cpu", thread=False): the same
        stage with the torch placement (zero-copy CPU tensors), in next()
    (i) the same with thread=True, the default

Part 2, a real XLA CPU step (the demo's CNN, jitted) instead of the sleep: now the step's
XLA threads and the two loader workers share the machine's cores.

    python benchmarks/bench_s3_device.py [--steps 150] [--rounds 3] [--batch-size 64] [--workers 2]
    python benchmarks/bench_s3_device.py --step-ms 7.5 --loops cd --rounds 1 --steps 400   # fixed step
    pytest -m bench benchmarks/bench_s3_device.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest

from agnostic_prefetch import _demo
from agnostic_prefetch.caffe import LMDBSource
from agnostic_prefetch.device import prefetch_to_device
from agnostic_prefetch.loader import Loader


def loop(batches: Iterable[Any], steps: int, step: Callable[[Any], None]) -> dict[str, float]:
    """Run ``steps`` steps; time spent getting batches vs the whole loop (after one warm-up)."""
    it = iter(batches)
    step(next(it))  # warm-up: worker start-up, first transfer, compilation
    waited = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - t0
        step(batch)
    wall = time.perf_counter() - started
    return {"wall": wall, "wait": waited}


def sleep_step(seconds: float) -> Callable[[Any], None]:
    import jax

    def step(batch: Any) -> None:
        batch = jax.device_put(batch)  # a no-op for arrays already on device
        jax.block_until_ready(batch)
        time.sleep(seconds)  # the accelerator is busy; the host cores are free

    return step


def tensor_sleep_step(seconds: float) -> Callable[[Any], None]:
    """The sleep step for torch tensors: touch each batch, then hold the loop."""

    def step(batch: Any) -> None:
        batch["image"].data_ptr()
        time.sleep(seconds)

    return step


def xla_step() -> Callable[[Any], None]:
    import jax

    train = _demo.make_step()
    state = {"params": _demo.init_params(jax.random.PRNGKey(0), len(_demo.PHOTOS))}
    state["velocity"] = jax.tree_util.tree_map(np.zeros_like, state["params"])

    def step(batch: Any) -> None:
        batch = jax.device_put(batch)
        if batch["image"].ndim == 5:  # flax's leading device axis
            batch = jax.tree_util.tree_map(lambda x: x[0], batch)
        state["params"], state["velocity"], loss, _ = train(state["params"], state["velocity"], batch)
        loss.block_until_ready()

    return step


class TorchDataset:
    """The same source and transform as a torch map-style dataset (items as numpy)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        rng = np.random.default_rng(i)
        return _demo.augment(self.source[i], rng)


def _numpy_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def torch_loader(db: str, batch_size: int, workers: int) -> Any:
    """torch's DataLoader over the same source and augmentation, batches as numpy."""
    import torch.utils.data

    return torch.utils.data.DataLoader(
        TorchDataset(LMDBSource(db)), batch_size=batch_size, shuffle=True, num_workers=workers,
        collate_fn=_numpy_collate, drop_last=True, persistent_workers=True, prefetch_factor=2,
        multiprocessing_context="spawn")  # JAX is running: forking it can deadlock


def flax_prefetch(batches: Iterable[dict[str, Any]]) -> Iterator[Any]:
    """flax.jax_utils.prefetch_to_device(size=2) onto the first device."""
    import jax
    from flax import jax_utils

    with_device_axis = ({k: np.asarray(v)[None] for k, v in b.items()} for b in batches)  # flax wants one
    return jax_utils.prefetch_to_device(with_device_axis, 2, devices=jax.local_devices()[:1])


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Epoch after epoch of a loader that ends each epoch."""
    while True:
        yield from loader


def torch_flax_batches(db: str, batch_size: int, workers: int) -> Any:
    return flax_prefetch(endless(torch_loader(db, batch_size, workers)))


def ours(db: str, batch_size: int, workers: int, thread: bool) -> tuple[Loader, Any]:
    # Slots: the step's batch, 2 in flight, 1 being pulled, 1 the thread frees late, 1 spare.
    loader = Loader(LMDBSource(db), batch_size, workers=workers, slots=workers + 6, shuffle=True,
                    epochs=None, drop_remainder=True, transform=_demo.augment)
    return loader, prefetch_to_device(loader, size=2, thread=thread)


def torch_stage(loader: Loader, thread: bool) -> Any:
    from agnostic_prefetch.adapters import torch_prefetch

    return torch_prefetch(loader, 2, device="cpu", thread=thread)


def ours_torch(db: str, batch_size: int, workers: int, thread: bool) -> tuple[Loader, Any]:
    loader = Loader(LMDBSource(db), batch_size, workers=workers, shuffle=True, epochs=None,
                    drop_remainder=True, transform=_demo.augment)
    return loader, torch_stage(loader, thread)


def load_time_per_batch(db: str, batch_size: int, workers: int, batches: int) -> float:
    """The loader's own time per batch at full speed (nothing else running)."""
    with Loader(LMDBSource(db), batch_size, workers=workers, shuffle=True, epochs=None,
                drop_remainder=True, transform=_demo.augment) as loader:
        it = iter(loader)
        for _ in range(3):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - start) / batches


def run(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3, help="each loop runs this often, interleaved")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--records", type=int, default=2400)
    p.add_argument("--skip-torch", action="store_true", help="leave out (b)")
    p.add_argument("--skip-torch-stage", action="store_true", help="leave out (h) and (i)")
    p.add_argument("--step-ms", type=float, default=None,
                   help="fix the sleep step (1.00x) at this length instead of the loader's own "
                        "time per batch: a fixed step compares versions across noisy runs")
    p.add_argument("--loops", default="abcdefghi", help="letters of the loops to run (default all)")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_s3_")
    runs: dict[str, list[dict[str, float]]] = {}

    def record(name: str, result: dict[str, float], ideal: float) -> None:
        runs.setdefault(name, []).append({**result, "ideal": ideal})

    def fresh_loop(workers: int) -> Loader:
        return Loader(LMDBSource(db), args.batch_size, workers=workers, shuffle=True, epochs=None,
                      drop_remainder=True, transform=_demo.augment)

    try:
        db = os.path.join(tmp, "photos_lmdb")
        _demo.build_database(tmp, db, args.records)
        load = load_time_per_batch(db, args.batch_size, args.workers, max(20, args.steps // 3))
        one_core = load_time_per_batch(db, args.batch_size, 0, 10)
        print(f"loader time per batch: {1000 * load:.1f} ms with {args.workers} workers, "
              f"{1000 * one_core:.1f} ms in the loop (workers=0); step := {1000 * load:.1f} ms sleep")
        # Each step alone (one batch reused): what an infinitely fast loader would give. A
        # sleep step takes a little longer than its sleep (the wake-up, the device_put).
        with Loader(LMDBSource(db), args.batch_size, workers=0, transform=_demo.augment) as one:
            fixed = next(prefetch_to_device([next(iter(one))]))
        # At step == load a queue fed exactly as fast as it drains waits on every hiccup;
        # 1.25 x load shows the same loops with a little slack.
        base = load if args.step_ms is None else args.step_ms / 1000
        if args.step_ms is not None:
            print(f"step fixed at {args.step_ms:.2f} ms (1.00x) by --step-ms")
        steps = {f"sleep {ratio:.2f}x load": sleep_step(ratio * base) for ratio in (1.0, 1.25)}
        if set(args.loops) & set("efg"):
            steps["XLA step"] = xla_step()
        tensor_steps = {f"sleep {ratio:.2f}x load": tensor_sleep_step(ratio * base) for ratio in (1.0, 1.25)}
        with Loader(LMDBSource(db), args.batch_size, workers=0, transform=_demo.augment) as one:
            fixed_tensors = next(iter(torch_stage([next(iter(one))], thread=False)))
        for _ in range(args.rounds):
            for tag, step in steps.items():
                xla = tag == "XLA step"
                alone = {tag: loop(iter(lambda: fixed, None), args.steps, step)["wall"]}  # this round's
                print(f"{tag}: the step alone takes {1000 * alone[tag] / args.steps:.2f} ms")
                ideal = max(alone[tag], args.steps * load)
                if (xla or tag.startswith("sleep 1.00")) and set(args.loops) & set("ae"):
                    with fresh_loop(0) as loader:
                        record(f"({'e' if xla else 'a'}) no prefetch, {tag}", loop(loader, args.steps, step),
                               alone[tag] + args.steps * one_core)
                if not xla and not args.skip_torch and "b" in args.loops:
                    record(f"(b) flax prefetch over torch DataLoader, {tag}",
                           loop(torch_flax_batches(db, args.batch_size, args.workers), args.steps, step), ideal)
                for thread in (False, True):
                    letter = ("g" if thread else "f") if xla else ("d" if thread else "c")
                    if letter not in args.loops:
                        continue
                    loader, batches = ours(db, args.batch_size, args.workers, thread)
                    with loader:
                        record(f"({letter}) ours thread={thread}, {tag}", loop(batches, args.steps, step), ideal)
                        batches.close()
                if xla or args.skip_torch_stage:
                    continue
                tensor_step = tensor_steps[tag]
                tensor_alone = loop(iter(lambda: fixed_tensors, None), args.steps, tensor_step)["wall"]
                for thread in (False, True):
                    if ("i" if thread else "h") not in args.loops:
                        continue
                    loader, batches = ours_torch(db, args.batch_size, args.workers, thread)
                    with loader:
                        record(f"({'i' if thread else 'h'}) torch_prefetch thread={thread}, {tag}",
                               loop(batches, args.steps, tensor_step), max(tensor_alone, args.steps * load))
                        batches.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {name: summarize(rs) for name, rs in sorted(runs.items(), key=lambda kv: order_key(kv[0]))}
    print_table(summary, args.steps, args.rounds)
    return summary


def order_key(name: str) -> tuple[int, str]:
    """Sleep loops by ratio, then the XLA loops; within each, by letter."""
    group = 2 if "XLA" in name else (0 if "1.00x" in name else 1)
    return group, name


def summarize(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the rounds, and the range of the data-wait fraction."""
    waits = [r["wait"] / r["wall"] for r in rounds]
    return {"wall": float(np.median([r["wall"] for r in rounds])), "ideal": float(np.median([r["ideal"] for r in rounds])),
            "wait_fraction": float(np.median(waits)), "wait_min": min(waits), "wait_max": max(waits)}


def print_table(results: dict[str, dict[str, float]], steps: int, rounds: int) -> None:
    print(f"\n{'loop':58} {'wall s':>7} {'ideal s':>8} {'wall/ideal':>10} {'data wait':>10} {'(range)':>13}")
    for name, r in results.items():
        print(f"{name:58} {r['wall']:7.2f} {r['ideal']:8.2f} {r['wall'] / r['ideal']:10.2f} "
              f"{100 * r['wait_fraction']:9.1f}% ({100 * r['wait_min']:4.1f}-{100 * r['wait_max']:4.1f}%)")
    print(f"({steps} steps; medians over {rounds} interleaved rounds; ideal = max(the step alone with one "
          "batch reused, steps x load); without prefetch the step alone + steps x load in the loop)")


@pytest.mark.bench
def test_bench_s3_device_runs():
    pytest.importorskip("jax")
    pytest.importorskip("skimage")
    results = run(["--steps", "20", "--rounds", "1", "--records", "400", "--skip-torch"])
    assert all(r["wall"] > 0 for r in results.values())


if __name__ == "__main__":
    run(sys.argv[1:])
