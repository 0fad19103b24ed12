"""Picture of our Loader against its peers, each scenario measured in one interleaved run.

Runs four scenarios for agnostic_prefetch's Loader and every peer that imports here, in
the same process and the same minutes, alternating the contenders round by round (the
machine is noisy: a reading means something only next to a peer's reading of the same
round), writes the raw figures as JSON and draws one bar chart, one panel per scenario:

    S1 hand-off   224x224x3 uint8 items, batch 64, 2 workers; the consumer copies each batch
                  once (bench_core.py). Batches/s: ours, torch DataLoader, Grain.
    S2 decode     JPEG Caffe Datums, random crop 224 + mirror + mean to float32, batch 64
                  (bench_s2_decode.py). Images/s: ours, torch DataLoader, Grain, and DALI's
                  CPU pipeline (readers.caffe + decoders.image + crop_mirror_normalize).
    S5 per batch  batch_size=1 of one int64, 2 workers (bench_core.py). Batches/s.
    S3 data wait  a training loop whose step holds the host for 1.25x our loader's own time
                  per batch (bench_s3_device.py's sleep step): the share of wall time spent
                  waiting for the next batch. Ours: prefetch_to_device over the Loader;
                  peers: flax.jax_utils.prefetch_to_device over torch's and Grain's loaders.
    S6 train      ImageNet-sized JPEGs → random-resized crop 224 + flip, float32 CHW
                  normalised, batch 64 (bench_s6_crops.py). Images/s: ours (fused decode),
                  ours with a full-decode user transform, torchvision's Pillow operations in
                  a torch DataLoader, and DALI's CPU pipeline (decoders.image_random_crop).
    S6 eval       the same, shorter side to 256 and the centre 224×224.

A bar is the median over rounds, its whiskers the minimum and maximum. A peer that does
not import (or fails to start) is skipped: the reason is printed, kept in the JSON and
written on the figure.

    python benchmarks/plot_peers.py                  # full run (~10 min, and ~7 more for S6), docs/img/peers.{png,json}
    python benchmarks/plot_peers.py --quick --out /tmp/p.png --json /tmp/p.json   # ~1 min
    python benchmarks/plot_peers.py --from-json docs/img/peers.json              # re-plot only
    pytest -m bench benchmarks/test_plot_peers.py    # the quick run as a test

Run it from outside the checkout (``cd /tmp``) so the package comes from the installed
tree. DALI is not in the bench extra (its wheel is 425 MB): ``pip install nvidia-dali-cuda120``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # the sibling benchmark modules, whatever the working directory

import bench_core  # noqa: E402
import bench_s2_decode  # noqa: E402
import bench_s6_crops  # noqa: E402
import bench_s6_data  # noqa: E402

Log = Callable[[str], None]

DEFAULT_PNG = os.path.join(REPO, "docs", "img", "peers.png")
DEFAULT_JSON = os.path.join(REPO, "docs", "img", "peers.json")
SCENARIOS = ("S1", "S2", "S5", "S3", "S6T", "S6E")
PEERS = ("torch", "grain", "dali")
WORKERS = 2
S3_STEP_RATIO = 1.25  # the step as a multiple of our loader's own time per batch

# What each peer needs to import; the first module that fails is the reason it is skipped.
IMPORTS = {
    "torch": ("torch.utils.data",),
    "grain": ("grain.python", "absl.flags"),
    "dali": ("nvidia.dali",),
    "flax": ("jax", "flax.jax_utils"),
    "jax": ("jax",),
    "skimage": ("skimage.data",),
}
COLOURS = {"ours": "#1f77b4", "full": "#aec7e8", "torch": "#ff7f0e", "grain": "#2ca02c", "dali": "#9467bd"}


@dataclass
class Settings:
    """Window lengths and sizes of one run (``--quick`` shrinks them all)."""

    rounds: int
    seconds: float  # S1/S5 window
    warmup: float  # S1/S5 warm-up after start-up
    idle: float  # idle before every window, so the contender measured before goes quiet
    s2_records: int
    s2_epochs: int  # epochs per S2 window
    s3_records: int
    s3_steps: int
    s6_count: int  # JPEGs in S6's image folder
    s6_batches: int  # per S6 window

    @classmethod
    def for_run(cls, quick: bool, rounds: int | None) -> Settings:
        if quick:
            return cls(rounds or 2, 0.3, 0.3, 0.3, 256, 1, 400, 30, 160, 2)
        return cls(rounds or 5, 2.0, 1.0, 1.5, 2000, 2, 2400, 300, 3000, 24)


@dataclass
class Scenario:
    """One panel: what was measured, in which unit, and every contender's readings."""

    title: str
    what: str
    unit: str
    higher_is_better: bool
    labels: dict[str, str]  # contender key -> label, in plotting order
    values: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        contenders: dict[str, Any] = {}
        for key, label in self.labels.items():
            if key in self.values and self.values[key]:
                vs = self.values[key]
                contenders[key] = {"label": label, "values": vs, "median": statistics.median(vs),
                                   "min": min(vs), "max": max(vs)}
            else:
                contenders[key] = {"label": label, "skipped": self.skipped.get(key, "no reading")}
        return {"title": self.title, "what": self.what, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "contenders": contenders,
                "ratios": ratios(self.values, self.higher_is_better), **self.extra}


