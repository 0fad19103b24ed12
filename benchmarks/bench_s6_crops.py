"""Benchmark S6: random-resized-crop and centre-crop inputs from ImageNet-sized JPEGs, in one run.

Writes an image folder of ImageNet-sized JPEGs (bench_s6_data.py), then measures, batch 64,
2 workers (DALI: 2 threads), every batch 64 float32 3×224×224 images normalised with
ImageNet's mean and standard deviation:

    train  ours: Loader + ap.RandomResizedCropDecode(224) (the box alone decoded, at a DCT scale)
           ours, full decode: Loader + a user transform (ap.decode_image, then Pillow)
           torchvision's pipeline (its Pillow operations in a torch DataLoader)
           DALI's CPU pipeline (decoders.image_random_crop → resize → crop_mirror_normalize)
    eval   the same four with the centre crop: resize the shorter side to 256, keep 224×224
           (ours: ap.CenterCropDecode(224, resize=256))
    cost   the work per image on one core, no loader (DALI: a one-thread pipeline), train
           and eval: what decides the ratios when every contender has the same two cores
    S2     bench_s2_decode.py's scenario, ours (the crop box decoded alone, and the whole
           image decoded by the source) against DALI's CPU pipeline

bench_s6_peers.py says what each peer runs. Every contender of a scenario is built and warmed
up first, then measured in interleaved rounds: ``--idle`` seconds of idling, ``LEAD``
untimed batches (the read-ahead built while idle), ``--batches`` timed ones. Reported:
images/s as medians over rounds, and ours against each peer as the median of per-round ratios.

    python benchmarks/bench_s6_crops.py [--count 3000] [--rounds 5] [--skip dali,torch] [--json out.json]
    pytest -m bench benchmarks/bench_s6_crops.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark modules

import bench_s2_decode  # noqa: E402
import bench_s6_data  # noqa: E402
import bench_s6_peers as peers  # noqa: E402

T = TypeVar("T")

WORKERS = 2
LEAD = 4  # untimed batches at the start of each window (drains the read-ahead built while idle)
WARMUP = 6  # batches after start-up, before the first round
# What issue 21 asks of ours (fused) against each peer, per scenario.
TARGETS = {"train": {"dali": 1.5, "torch": 2.0}, "eval": {"dali": 1.3, "torch": 1.5}, "s2": {"dali": 1.0}}
LABELS = {"ours": "ours: Loader + fused decode", "full": "ours: Loader + full decode (user transform)",
          "torch": "torchvision's pipeline (torch DataLoader)", "dali": "DALI CPU pipeline"}
S2_LABELS = {"ours": "ours: LMDBSource(decode=False) + CaffeTransform", "full": "ours: LMDBSource + CaffeTransform",
             "dali": "DALI CPU pipeline (readers.caffe)"}


def ours_loader(root: str, train: bool, workers: int, stack: ExitStack) -> Callable[[], Any]:

    transform = fused_transform(train, dct_scale=True)
    return _our_stream(root, transform, workers, stack)


def fused_transform(train: bool, *, dct_scale: bool, resampler: str = "auto") -> Any:
    """Ours: the fused transform with the peers' output (mean and std in pixel units)."""
    import agnostic_prefetch as ap

    options = {"dtype": "float32", "layout": "CHW", "mean": [255 * m for m in peers.MEAN],
               "std": [255 * s for s in peers.STD], "dct_scale": dct_scale, "resampler": resampler}
    if train:
        return ap.RandomResizedCropDecode(peers.SIZE, scale=peers.SCALE, ratio=peers.RATIO, **options)
    return ap.CenterCropDecode(peers.SIZE, resize=peers.RESIZE, **options)


def full_loader(root: str, train: bool, workers: int, stack: ExitStack) -> Callable[[], Any]:
    transform = peers.FullDecodeTrain() if train else peers.FullDecodeEval()
    return _our_stream(root, transform, workers, stack)


def _our_stream(root: str, transform: Any, workers: int, stack: ExitStack) -> Callable[[], Any]:
    import agnostic_prefetch as ap

    source = ap.ImageFolderSource(root, decode=False)  # the files' bytes as "image"
    loader = stack.enter_context(ap.Loader(source, peers.BATCH, workers=workers, shuffle=True, seed=0, epochs=None,
                                           transform=transform))
    it = iter(loader)
    return lambda: next(it)["image"]


def _with_close(make: Callable[[str, bool, int], tuple[Callable[[], Any], Callable[[], None]]]) -> Any:
    def maker(root: str, train: bool, workers: int, stack: ExitStack) -> Callable[[], Any]:
        next_batch, close = make(root, train, workers)
        stack.callback(close)
        return next_batch

    return maker


