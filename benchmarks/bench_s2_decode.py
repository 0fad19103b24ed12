"""Benchmark S2: decoding JPEG Datums + CaffeTransform — one core, our Loader, torch DataLoader, Grain, DALI.

Builds an LMDB of encoded-JPEG Caffe Datums (256×256, random crops and flips of the
scikit-image photographs), then reads it with random crop 224 + mirror + mean
(CaffeTransform), batch 64:

    decode only (Pillow, and simplejpeg if importable); the transform alone
    (a) one core in this process: source[i] + transform, item by item (Pillow path, chosen path)
    (a2) the same work in 2 bare processes at once (no loader): what two cores give right now
    (b) agnostic_prefetch.Loader, 2 worker processes
    (c) torch.utils.data.DataLoader over the same source object (num_workers=2, persistent)
    (d) grain.python.DataLoader (worker_count=2), if it runs here
    (e) NVIDIA DALI's CPU pipeline (``device_id=None``: readers.caffe over the same LMDB,
        decoders.image on the CPU, crop_mirror_normalize; num_threads=2), if it imports

Loaders are built first and warmed up for one epoch (worker start-up excluded), and read
endless streams. Then every reader is timed in interleaved rounds: idle ``--idle`` seconds,
``LEAD`` untimed batches (drains the read-ahead a loader built up while idle), then
``--epochs`` epochs' worth of items. Reported: medians over rounds, and ratios as medians
of per-round ratios (each against the peers of the same round).

    python benchmarks/bench_s2_decode.py [--records 2000] [--workers 2] [--skip torch,grain,dali]
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
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agnostic_prefetch.caffe._datum import Datum, decode_datum, encode_datum
from agnostic_prefetch.caffe._lmdb_write import LMDBWriter
from agnostic_prefetch.caffe._resize import resize_bilinear
from agnostic_prefetch.caffe.lmdb import LMDBSource
from agnostic_prefetch.caffe.transform import CaffeTransform
from agnostic_prefetch.sampler import item_rng
from agnostic_prefetch.sources import images as _decode
from agnostic_prefetch.sources.images import decode_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry")
BATCH = 64
CROP = 224
MEAN = (123.68, 116.78, 103.94)  # RGB, as CaffeTransform's ``mean``
LEAD = 8  # untimed batches at the start of each loader window (drains the read-ahead)


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


def encoded_bytes(source: Any) -> list[bytes]:
    return [bytes(decode_datum(source._value(i)).data) for i in range(len(source))]


def make_single_core(source: Any, transform: Any, epochs: int) -> Callable[[], tuple[float, int]]:
    """(a): source[i] + transform, item by item, in this process."""

    def run() -> int:
        for e in range(epochs):
            for i in range(len(source)):
                transform(source[i], item_rng(0, e, i))
        return epochs * len(source)

    return lambda: timed(run)


def make_decode_only(datas: list[bytes], epochs: int) -> Callable[[], tuple[float, int]]:
    def run() -> int:
        for _ in range(epochs):
            for i, data in enumerate(datas):
                decode_image(data, name=str(i))
        return epochs * len(datas)

    return lambda: timed(run)


def make_transform_only(images: list[np.ndarray], transform: Any, n: int) -> Callable[[], tuple[float, int]]:
    """The transform alone, cycling over decoded images that together exceed the L3 cache."""

    def run() -> int:
        for i in range(n):
            transform({"image": images[i % len(images)], "label": 0}, item_rng(0, 0, i))
        return n

    return lambda: timed(run)


def _bare_worker(conn: Any, source: Any, transform: Any) -> None:
    """(a2) helper: source[i] + transform in a loop in its own process, on request."""
    import os as _os

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        _os.environ.setdefault(var, "1")
    source[0]
    while True:
        request = conn.recv()
        if request is None:
            return
        start_item, n = request
        start = time.perf_counter()
        for i in range(start_item, start_item + n):
            transform(source[i % len(source)], item_rng(0, 1, i))
        conn.send(time.perf_counter() - start)


def make_bare_processes(source: Any, transform: Any, workers: int, epochs: int, stack: ExitStack) -> Callable[[], tuple[float, int]]:
    """(a2) the same work in ``workers`` processes at once, no loader: what the machine gives right now."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    conns, procs = [], []
    for _ in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_bare_worker, args=(child, source, transform), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)

    def close() -> None:
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(5)

    stack.callback(close)
    n = epochs * len(source) // workers

    def run() -> tuple[float, int]:
        start = time.perf_counter()
        for k, conn in enumerate(conns):
            conn.send((k * n, n))
        for conn in conns:
            conn.recv()
        return time.perf_counter() - start, n * workers

    run()  # warm-up
    return run


def _stream(it: Any, batches: int, lead: int) -> Callable[[], tuple[float, int]]:
    """Time ``batches`` batches of an endless iterator after ``lead`` untimed ones.

    The untimed lead drains what the loader read ahead while idle (our free slots, torch's
    prefetch), so no loader starts its window with a head start.
    """

    def run() -> tuple[float, int]:
        for _ in range(lead):
            next(it)
        start = time.perf_counter()
        items = 0
        for _ in range(batches):
            items += len(next(it)["label"])
        return time.perf_counter() - start, items

    return run