def ratios(values: dict[str, list[float]], higher_is_better: bool) -> dict[str, Any]:
    """Ours against each peer, round by round (each against the peer's reading of the same
    round), oriented so that > 1 means ours is better: ours/peer for rates, peer/ours for waits."""
    ours = values.get("ours") or []
    out: dict[str, Any] = {}
    for key, peer in values.items():
        if key == "ours" or not peer:
            continue
        pairs = [(a, b) for a, b in zip(ours, peer, strict=False) if a > 0 and b > 0]
        per_round = [a / b if higher_is_better else b / a for a, b in pairs]
        if per_round:
            out[key] = {"median": statistics.median(per_round), "per_round": per_round}
    return out


def import_problem(needs: tuple[str, ...]) -> str | None:
    """Why one of ``needs`` (IMPORTS keys) does not import here, or None."""
    for need in needs:
        for module in IMPORTS[need]:
            try:
                importlib.import_module(module)
            except Exception as exc:  # a broken install raises more than ImportError
                return f"{module} does not import: {type(exc).__name__}: {exc}"
    return None


# ---- scenarios ------------------------------------------------------------------------------


def _windows(scenario: Scenario, source: Any, batch_size: int, consume: Callable[[Any], None],
             cfg: Settings, skip: set[str], log: Log) -> Scenario:
    """S1 and S5: bench_core's interleaved windows over ``source``."""
    makers = {"ours": lambda: bench_core.make_ours(source, batch_size, WORKERS),
              "torch": lambda: bench_core.make_torch(source, batch_size, WORKERS),
              "grain": lambda: bench_core.make_grain(source, batch_size, WORKERS)}
    contenders = {}
    for key, make in makers.items():
        reason = _skip_reason(key, skip, (key,) if key != "ours" else ())
        if reason:
            scenario.skipped[key] = reason
            log(f"  {key}: skipped: {reason}")
        else:
            contenders[key] = make
    results = bench_core.compare(contenders, consume, cfg.warmup, cfg.seconds, cfg.rounds, log, cfg.idle)
    for key, result in results.items():
        if "error" in result:
            scenario.skipped[key] = f"failed to start: {result['error']}"
        else:
            scenario.values[key] = list(result["windows"])
    return scenario


def s1(cfg: Settings, skip: set[str], log: Log) -> Scenario:
    mb = bench_core.BATCH * bench_core.IMAGE_BYTES / 1e6
    scenario = Scenario(
        "S1 hand-off", f"224×224×3 uint8 items, batch {bench_core.BATCH} ({mb:.2f} MB), {WORKERS} workers; "
        "the consumer copies each batch once", "batches/s", True,
        {"ours": "ours: Loader\n(process, 2 workers)", "torch": "torch\nDataLoader", "grain": "Grain\nDataLoader"})
    log("S1 hand-off")
    return _windows(scenario, bench_core.FreshImages(bench_core.BATCH * 100_000), bench_core.BATCH,
                    bench_core.copy_out(), cfg, skip, log)


def s5(cfg: Settings, skip: set[str], log: Log) -> Scenario:
    scenario = Scenario(
        "S5 per-batch overhead", f"batch_size=1 of one int64, {WORKERS} workers, the consumer does nothing",
        "batches/s", True,
        {"ours": "ours: Loader\n(process, 2 workers)", "torch": "torch\nDataLoader", "grain": "Grain\nDataLoader"})
    log("S5 per-batch overhead")
    return _windows(scenario, bench_core.TinyRecords(1_000_000), 1, lambda batch: None, cfg, skip, log)


