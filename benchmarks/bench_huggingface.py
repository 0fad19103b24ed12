"""HuggingFaceSource against datasets' own numpy formatting, one process, shuffled rows.

10,000 rows, each a ~3 KB JPEG (64×64 RGB), a label and 16 int32 tokens, saved to disk and
loaded back (memory-mapped). Rates are items/s over a shuffled order: ours in batches of 64
(``__getitems__``), datasets per item (``with_format("numpy")[i]``) and per batch of 64
(``with_format("numpy")[indices]``).

Run: python benchmarks/bench_huggingface.py
"""

from __future__ import annotations

import io
import tempfile
import time

import datasets
import numpy as np
from PIL import Image

from agnostic_prefetch.sources.huggingface import HuggingFaceSource

ROWS, BATCH = 10_000, 64


def jpeg(rng: np.random.Generator) -> bytes:
    base = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1)))
    noisy = np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=90)
    return out.getvalue()


def rate(fn, order) -> float:
    started = time.perf_counter()
    fn(order)
    return len(order) / (time.perf_counter() - started)


def main() -> None:
    rng = np.random.default_rng(0)
    images = [jpeg(rng) for _ in range(ROWS)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10),
                                  "tokens": datasets.List(datasets.Value("int32"))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                                     "label": rng.integers(0, 10, ROWS).tolist(),
                                     "tokens": rng.integers(0, 1000, (ROWS, 16)).tolist()}, features=features)
    where = tempfile.mkdtemp()
    ds.save_to_disk(where)
    ds = datasets.load_from_disk(where)
    order = rng.permutation(ROWS).tolist()
    source, numpy_ds = HuggingFaceSource(ds), ds.with_format("numpy")
    print(f"{ROWS} rows, mean JPEG {np.mean([len(b) for b in images]):.0f} bytes; items/s, one process")

    def ours(o):
        for k in range(0, len(o), BATCH):
            source.__getitems__(o[k:k + BATCH])

    def per_item(o):
        for i in o:
            numpy_ds[i]

    def batched(o):
        for k in range(0, len(o), BATCH):
            numpy_ds[o[k:k + BATCH]]

    ours(order[:256]), per_item(order[:256]), batched(order[:256])  # warm: page cache, imports
    for name, fn in (("HuggingFaceSource.__getitems__ (64)", ours), ("with_format('numpy')[i]", per_item),
                     ("with_format('numpy')[indices] (64)", batched)):
        print(f"  {name:40s} {rate(fn, order):9.0f}")
    no_image = ds.remove_columns(["image"])
    source, numpy_ds = HuggingFaceSource(no_image), no_image.with_format("numpy")
    print("without the image column (label, tokens):")
    for name, fn in (("HuggingFaceSource.__getitems__ (64)", ours), ("with_format('numpy')[i]", per_item),
                     ("with_format('numpy')[indices] (64)", batched)):
        print(f"  {name:40s} {rate(fn, order):9.0f}")


if __name__ == "__main__":
    main()