MAKERS = {"ours": ours_loader, "full": full_loader, "torch": _with_close(peers.torch_loader),
          "dali": _with_close(peers.dali_loader)}


def eval_fidelity(root: str, count: int, skip: set[str]) -> dict[str, Any]:
    """PSNR against torchvision's evaluation pipeline (the full-decode path, equal to it to
    2e-6: test_bench_s6.py) of ours and of DALI's, over the first ``count`` images: how many
    came out identical, and the median and worst PSNR of the others."""
    import agnostic_prefetch as ap

    source = ap.ImageFolderSource(root, decode=False)
    count = min(count, len(source))
    reference = [peers.FullDecodeEval()(source[i], None)["image"] for i in range(count)]
    contenders = {"ours": lambda: [fused_transform(False, dct_scale=True)(source[i], None)["image"] for i in range(count)],
                  "dali": lambda: list(peers.dali_eval_images([source.samples[i][0] for i in range(count)]))}
    found: dict[str, Any] = {}
    for key, images in contenders.items():
        if key in skip:
            continue
        try:
            values = sorted(peers.psnr(a, b) for a, b in zip(images(), reference, strict=True))
        except Exception as exc:
            found[key] = f"not measured: {type(exc).__name__}: {exc}"
            continue
        differing = [v for v in values if v != float("inf")]  # JSON has no infinity
        found[key] = {"images": count, "identical": count - len(differing),
                      "median_db": statistics.median(differing) if differing else None,
                      "min_db": differing[0] if differing else None}
    return found


def describe_batch(batch: Any) -> dict[str, Any]:
    """What a contender hands over: type, shape, dtype, and the values' mean and spread."""
    values = np.asarray(batch)
    return {"type": f"{type(batch).__module__}.{type(batch).__name__}", "shape": list(values.shape),
            "dtype": str(values.dtype), "mean": float(values.mean()), "std": float(values.std())}


def window(next_batch: Callable[[], Any], batches: int) -> Callable[[], float]:
    """Images/s over ``batches`` batches after ``LEAD`` untimed ones."""

    def run() -> float:
        for _ in range(LEAD):
            next_batch()
        start = time.perf_counter()
        images = sum(len(next_batch()) for _ in range(batches))
        return images / (time.perf_counter() - start)

    return run


def interleave(runs: dict[str, Callable[[], T]], rounds: int, idle: float, log: Callable[[str], None],
               show: Callable[[T], str] | None = None) -> tuple[dict[str, list[T]], dict[str, str]]:
    """Each run once per round, in turn, after ``idle`` seconds; one that raises drops out.
    Logged per reading with ``show``, else per round; the readings of runs that did not fail."""
    rates: dict[str, list[T]] = {name: [] for name in runs}
    failed: dict[str, str] = {}
    for r in range(rounds):
        for name, run in runs.items():
            if name in failed:
                continue
            time.sleep(idle)
            try:
                rates[name].append(run())
            except Exception as exc:
                failed[name] = f"failed in round {r + 1}: {type(exc).__name__}: {exc}"
                log(f"  {name}: {failed[name]}")
                continue
            if show is not None:
                log(f"  round {r + 1}: {name:<6} {show(rates[name][-1])}")
        if show is None:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.3g}" for n, v in rates.items()
                                                          if v and n not in failed))
    return {n: v for n, v in rates.items() if n not in failed}, failed