def s2(cfg: Settings, skip: set[str], log: Log) -> Scenario:
    from agnostic_prefetch.caffe.lmdb import LMDBSource

    scenario = Scenario(
        "S2 decode", f"JPEG Caffe Datums 256×256 → random crop {bench_s2_decode.CROP} + mirror + mean, "
        f"float32 HWC, batch {bench_s2_decode.BATCH}, {WORKERS} workers (DALI: {WORKERS} threads)",
        "images/s", True,
        {"ours": "ours: Loader\n(process, 2 workers)", "torch": "torch\nDataLoader", "grain": "Grain\nDataLoader",
         "dali": "DALI CPU\npipeline"})
    makers = {"ours": bench_s2_decode.make_ours, "torch": bench_s2_decode.make_torch,
              "grain": bench_s2_decode.make_grain, "dali": bench_s2_decode.make_dali}
    log("S2 decode")
    with tempfile.TemporaryDirectory(prefix="plot_peers_s2_") as tmp, ExitStack() as stack:
        reason = import_problem(("skimage",))
        if reason:  # the photographs the database is built from
            scenario.skipped.update(dict.fromkeys(makers, reason))
            return scenario
        db = os.path.join(tmp, "db")
        bench_s2_decode.build_db(db, cfg.s2_records)
        source = LMDBSource(db)
        transform = bench_s2_decode.s2_transform()
        batches = cfg.s2_epochs * len(source) // bench_s2_decode.BATCH
        runs: dict[str, Callable[[], float]] = {}
        for key, make in makers.items():
            reason = _skip_reason(key, skip, (key,) if key != "ours" else ())
            if reason:
                scenario.skipped[key] = reason
                log(f"  {key}: skipped: {reason}")
                continue
            try:
                t0 = time.perf_counter()
                window = make(source, transform, WORKERS, batches, stack)
                log(f"  {key}: started and warmed up (one epoch) in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:
                scenario.skipped[key] = f"failed to start: {type(exc).__name__}: {exc}"
                log(f"  {key}: {scenario.skipped[key]}")
                continue
            runs[key] = _rate(window)
        readings, failed = bench_s6_crops.interleave(runs, cfg.rounds, cfg.idle, log, lambda v: f"{v:9.0f} images/s")
        scenario.skipped.update(failed)
        scenario.values.update({k: v for k, v in readings.items() if k not in failed})
        scenario.extra["records"] = len(source)
        scenario.extra["images_per_window"] = batches * bench_s2_decode.BATCH
    return scenario


def _rate(window: Callable[[], tuple[float, int]]) -> Callable[[], float]:
    def run() -> float:
        seconds, items = window()
        return items / seconds

    return run


def s3(cfg: Settings, skip: set[str], log: Log) -> Scenario:
    scenario = Scenario(
        "S3 data wait", "", "data wait, % of the loop's wall time", False,
        {"ours": "ours: Loader +\nprefetch_to_device", "torch": "flax prefetch\nover torch DataLoader",
         "grain": "flax prefetch\nover Grain DataLoader"})
    log("S3 data wait")
    reason = import_problem(("jax", "skimage"))
    if reason:
        scenario.skipped.update(dict.fromkeys(scenario.labels, reason))
        return scenario
    import bench_s3_device as s3dev

    from agnostic_prefetch import _demo
    from agnostic_prefetch.caffe import LMDBSource

    with tempfile.TemporaryDirectory(prefix="plot_peers_s3_") as tmp:
        db = os.path.join(tmp, "photos_lmdb")
        _demo.build_database(tmp, db, cfg.s3_records)
        batch = 64
        load = s3dev.load_time_per_batch(db, batch, WORKERS, max(20, cfg.s3_steps // 3))
        step_s = S3_STEP_RATIO * load
        step = s3dev.sleep_step(step_s)
        scenario.what = (f"demo LMDB (64×64 JPEG Datums, decode + augment), batch {batch}, {WORKERS} workers; "
                         f"{cfg.s3_steps} steps of jax.device_put + a {1000 * step_s:.1f} ms sleep "
                         f"({S3_STEP_RATIO:.2f}× our loader's {1000 * load:.1f} ms per batch)")
        scenario.extra.update(step_ms=1000 * step_s, load_ms=1000 * load, steps=cfg.s3_steps)
        log(f"  our loader's time per batch {1000 * load:.2f} ms; step := {1000 * step_s:.2f} ms")

        def run_ours() -> dict[str, float]:
            loader, batches = s3dev.ours(db, batch, WORKERS, thread=True)
            with loader:
                try:
                    return s3dev.loop(batches, cfg.s3_steps, step)
                finally:
                    batches.close()

        def run_torch() -> dict[str, float]:
            loader = s3dev.torch_loader(db, batch, WORKERS)
            epochs = s3dev.endless(loader)
            batches = s3dev.flax_prefetch(epochs)
            try:
                return s3dev.loop(batches, cfg.s3_steps, step)
            finally:
                batches.close()
                epochs.close()
                if loader._iterator is not None:  # persistent workers: end them now, not at gc
                    loader._iterator._shutdown_workers()

        def run_grain() -> dict[str, float]:
            it, close = bench_core.make_grain(LMDBSource(db), batch, WORKERS, transform=_demo.augment, shuffle=True)
            batches = s3dev.flax_prefetch(it)
            try:
                return s3dev.loop(batches, cfg.s3_steps, step)
            finally:
                batches.close()
                close()

        runs: dict[str, Callable[[], dict[str, float]]] = {}
        for key, run in (("ours", run_ours), ("torch", run_torch), ("grain", run_grain)):
            reason = _skip_reason(key, skip, (key, "flax") if key != "ours" else ())
            if reason:
                scenario.skipped[key] = reason
                log(f"  {key}: skipped: {reason}")
            else:
                runs[key] = run
        readings, failed = bench_s6_crops.interleave(
            runs, cfg.rounds, cfg.idle, log,
            lambda r: f"waited {100 * r['wait'] / r['wall']:5.1f} % of {r['wall']:.2f} s")
    scenario.skipped.update(failed)
    for key, rs in readings.items():
        if key in failed or not rs:
            continue
        scenario.values[key] = [100 * r["wait"] / r["wall"] for r in rs]
        scenario.extra.setdefault("wall_s", {})[key] = [r["wall"] for r in rs]
        scenario.extra.setdefault("wait_ms_per_step", {})[key] = [1000 * r["wait"] / cfg.s3_steps for r in rs]
    if "ours" in readings and readings["ours"]:
        walls = scenario.extra["wall_s"]
        scenario.extra["wall_ratios"] = {  # peer's wall time / ours, round by round
            k: statistics.median(b / a for a, b in zip(walls["ours"], w, strict=False))
            for k, w in walls.items() if k != "ours"}
    return scenario


def s6(cfg: Settings, skip: set[str], log: Log, *, root: str, train: bool) -> Scenario:
    """S6 train or eval over an image folder under ``root`` (written once, for both)."""
    what = "random-resized crop 224 + flip" if train else "shorter side to 256, centre 224×224"
    scenario = Scenario(
        f"S6 {'train' if train else 'eval'}", f"ImageNet-sized JPEGs → {what}, float32 CHW normalised, "
        f"batch 64, {WORKERS} workers (DALI: {WORKERS} threads)", "images/s", True,
        {"ours": f"ours: Loader +\n{'RandomResized-' if train else 'CenterCrop-'}\n{'CropDecode' if train else 'Decode'}",
         "full": "ours: Loader +\nfull-decode\nuser transform", "torch": "torchvision ops\nin torch\nDataLoader",
         "dali": "DALI CPU\npipeline"})
    log(scenario.title)
    reason = import_problem(("skimage",))
    if reason:  # the photographs the images are made from
        scenario.skipped.update(dict.fromkeys(scenario.labels, reason))
        return scenario
    manifest = bench_s6_data.write_folder(root, cfg.s6_count)
    scenario.extra["data"] = manifest
    with ExitStack() as stack:
        runs: dict[str, Callable[[], float]] = {}
        for key, make in bench_s6_crops.MAKERS.items():
            reason = _skip_reason(key, skip, (key,) if key in PEERS else ())
            if reason:
                scenario.skipped[key] = reason
                log(f"  {key}: skipped: {reason}")
                continue
            try:
                t0 = time.perf_counter()
                next_batch = make(root, train, WORKERS, stack)
                for _ in range(bench_s6_crops.WARMUP):
                    next_batch()
                log(f"  {key}: started and warmed up in {time.perf_counter() - t0:.1f} s")
            except Exception as exc:
                scenario.skipped[key] = f"failed to start: {type(exc).__name__}: {exc}"
                log(f"  {key}: {scenario.skipped[key]}")
                continue
            runs[key] = bench_s6_crops.window(next_batch, cfg.s6_batches)
        readings, failed = bench_s6_crops.interleave(runs, cfg.rounds, cfg.idle, log, lambda v: f"{v:9.0f} images/s")
    scenario.skipped.update(failed)
    scenario.values.update({k: v for k, v in readings.items() if k not in failed})
    return scenario


def _skip_reason(key: str, skip: set[str], needs: tuple[str, ...]) -> str | None:
    if key in skip:
        return "left out by --skip"
    return import_problem(needs)


# ---- the figure -----------------------------------------------------------------------------


def _fmt(value: float, higher_is_better: bool) -> str:
    if not higher_is_better:
        return f"{value:.1f} %"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def plot(results: dict[str, Any], out: str) -> None:
    """Draw ``results`` (the JSON this script writes) as one figure of one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    scenarios = [(name, results["scenarios"][name]) for name in SCENARIOS if name in results["scenarios"]]
    cols = 2 if len(scenarios) > 1 else 1
    rows = -(-len(scenarios) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 4.6 * rows + 1.6), squeeze=False)
    notes: list[str] = []
    for ax, (name, sc) in zip(axes.flat, scenarios, strict=False):
        better = sc["higher_is_better"]
        keys = list(sc["contenders"])
        ticks = []
        top = max([c.get("max", 0.0) for c in sc["contenders"].values()] + [1e-9])
        for x, key in enumerate(keys):
            c = sc["contenders"][key]
            label = c["label"]
            if "skipped" in c:
                ax.text(x, 0.02 * top, "skipped\n(see note)", ha="center", va="bottom", fontsize=8, color="0.4")
                notes.append(f"{name} {key}: {c['skipped']}")
                ticks.append(label)
                continue
            med = c["median"]
            ax.bar(x, med, color=COLOURS.get(key, "0.5"), width=0.6,
                   yerr=[[med - c["min"]], [c["max"] - med]], capsize=5, ecolor="0.2")
            ax.text(x, c["max"] + 0.02 * top, _fmt(med, better), ha="center", va="bottom", fontsize=9)
            ratio = sc["ratios"].get(key)
            if ratio:
                label += f"\nours: {ratio['median']:.2f}×" if better else f"\nwaits {ratio['median']:.0f}× ours"
            ticks.append(label)
        ax.set_xticks(range(len(keys)), ticks, fontsize=8.5)
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel(f"{sc['unit']}\n({'higher' if better else 'lower'} is better)", fontsize=9)
        ax.set_title(f"{sc['title']}\n" + textwrap.fill(sc["what"], 72), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in list(axes.flat)[len(scenarios):]:
        ax.axis("off")
    loads = meta.get("loadavg", {})
    rounds = meta["settings"]["rounds"]
    fig.suptitle(f"agnostic_prefetch against its peers, each scenario one interleaved run — {meta['date']}, "
                 f"{meta['cpus']} CPUs ({meta['cpu']})", fontsize=11.5)
    caption = [
        f"Bars: median of {rounds} round{'s' if rounds != 1 else ''}, contenders alternating within each; whiskers: "
        "min–max over the rounds. Ratios are medians of per-round ratios (> 1: ours better).",
        "DALI runs in S2 (its own Caffe LMDB reader, JPEG decoder and crop_mirror_normalize, device_id=None) and S6 "
        "(its file reader and CPU decoders); "
        "S3's peers are flax.jax_utils.prefetch_to_device(size=2) over each loader.",
        f"Shared VM (load average {loads.get('before', '?')} before, "
        f"{loads.get('after', '?')} after). Command: {meta['command']}",
    ]
    package = meta.get("package", {})
    if package.get("commit"):
        edited = package.get("edited_files") or []
        caption.append(f"agnostic_prefetch from {package['path']} at {package['commit']}"
                       + (f", with {len(edited)} uncommitted files in agnostic_prefetch/" if edited else ""))
    caption = [textwrap.fill(line, 210) for line in caption + ["Skipped: " + n for n in notes]]
    text = "\n".join(caption)
    fig.text(0.01, 0.005, text, fontsize=7.5, va="bottom", ha="left")
    caption_inches = 0.15 + 0.13 * (text.count("\n") + 1)  # 7.5 pt lines
    fig.tight_layout(rect=(0, caption_inches / fig.get_figheight(), 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    _save_small_png(buffer.getvalue(), out)


def _save_small_png(png: bytes, out: str) -> None:
    """The figure in 128 colours: a quarter of the bytes, and the same picture to the eye."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").quantize(colors=128).save(out, format="PNG", optimize=True)


# ---- the run --------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("agnostic_prefetch", "numpy", "torch", "grain", "nvidia-dali-cuda120", "jax", "flax", "matplotlib"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _package_tree() -> dict[str, Any]:
    """Where agnostic_prefetch was imported from, and that tree's commit and local edits."""
    import agnostic_prefetch

    root = os.path.dirname(os.path.dirname(os.path.abspath(agnostic_prefetch.__file__)))

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
        return proc.stdout if proc.returncode == 0 else ""

    edited = [line[3:] for line in git("status", "--porcelain", "--", "agnostic_prefetch").splitlines()]
    return {"path": root, "commit": git("rev-parse", "--short", "HEAD").strip(), "edited_files": edited}


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def measure(argv: list[str], cfg: Settings, only: list[str], skip: set[str], log: Log) -> dict[str, Any]:
    now = datetime.datetime.now().astimezone()
    shm_before = _shm()
    meta: dict[str, Any] = {
        "date": now.date().isoformat(), "time": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/plot_peers.py" + "".join(f" {shlex.quote(a)}" for a in argv),
        "cpus": len(os.sched_getaffinity(0)), "nproc": os.cpu_count(), "cpu": bench_core.cpu_model(),
        "python": platform.python_version(), "versions": _versions(), "package": _package_tree(),
        "settings": vars(cfg), "loadavg": {"before": _loadavg()},
    }
    scenarios: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plot_peers_s6_") as s6_root:
        makers = {"S1": s1, "S2": s2, "S5": s5, "S3": s3,
                  "S6T": functools.partial(s6, root=s6_root, train=True),
                  "S6E": functools.partial(s6, root=s6_root, train=False)}
        for name in only:
            t0 = time.perf_counter()
            scenarios[name] = makers[name](cfg, skip, log).to_json()
            log(f"{name} took {time.perf_counter() - t0:.0f} s")
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["loadavg"]["after"] = _loadavg()
    time.sleep(0.5)  # let just-closed workers finish exiting
    meta["leftover_children"] = {str(pid): cmd for pid, cmd in bench_core.leftover_workers().items()}
    meta["new_dev_shm_entries"] = sorted(_shm() - shm_before)
    return {"meta": meta, "scenarios": scenarios}


def summary(results: dict[str, Any]) -> str:
    """A plain-text table of medians and ratios."""
    lines = []
    for name in SCENARIOS:
        sc = results["scenarios"].get(name)
        if sc is None:
            continue
        lines.append(f"{sc['title']} ({sc['unit']}; {'higher' if sc['higher_is_better'] else 'lower'} is better)")
        for key, c in sc["contenders"].items():
            label = c["label"].replace("\n", " ")
            if "skipped" in c:
                lines.append(f"  {label:<42} skipped: {c['skipped']}")
                continue
            ratio = sc["ratios"].get(key)
            rtext = f"  ours vs this: {ratio['median']:.2f}x" if ratio else ""
            lines.append(f"  {label:<42} {c['median']:10.1f}  (min {c['min']:.1f}, max {c['max']:.1f}){rtext}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, small databases (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios of S1,S2,S5,S3,S6T,S6E")
    parser.add_argument("--skip", default="", help="comma-separated peers to leave out: torch,grain,dali")
    parser.add_argument("--out", default=DEFAULT_PNG, help="the figure (PNG)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="the raw figures")
    parser.add_argument("--from-json", default=None, metavar="PATH", help="re-plot a saved JSON; measure nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        only = [s.strip().upper() for s in args.only.split(",") if s.strip()]
        skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
        if set(only) - set(SCENARIOS) or skip - set(PEERS):
            parser.error(f"--only takes {','.join(SCENARIOS)}; --skip takes {','.join(PEERS)}")
        results = measure(argv, Settings.for_run(args.quick, args.rounds), only, skip, log)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        meta = results["meta"]
        print(f"left-over child processes (besides multiprocessing's resource_tracker): "
              f"{meta['leftover_children'] or 'none'}; new /dev/shm entries: {meta['new_dev_shm_entries'] or 'none'}")
    plot(results, args.out)
    print(summary(results))
    print(f"figure: {args.out}" + ("" if args.from_json else f"; figures: {args.json}"))
    return results


if __name__ == "__main__":
    main()
