"""Benchmark: the OpenCV-exact fixed-point resize against the float32 two-tap resize it
replaced (kept below as ``float_two_tap``) and against cv2 itself, in one run.

The images are the scikit-image photographs (astronaut 512×512×3, coffee 400×600×3,
camera 512×512 gray), resized to the sizes Caffe's layers use (ImageData 256×256, AlexNet
crops 227×227, a 1.5× upscale). Each size is timed in interleaved rounds (every
implementation once per round, ``--seconds`` each); reported are medians in ms and the
median over rounds of new / float.

    python benchmarks/bench_resize.py [--rounds 5] [--seconds 0.3]
    pytest -m bench benchmarks/bench_resize.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest

from agnostic_prefetch.caffe._resize import resize_bilinear


def float_two_tap(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The float32 version: half-pixel centres, edges clamped, rounded half up."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(pos)
        frac = (pos - lo).astype(np.float32)
        lo = lo.astype(np.int64)
        return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), frac

    src = image.astype(np.float32)
    r0, r1, fy = taps(h, height)
    c0, c1, fx = taps(w, width)
    extra = (1,) * (image.ndim - 2)
    fy = fy.reshape((-1, 1) + extra)
    rows = src[r0] * (1 - fy) + src[r1] * fy
    fx = fx.reshape((1, -1) + extra)
    out = rows[:, c0] * (1 - fx) + rows[:, c1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _time(fn: Callable[[], object], seconds: float) -> float:
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return 1000 * (time.perf_counter() - start) / n


def run(rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    from skimage import data

    implementations: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
        "float": float_two_tap, "new": resize_bilinear}
    try:
        import cv2

        implementations["cv2"] = lambda im, h, w: cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        print("cv2 not importable: compared with the float version only")
    images = {"astronaut": data.astronaut(), "coffee": data.coffee(), "camera": data.camera()}
    results = {}
    for name, image in images.items():
        h, w = image.shape[:2]
        for size in [(256, 256), (227, 227), (h * 3 // 2, w * 3 // 2)]:
            times: dict[str, list[float]] = {k: [] for k in implementations}
            for _ in range(rounds):
                for key, fn in implementations.items():
                    times[key].append(_time(lambda fn=fn, im=image, sz=size: fn(im, *sz), seconds))
            ratio = statistics.median(n / f for n, f in zip(times["new"], times["float"], strict=True))
            row = {k: statistics.median(v) for k, v in times.items()} | {"new_over_float": ratio}
            label = f"{name} {h}x{w}{'x3' if image.ndim == 3 else ''} -> {size[0]}x{size[1]}"
            results[label] = row
            print(f"{label:34s} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in row.items() if k != "new_over_float")
                  + f"  new/float {ratio:.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    args = parser.parse_args()
    run(args.rounds, args.seconds)


@pytest.mark.bench
def test_the_benchmark_runs() -> None:
    pytest.importorskip("skimage")
    results = run(1, 0.01)
    assert all(row["new"] > 0 for row in results.values())


if __name__ == "__main__":
    main()