def s2_transform() -> CaffeTransform:
    """S2's augmentation: random 224 crop, random mirror, per-channel mean, float32 H×W×C."""
    return CaffeTransform(crop_size=CROP, mirror=True, mean=MEAN)


def make_ours(source: Any, transform: Any, workers: int, batches: int, stack: ExitStack) -> Callable[[], tuple[float, int]]:
    from agnostic_prefetch.loader import Loader

    loader = stack.enter_context(Loader(source, BATCH, workers=workers, shuffle=True, seed=0, epochs=None, transform=transform))
    it = iter(loader)
    for _ in range(-(-len(source) // BATCH)):  # warm-up epoch: workers started, caches warm
        next(it)
    return _stream(it, batches, LEAD)


class _TorchDataset:
    def __init__(self, source: Any, transform: Any) -> None:
        self.source, self.transform, self.epoch = source, transform, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.source[i], item_rng(0, self.epoch, i))


def make_torch(source: Any, transform: Any, workers: int, batches: int, stack: ExitStack) -> Callable[[], tuple[float, int]]:
    import torch.utils.data

    dataset = _TorchDataset(source, transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=False, num_samples=10**9)  # endless
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=True)
    it = iter(loader)
    stack.callback(lambda: loader._iterator._shutdown_workers() if loader._iterator is not None else None)
    for _ in range(-(-len(source) // BATCH)):  # warm-up epoch
        next(it)
    return _stream(it, batches, LEAD)


def make_grain(source: Any, transform: Any, workers: int, batches: int, stack: ExitStack) -> Callable[[], tuple[float, int]]:
    import grain.python as grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags and refuses to run before they are parsed
        flags.FLAGS.mark_as_parsed()

    class Augment(grain.RandomMapTransform):
        def random_map(self, element: Any, rng: np.random.Generator) -> Any:
            return transform(element, rng)

    sampler = grain.IndexSampler(len(source), shard_options=grain.NoSharding(), shuffle=True, num_epochs=None, seed=0)
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[Augment(), grain.Batch(BATCH)], worker_count=workers)
    it = iter(loader)
    stack.callback(lambda: it.__del__() if hasattr(it, "__del__") else None)
    for _ in range(-(-len(source) // BATCH)):  # warm-up epoch
        next(it)
    return _stream(it, batches, LEAD)


def make_dali(source: Any, transform: Any, workers: int, batches: int, stack: ExitStack) -> Callable[[], tuple[float, int]]:
    """(e) NVIDIA DALI's own CPU pipeline over the same LMDB: the same work as ``transform``.

    ``device_id=None`` builds a pipeline that needs no GPU. The Caffe reader shuffles
    through a buffer of ``initial_fill`` records (DALI's way, not a full permutation); the
    crop window's position and the mirror coin are drawn per image, as CaffeTransform does.
    Batches are the pipeline's own dense tensors (``as_tensor``: no copy), so the consumer
    gets what ours gives: one H×W×C float32 array per batch.

    Raises:
        ImportError: ``nvidia-dali-cuda120`` is not installed (``pip install nvidia-dali-cuda120``).
        ValueError: ``transform`` asks for something this pipeline does not repeat (see the message).
    """
    from nvidia.dali import fn, pipeline_def, types

    same_work = (transform.train and transform.layout == "HWC" and transform.dtype == np.float32
                 and transform.channel_order == "rgb" and transform.scale == 1.0
                 and transform.mean is not None and np.ndim(transform.mean) == 1)
    if not same_work:
        raise ValueError("the DALI pipeline repeats only a training, HWC, float32, RGB CaffeTransform "
                         f"with a per-channel mean and scale 1; got {transform!r}")
    mean = [float(m) for m in np.broadcast_to(transform.mean, (3,))]
    crop = transform.crop_size

    @pipeline_def(batch_size=BATCH, num_threads=workers, device_id=None, seed=0, prefetch_queue_depth=2)
    def pipeline() -> Any:
        jpegs, labels = fn.readers.caffe(path=source.path, random_shuffle=True, initial_fill=min(1024, len(source)),
                                         name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.crop_mirror_normalize(
            images, crop=(crop, crop), crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
            mirror=fn.random.coin_flip(probability=0.5) if transform.mirror else 0,
            mean=mean, std=[1.0, 1.0, 1.0], dtype=types.FLOAT, output_layout="HWC")
        return images, labels

    pipe = pipeline()
    pipe.build()
    holder = [pipe]
    stack.callback(holder.clear)  # DALI frees its threads and buffers with the last reference

    def endless() -> Any:
        while True:
            images, labels = holder[0].run()
            yield {"image": np.asarray(images.as_tensor()), "label": np.asarray(labels.as_tensor())}

    it = endless()
    for _ in range(-(-len(source) // BATCH)):  # warm-up epoch
        next(it)
    return _stream(it, batches, LEAD)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed window")
    parser.add_argument("--idle", type=float, default=1.5, help="seconds of idling before each window")
    parser.add_argument("--skip", default="", help="comma-separated: torch,grain,dali")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    fast = _decode._simplejpeg is not None
    chosen = "simplejpeg" if fast else "Pillow (simplejpeg not importable)"
    runs: dict[str, Callable[[], tuple[float, int]]] = {}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        db = os.path.join(tmp, "db")
        start = time.perf_counter()
        build_db(db, args.records)
        print(f"built {args.records} JPEG datums (256×256) in {time.perf_counter() - start:.1f} s; JPEG decoder: {chosen}")
        source = LMDBSource(db)
        transform = s2_transform()
        datas = encoded_bytes(source)
        images = [source[i]["image"] for i in range(min(len(source), 256))]  # 50 MB of 256×256×3
        batches = args.epochs * len(source) // BATCH

        def with_pillow(run: Callable[[], tuple[float, int]]) -> Callable[[], tuple[float, int]]:
            def pillow_run() -> tuple[float, int]:
                saved, _decode._simplejpeg = _decode._simplejpeg, None
                try:
                    return run()
                finally:
                    _decode._simplejpeg = saved

            return pillow_run

        runs["decode only, Pillow"] = with_pillow(make_decode_only(datas, args.epochs))
        if fast:
            runs["decode only, simplejpeg"] = make_decode_only(datas, args.epochs)
        runs["transform only (CaffeTransform)"] = make_transform_only(images, transform, args.epochs * len(source))
        runs["(a) one core, Pillow path"] = with_pillow(make_single_core(source, transform, args.epochs))
        runs[A_CHOSEN] = make_single_core(source, transform, args.epochs)
        try:
            runs[A2] = make_bare_processes(source, transform, args.workers, args.epochs, stack)
        except Exception as exc:
            print(f"{A2}: did not start: {type(exc).__name__}: {exc}")
        makers = [(f"(b) agnostic_prefetch.Loader, {args.workers} workers", make_ours)]
        if "torch" not in skip:
            makers.append((f"(c) torch DataLoader, {args.workers} workers", make_torch))
        if "grain" not in skip:
            makers.append((f"(d) grain DataLoader, {args.workers} workers", make_grain))
        if "dali" not in skip:
            makers.append((f"(e) DALI CPU pipeline, {args.workers} threads", make_dali))
        for name, make in makers:
            try:
                runs[name] = make(source, transform, args.workers, batches, stack)
            except Exception as exc:  # a competitor that does not run here is reported, not fatal
                print(f"{name}: did not start: {type(exc).__name__}: {exc}")
        for r in range(args.rounds):
            for name, run in runs.items():
                time.sleep(args.idle)  # let the loader measured before go idle
                try:
                    seconds, items = run()
                    rates.setdefault(name, []).append(items / seconds)
                except Exception as exc:
                    print(f"{name}: failed in round {r}: {type(exc).__name__}: {exc}")
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(',')[0]} {v[-1]:.0f}" for n, v in rates.items()))
    results = report(rates, args.workers)
    sys.stdout.flush()
    return results


A_CHOSEN = "(a) one core, chosen path"
A2 = "(a2) same work, N bare processes at once"


def report(rates: dict[str, list[float]], workers: int) -> dict[str, Any]:
    """Medians over rounds; ratios are medians of per-round ratios against peers of the same round."""
    base = rates.get(A_CHOSEN)
    torch_name = next((n for n in rates if n.startswith("(c)")), None)
    bare = rates.get(A2)
    print(f"\n{'reader':42} {'items/s':>9} {'vs workers×(a)':>15} {'vs (a2)':>8} {'vs torch':>9}  per round")
    results: dict[str, Any] = {}
    for name, values in rates.items():
        n = len(values)
        vs_a = vs_2 = vs_t = ""
        if base and name[:3] in ("(a2", "(b)", "(c)", "(d)", "(e)"):
            vs_a = f"{np.median([values[i] / (workers * base[i]) for i in range(n)]):.0%}"
        if bare and name[:3] in ("(b)", "(c)", "(d)", "(e)"):
            vs_2 = f"{np.median([values[i] / bare[i] for i in range(n)]):.0%}"
        if torch_name and name[:3] in ("(b)", "(c)", "(d)", "(e)"):
            vs_t = f"{np.median([values[i] / rates[torch_name][i] for i in range(n)]):.2f}x"
        med = float(np.median(values))
        results[name] = med
        print(f"{name:42} {med:9.0f} {vs_a:>15} {vs_2:>8} {vs_t:>9}  {', '.join(f'{v:.0f}' for v in values)}")
    return results


@pytest.mark.bench
def test_bench_s2_decode_runs():
    results = main(["--records", "256", "--rounds", "1", "--epochs", "1", "--idle", "0.2"])
    assert all(isinstance(v, float) and v > 0 for k, v in results.items() if k.startswith(("(a)", "(b)")))


if __name__ == "__main__":
    main()