def summarise(name: str, rates: dict[str, list[float]], skipped: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    """Medians, per-round ratios of ours against every peer, and the issue's targets."""
    ours = rates.get("ours", [])
    ratios = {}
    for key, values in rates.items():
        if key != "ours" and ours:
            per_round = [a / b for a, b in zip(ours, values, strict=False)]
            ratios[key] = {"median": statistics.median(per_round), "per_round": per_round}
    targets = {key: {"at_least": need, "median": ratios[key]["median"], "met": ratios[key]["median"] >= need}
               for key, need in TARGETS[name].items() if key in ratios}
    return {"rates": rates, "medians": {k: statistics.median(v) for k, v in rates.items()}, "ratios": ratios,
            "targets": targets, "skipped": skipped, **extra}


def crops_scenario(name: str, root: str, args: argparse.Namespace, skip: set[str], log: Callable[[str], None]
                   ) -> dict[str, Any]:
    """train or eval: every contender over the image folder."""
    log(f"S6 {name}")
    train = name == "train"
    runs: dict[str, Callable[[], float]] = {}
    skipped: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    with ExitStack() as stack:
        for key, make in MAKERS.items():
            if key in skip:
                skipped[key] = "left out by --skip"
                continue
            try:
                t0 = time.perf_counter()
                next_batch = make(root, train, args.workers, stack)
                outputs[key] = describe_batch(next_batch())
                for _ in range(WARMUP - 1):
                    next_batch()
                log(f"  {key}: started and warmed up in {time.perf_counter() - t0:.1f} s; batch {outputs[key]}")
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                skipped[key] = f"did not start: {type(exc).__name__}: {exc}"
                log(f"  {key}: {skipped[key]}")
                continue
            runs[key] = window(next_batch, args.batches)
        rates, failed = interleave(runs, args.rounds, args.idle, log)
    extra: dict[str, Any] = {"outputs": outputs, "images_per_window": args.batches * peers.BATCH}
    if not train:
        extra["psnr_against_torchvision"] = eval_fidelity(root, 64, skip)
        log(f"  PSNR against torchvision's evaluation pipeline: {extra['psnr_against_torchvision']}")
    return summarise(name, rates, {**skipped, **failed}, extra)


def cost_scenario(root: str, args: argparse.Namespace, skip: set[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Milliseconds of work per image, one contender at a time on one core (DALI: one thread),
    no loader: what decides the ratios when every contender has the same two cores."""
    import agnostic_prefetch as ap

    log("cost per image, one core")
    source = ap.ImageFolderSource(root, decode=False)
    items = [source[i] for i in range(0, len(source), max(1, len(source) // 300))]
    runs: dict[str, Callable[[], float]] = {}
    skipped: dict[str, str] = {}
    with ExitStack() as stack:
        for train in (True, False):
            phase = "train" if train else "eval"
            steps = {"ours": fused_transform(train, dct_scale=True),
                     "full": peers.FullDecodeTrain() if train else peers.FullDecodeEval()}
            for key, step in steps.items():
                runs[f"{phase} {key}"] = (lambda step=step: _per_image(
                    lambda: [step(item, np.random.default_rng(i)) for i, item in enumerate(items)], len(items)))
            folder = peers.TorchvisionFolder(root, train)
            if "torch" not in skip:
                runs[f"{phase} torch"] = (lambda folder=folder: _per_image(
                    lambda: [folder[i] for i in range(0, len(folder), max(1, len(folder) // 300))], len(items)))
            if "dali" not in skip:
                try:
                    next_batch = _with_close(lambda r, t, w: peers.dali_loader(r, t, 1))(root, train, 1, stack)
                    next_batch()
                    runs[f"{phase} dali"] = (lambda next_batch=next_batch: _per_image(
                        lambda: [next_batch() for _ in range(4)], 4 * peers.BATCH))
                except Exception as exc:
                    skipped[f"{phase} dali"] = f"did not start: {type(exc).__name__}: {exc}"
        rates, failed = interleave(runs, args.rounds, 0.0, log)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    work = {f"{phase} {key}": statistics.median(rates[f"{phase} {key}"][i] / rates[f"{phase} ours"][i]
                                                for i in range(len(rates[f"{phase} ours"])))
            for phase in ("train", "eval") for key in ("full", "torch", "dali") if f"{phase} {key}" in rates}
    return {"ms_per_image": rates, "medians": medians, "peer_over_ours": work, "skipped": {**skipped, **failed},
            "images": len(items)}


def _per_image(run: Callable[[], Any], images: int) -> float:
    start = time.perf_counter()
    run()
    return 1000 * (time.perf_counter() - start) / images


def s2_scenario(args: argparse.Namespace, skip: set[str], log: Callable[[str], None]) -> dict[str, Any]:
    """bench_s2_decode.py's JPEG Datums + CaffeTransform: ours, decoding the crop box alone
    (``decode=False``) or the whole image in the source, against DALI's CPU pipeline."""
    from agnostic_prefetch.caffe.lmdb import LMDBSource

    log("S2")
    runs: dict[str, Callable[[], float]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_s6_s2_") as tmp, ExitStack() as stack:
        db = os.path.join(tmp, "db")
        bench_s2_decode.build_db(db, args.s2_records)
        source = LMDBSource(db)
        encoded = LMDBSource(db, decode=False)  # CaffeTransform decodes its crop box alone
        transform = bench_s2_decode.s2_transform()
        batches = max(1, 2 * len(source) // bench_s2_decode.BATCH)
        for key, make, src in (("ours", bench_s2_decode.make_ours, encoded), ("full", bench_s2_decode.make_ours, source),
                               ("dali", bench_s2_decode.make_dali, source)):
            if key in skip:
                skipped[key] = "left out by --skip"
                continue
            try:
                timed = make(src, transform, args.workers, batches, stack)  # warms up for one epoch
            except Exception as exc:
                skipped[key] = f"did not start: {type(exc).__name__}: {exc}"
                log(f"  {key}: {skipped[key]}")
                continue
            runs[key] = (lambda timed=timed: (lambda seconds, items: items / seconds)(*timed()))
        rates, failed = interleave(runs, args.rounds, args.idle, log)
    return summarise("s2", rates, {**skipped, **failed}, {"records": args.s2_records, "images_per_window": batches * bench_s2_decode.BATCH})


def report(results: dict[str, Any]) -> str:
    lines = []
    for name, sc in results["scenarios"].items():
        if name == "cost":
            lines.append("\nWork per image, one core, no loader (ms; DALI: one thread); peer's time / ours")
            for key, values in sc["ms_per_image"].items():
                ratio = sc["peer_over_ours"].get(key)
                lines.append(f"  {key:14} {sc['medians'][key]:6.2f} {f'{ratio:.2f}x' if ratio else '':>8}  "
                             + ", ".join(f"{v:.2f}" for v in values))
            continue
        lines.append(f"\nS6 {name}" if name != "s2" else "\nS2 (JPEG Datums + CaffeTransform)")
        lines.append(f"  {'contender':46} {'images/s':>9} {'ours vs it':>11}  per round")
        labels = S2_LABELS if name == "s2" else LABELS
        for key, values in sc["rates"].items():
            ratio = sc["ratios"].get(key)
            rtext = f"{ratio['median']:.2f}x" if ratio else ""
            lines.append(f"  {labels.get(key, key):46} {sc['medians'][key]:9.0f} {rtext:>11}  "
                         + ", ".join(f"{v:.0f}" for v in values))
        for key, reason in sc["skipped"].items():
            lines.append(f"  {labels.get(key, key):46} skipped: {reason}")
        for key, f in sc.get("psnr_against_torchvision", {}).items():
            text = f if isinstance(f, str) else (f"{f['identical']} of {f['images']} identical" + (
                f"; the others median {f['median_db']:.1f} dB, worst {f['min_db']:.1f} dB" if f["min_db"] else ""))
            lines.append(f"  PSNR against torchvision's eval, {LABELS.get(key, key)}: {text}")
        for key, t in sc["targets"].items():
            lines.append(f"  target ours ≥ {t['at_least']}× {key}: {t['median']:.2f}× — {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="JPEGs in the image folder")
    parser.add_argument("--data", default=None, help="the image folder (written if missing; default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per window")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of idling before each window")
    parser.add_argument("--s2-records", type=int, default=1000, help="JPEG Datums in S2's LMDB")
    parser.add_argument("--only", default="train,eval,s2,cost", help="comma-separated: train,eval,s2,cost")
    parser.add_argument("--skip", default="", help="comma-separated contenders to leave out: full,torch,dali")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    skip = set(filter(None, args.skip.split(",")))

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"command": " ".join(["python benchmarks/bench_s6_crops.py", *(argv or sys.argv[1:])]),
                               "cpus": len(os.sched_getaffinity(0)), "loadavg": {"before": _loadavg()}, "scenarios": {}}
    with ExitStack() as stack:
        root = args.data or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_s6_"))
        t0 = time.perf_counter()
        results["data"] = bench_s6_data.write_folder(root, args.count, args.seed)
        log(f"{bench_s6_data.describe(results['data'])}; ready in {time.perf_counter() - t0:.1f} s")
        for name in only:
            if name == "s2":
                results["scenarios"][name] = s2_scenario(args, skip, log)
            elif name == "cost":
                results["scenarios"][name] = cost_scenario(root, args, skip, log)
            else:
                results["scenarios"][name] = crops_scenario(name, root, args, skip, log)
    results["loadavg"]["after"] = _loadavg()
    print(report(results))
    print(f"load average {results['loadavg']['before']} before, {results['loadavg']['after']} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


@pytest.mark.bench
def test_bench_s6_runs() -> None:
    results = main(["--count", "160", "--rounds", "1", "--batches", "2", "--idle", "0.1", "--s2-records", "128",
                    "--quiet"])
    for name, sc in results["scenarios"].items():
        if name == "cost":
            assert sc["medians"]["train ours"] > 0 and sc["medians"]["eval ours"] > 0, sc["skipped"]
            continue
        assert sc["medians"].get("ours", 0) > 0, (name, sc["skipped"])
        for key, described in sc.get("outputs", {}).items():
            assert described["shape"] == [64, 3, 224, 224] and described["dtype"] == "float32", (name, key)


if __name__ == "__main__":
    main()
