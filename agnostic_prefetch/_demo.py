"""The ``agnostic-prefetch demo`` command: real photographs -> LMDB -> Loader -> JAX training.

It builds a small Caffe LMDB from the photographs scikit-image ships (random crops and
flips of each photograph; the label says which photograph a crop came from), then trains a
small convolutional network in plain JAX through ``Loader`` + ``prefetch_to_device`` and
reports images/s, step time, and how much of the wall time the step waited for data.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

# Colour photographs shipped inside scikit-image (no download); one class each.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel")
SIZE = 64  # records are SIZE x SIZE JPEGs


def add_command(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "demo",
        help="train a small JAX model on an LMDB of real photographs through the loader",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--records", type=int, default=2400,
                   help="crops in the database, spread over the photographs (default 2400)")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="write a Chrome trace of the training loop there (open it in ui.perfetto.dev)")
    p.add_argument("--data-dir", default=None,
                   help="where to build the LMDB (kept, and reused if already built); "
                        "default: a temporary directory removed afterwards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    if args.steps < 1 or args.batch_size < 1 or args.workers < 0 or args.records < len(PHOTOS):
        print(f"demo: need --steps >= 1, --batch-size >= 1, --workers >= 0 and "
              f"--records >= {len(PHOTOS)}")
        return 2
    temporary = args.data_dir is None
    data_dir = tempfile.mkdtemp(prefix="agnostic_prefetch_demo_") if temporary else args.data_dir
    try:
        db = os.path.join(data_dir, "photos_lmdb")
        if not os.path.exists(db):
            started = time.perf_counter()
            build_database(data_dir, db, args.records)
            print(f"built {db} ({args.records} JPEG records of {SIZE}x{SIZE}, {len(PHOTOS)} "
                  f"classes) in {time.perf_counter() - started:.1f} s")
        report = train(db, steps=args.steps, batch_size=args.batch_size, workers=args.workers,
                       trace_path=args.trace)
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    print_report(report)
    return 0


# ---- data ---------------------------------------------------------------------------


def build_database(data_dir: str, db: str, records: int, seed: int = 0) -> None:
    """Write ``records`` random crops of the photographs as JPEG files, then convert them.

    The files and a Caffe list file go to ``data_dir/images``; the LMDB is written by the
    library's own ``convert_imageset`` (encoded Datum records, the JPEG bytes as they are).
    """
    import skimage.data
    from PIL import Image

    from agnostic_prefetch.caffe.convert import convert_imageset

    images_dir = os.path.join(data_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]  # each decoded once
    lines = []
    for number in range(records):
        label = number % len(PHOTOS)
        photo = photos[label]
        crop = _random_crop(photo, rng)
        name = f"{PHOTOS[label]}_{number:05d}.jpg"
        Image.fromarray(crop).save(os.path.join(images_dir, name), quality=90)
        lines.append(f"{name} {label}\n")
    list_file = os.path.join(data_dir, "list.txt")
    with open(list_file, "w") as f:
        f.writelines(lines)
    convert_imageset(images_dir + os.sep, list_file, db, encoded=True, encode_type="jpg",
                     shuffle=True, seed=seed, progress=False)


def _random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square crop of 30-90 % of the short side at a random place, maybe mirrored, SIZE x SIZE."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.9))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[top : top + side, left : left + side, :3]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((SIZE, SIZE), Image.BILINEAR))


def augment(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Per-item transform run in the workers: random mirror, scale to [-1, 1] float32."""
    image = example["image"]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": image.astype(np.float32) * (2 / 255) - 1, "label": np.int32(example["label"])}


# ---- model --------------------------------------------------------------------------


def init_params(key: Any, classes: int) -> dict[str, Any]:
    import jax

    k1, k2, k3 = jax.random.split(key, 3)

    def he(k: Any, shape: tuple[int, ...], fan_in: int) -> Any:
        return jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)

    return {
        "conv1": he(k1, (3, 3, 3, 16), 27), "b1": np.zeros(16, np.float32),
        "conv2": he(k2, (3, 3, 16, 32), 144), "b2": np.zeros(32, np.float32),
        "dense": he(k3, (32, classes), 32), "b3": np.zeros(classes, np.float32),
    }


