"""S6's data set: JPEGs whose sizes follow ImageNet's, as an image folder, from a seed.

ImageNet's training images have a median of about 500×375 (Flickr served them at 500 px on
the long side), about a tenth are above 1,000 px on the long side, and most are 4:3 or 3:4
with some spread. This draws sizes from that shape (long side 500 px in two images of
five, otherwise lognormal around 500 px, a tenth of all above 1,000; aspect 4:3 in two of three images, otherwise 3:2, 1:1 or between 1 and
2; landscape in four of five), cuts a random window of that aspect from one of
scikit-image's photographs, resizes it to the drawn size (bicubic) and writes it as a
baseline JPEG at quality 90 (4:2:0, Pillow's default), into ``root/<class>/<n>.jpg`` with
ten classes. A photograph stretched beyond its own pixels gets mild noise (σ 2 grey
levels), so an enlarged image costs to decode what a camera's would, not less. Every
byte follows from ``seed`` and ``count``.

    python benchmarks/bench_s6_data.py /tmp/s6_images --count 3000   # writes the folder
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from typing import Any

import numpy as np
from PIL import Image

# scikit-image's colour photographs (synthetic or one-channel images left out)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
CLASSES = 10
QUALITY = 90
FLICKR_LONG = 500  # the long side of two in five images, as Flickr served them to ImageNet
SHARE_FLICKR = 0.4
SIGMA_LONG = math.log(2.0) / 0.9674  # the rest lognormal around 500 px, 1/6 of them above 1,000 (a tenth of all)
LONG_RANGE = (160, 2500)
MANIFEST = "s6_manifest.json"  # written last: a folder with it is complete


def photographs() -> list[np.ndarray]:
    """The photographs that load here (some are fetched on demand and may be missing offline)."""
    import skimage.data

    found = []
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # not bundled and not downloadable here
            continue
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        if img.ndim == 3 and img.shape[2] >= 3:
            found.append(np.ascontiguousarray(img[:, :, :3]))
    if not found:
        raise RuntimeError(f"none of scikit-image's photographs {PHOTOS} loads here: install scikit-image>=0.22")
    return found


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image, ImageNet-like."""
    if rng.random() < SHARE_FLICKR:
        long = FLICKR_LONG
    else:
        long = int(np.clip(round(math.exp(rng.normal(math.log(FLICKR_LONG), SIGMA_LONG))), *LONG_RANGE))
    kind = rng.random()
    if kind < 0.65:
        aspect = 4 / 3
    elif kind < 0.75:
        aspect = 3 / 2
    elif kind < 0.80:
        aspect = 1.0
    else:
        aspect = math.exp(rng.uniform(0.0, math.log(2.0)))
    short = max(1, round(long / aspect))
    return (short, long) if rng.random() < 0.8 else (long, short)


def make_image(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``photo`` with the aspect of ``height`` × ``width``, resized to it."""
    ph, pw = photo.shape[:2]
    aspect = width / height
    wh, ww = (ph, ph * aspect) if ph * aspect <= pw else (pw / aspect, pw)  # largest window of that aspect
    shrink = rng.uniform(0.6, 1.0)
    wh, ww = max(8.0, wh * shrink), max(8.0, ww * shrink)
    top, left = rng.uniform(0, ph - wh), rng.uniform(0, pw - ww)
    box = (left, top, left + ww, top + wh)
    img = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC, box=box))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if width > ww or height > wh:  # enlarged: give it a camera's noise back
        img = np.clip(img + rng.normal(0.0, 2.0, img.shape), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def write_folder(root: str, count: int, seed: int = 0) -> dict[str, Any]:
    """Write ``count`` JPEGs under ``root`` (reused as is when its manifest says the same
    count and seed); returns the manifest: the settings and the sizes' statistics."""
    path = os.path.join(root, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("count") == count and manifest.get("seed") == seed:
            return manifest
        raise FileExistsError(f"{root} holds an S6 set of count={manifest.get('count')}, seed={manifest.get('seed')}, "
                              f"not count={count}, seed={seed}: pass another folder, or delete this one")
    photos = photographs()
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    sizes, nbytes = [], 0
    classes = min(CLASSES, count)  # no empty class folder, which ImageFolder refuses
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c:02d}"), exist_ok=True)
    for i in range(count):
        height, width = draw_size(rng)
        img = make_image(photos[int(rng.integers(len(photos)))], height, width, rng)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=QUALITY)
        with open(os.path.join(root, f"class_{i % classes:02d}", f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        sizes.append((height, width))
        nbytes += buf.tell()
    hw = np.array(sizes)
    pixels = hw[:, 0] * hw[:, 1]
    manifest = {
        "count": count, "seed": seed, "quality": QUALITY, "photographs": len(photos),
        "median_height": float(np.median(hw[:, 0])), "median_width": float(np.median(hw[:, 1])),
        "median_long_side": float(np.median(hw.max(1))), "median_short_side": float(np.median(hw.min(1))),
        "share_long_side_over_1000": float(np.mean(hw.max(1) > 1000)),
        "share_landscape": float(np.mean(hw[:, 1] > hw[:, 0])),
        "mean_megapixels": float(pixels.mean() / 1e6), "mean_kb": nbytes / count / 1e3,
        "bits_per_pixel": 8 * nbytes / float(pixels.sum()), "seconds_to_write": time.perf_counter() - start,
    }
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def describe(manifest: dict[str, Any]) -> str:
    m = manifest
    return (f"{m['count']} JPEGs (quality {m['quality']}, from {m['photographs']} photographs): median "
            f"{m['median_width']:.0f}×{m['median_height']:.0f} (w×h), long side median {m['median_long_side']:.0f} px, "
            f"{100 * m['share_long_side_over_1000']:.1f} % above 1,000 px, {100 * m['share_landscape']:.0f} % landscape, "
            f"{m['mean_megapixels']:.3f} MP and {m['mean_kb']:.0f} KB on average ({m['bits_per_pixel']:.2f} bits/pixel)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the folder to write (reused if it holds the same set)")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_folder(args.root, args.count, args.seed)
    print(describe(manifest))
    return manifest


if __name__ == "__main__":
    main()