def make_step(learning_rate: float = 0.05, momentum: float = 0.9) -> Any:
    """A jitted SGD-with-momentum step of a two-conv-layer network: (params, velocity, batch) -> ..."""
    import jax
    import jax.numpy as jnp

    def conv(x: Any, w: Any, b: Any) -> Any:
        y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + b)

    def loss_fn(params: Any, batch: Any) -> Any:
        x = conv(batch["image"], params["conv1"], params["b1"])
        x = conv(x, params["conv2"], params["b2"])
        logits = x.mean(axis=(1, 2)) @ params["dense"] + params["b3"]
        labels = batch["label"]
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    @jax.jit
    def step(params: Any, velocity: Any, batch: Any) -> Any:
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
        params = jax.tree_util.tree_map(lambda p, v: p - learning_rate * v, params, velocity)
        return params, velocity, loss, accuracy

    return step


def train(db: str, *, steps: int, batch_size: int, workers: int,
          trace_path: str | None = None) -> dict[str, Any]:
    """Train for ``steps`` steps and measure where the wall time went (and trace it)."""
    import jax
    from tqdm import tqdm

    from agnostic_prefetch.caffe import LMDBSource
    from agnostic_prefetch.device import prefetch_to_device
    from agnostic_prefetch.diagnosis import _delta, diagnose
    from agnostic_prefetch.loader import Loader
    from agnostic_prefetch.tracing import trace

    source = LMDBSource(db)
    params = init_params(jax.random.PRNGKey(0), len(PHOTOS))
    velocity = jax.tree_util.tree_map(np.zeros_like, params)
    step = make_step()
    # The default ring (workers + 6 slots) leaves room for what this loop holds at its peak.
    with Loader(source, batch_size, workers=workers, shuffle=True, seed=0,
                epochs=None, drop_remainder=True, transform=augment) as loader:
        batches = prefetch_to_device(loader, size=2)
        # The first step compiles: run it outside the measured loop.
        params, velocity, loss, _ = step(params, velocity, next(batches))
        loss.block_until_ready()
        first_loss = float(loss)
        waited = stepped = 0.0
        losses, accuracies = [], []
        tracing = trace(trace_path) if trace_path is not None else contextlib.nullcontext()
        before = (loader.stats(), batches.stats())
        started = time.perf_counter()
        with tracing:
            for _ in tqdm(range(steps), desc="train", unit="step", mininterval=0.5):
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                params, velocity, loss, accuracy = step(params, velocity, batch)
                loss.block_until_ready()  # so step time is the computation, not its dispatch
                t2 = time.perf_counter()
                waited += t1 - t0
                stepped += t2 - t1
                losses.append(float(loss))
                accuracies.append(float(accuracy))
            wall = time.perf_counter() - started
            traced = {"loader": _delta(before[0], loader.stats()), "prefetch": _delta(before[1], batches.stats())}
        diagnosis = str(diagnose(batches))
        batches.close()
        copied_out = loader.stats()["copied_out"]
    tail = max(1, steps // 10)
    return {
        "steps": steps, "batch_size": batch_size, "workers": workers, "wall_s": wall,
        "images_per_s": steps * batch_size / wall, "step_ms": 1000 * stepped / steps,
        "wait_fraction": waited / wall, "first_loss": first_loss,
        "final_loss": float(np.mean(losses[-tail:])), "final_accuracy": float(np.mean(accuracies[-tail:])),
        "backend": jax.default_backend(), "cores": os.cpu_count(), "copied_out": copied_out,
        "diagnosis": diagnosis, "traced_stats": traced, "trace": trace_path,
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"trained {r['steps']} steps of {r['batch_size']} images ({r['workers']} loader workers, "
          f"JAX on {r['backend']}, {r['cores']} cores)")
    print(f"  images/s          {r['images_per_s']:10.0f}")
    print(f"  step time         {r['step_ms']:10.1f} ms")
    print(f"  waited for data   {100 * r['wait_fraction']:10.1f} % of wall time")
    print(f"  loss              {r['first_loss']:.3f} -> {r['final_loss']:.3f} "
          f"(accuracy over the last steps {100 * r['final_accuracy']:.0f} %)")
    if r["copied_out"]:
        print(f"  {r['copied_out']} batches were copied out of the ring (the caller held too many slots)")
    print(r["diagnosis"])
    if r["trace"]:
        print(f"trace of the training loop: {r['trace']} (open it in ui.perfetto.dev or chrome://tracing)")
