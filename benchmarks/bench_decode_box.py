"""Which library decodes a JPEG's box fastest, and what the fused crop transforms gain: one core, no loader.

On JPEGs whose sizes follow ImageNet's (most 333-640 px on the long side, a tenth
1,000-1,600 px; quality 90, 4:2:0; made from scikit-image's photographs), with the boxes
torchvision's RandomResizedCrop(224) draws and the centre boxes of Resize(256) +
CenterCrop(224), it times, per image (best of ``--rounds``):

    decode: the whole image (simplejpeg, Pillow, nvimgcodec's CPU backend); the box by
        whole decode + cut (simplejpeg), libjpeg DCT scaling + cut (simplejpeg, Pillow's
        draft), nvimgcodec's region decode (scale 1); ap.decode_box as the transforms call it
    transforms: RandomResizedCropDecode / CenterCropDecode with and without DCT scaling,
        against the full-decode path they replace (decode_image, then Pillow's crop and
        resize as torchvision does on PIL images)
    PSNR of the DCT-scaled outputs against the unscaled ones

    fit (``--fit``): per image, the region decode against simplejpeg's whole decode, for
        the train boxes and for Caffe's 224 crops of 256×256 JPEGs; the least-squares model
        of their ratio that ``_decode_box._region_pays`` uses, and what its choice costs
        against always one, always the other, and the faster of the two per image

    python benchmarks/bench_decode_box.py [--images 200] [--rounds 3] [--fit]
"""

from __future__ import annotations

import argparse
import io
import math
import time
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.sources import _decode_box, _resample
from agnostic_prefetch.sources._crop_sampling import centre_box, random_resized_box
from agnostic_prefetch.sources.crops import _scale_for
from agnostic_prefetch.sources.images import decode_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def imagenet_like(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs at ImageNet-like sizes: crops of the photographs, resized (quality 90, 4:2:0)."""
    import skimage.data

    photos = [np.ascontiguousarray(getattr(skimage.data, n)()[:, :, :3]) for n in PHOTOS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        long = int(rng.integers(1000, 1600)) if i % 10 == 0 else int(rng.integers(333, 641))
        aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3]))
        w, h = (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)
        img = Image.fromarray(photo).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_image(fn: Callable[[int], object], count: int, rounds: int) -> float:
    """Best-of-rounds milliseconds per image."""
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return best / count * 1e3


def cut(whole: np.ndarray, box: tuple[int, int, int, int], scale: int) -> np.ndarray:
    top, left, h, w = box
    return whole[top // scale : -(-(top + h) // scale), left // scale : -(-(left + w) // scale)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def each_image(fn: Callable[[int], object], count: int, rounds: int) -> np.ndarray:
    """Best-of-rounds milliseconds of each image on its own."""
    best = np.full(count, math.inf)
    for _ in range(rounds):
        for i in range(count):
            start = time.perf_counter()
            fn(i)
            best[i] = min(best[i], time.perf_counter() - start)
    return best * 1e3


def fit_region_rule(data: list[bytes], sizes: list[tuple[int, int]], boxes: list[tuple[int, int, int, int]],
                    rounds: int) -> None:
    """The region decode's time over the whole decode's, fitted as _region_pays models it."""
    caffe = []  # Caffe's crop: 224 of the image made 256×256, at a random offset
    rng = np.random.default_rng(2)
    for d in data:
        buf = io.BytesIO()
        Image.open(io.BytesIO(d)).convert("RGB").resize((256, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
        caffe.append(buf.getvalue())
    cases = [(d, (h, w), b) for d, (h, w), b in zip(data, sizes, boxes, strict=True)]
    cases += [(d, (256, 256), (int(rng.integers(33)), int(rng.integers(33)), 224, 224)) for d in caffe]
    n = len(cases)
    spans = [((t, t + bh), (left, left + bw)) for _, _, (t, left, bh, bw) in cases]
    region = each_image(lambda i: _decode_box._decode_region(cases[i][0], *spans[i], False, cases[i][1][1]), n, rounds)
    whole = each_image(lambda i: simplejpeg.decode_jpeg(cases[i][0]), n, rounds)
    feats = []
    for (_, (h, w), _), (rows, cols) in zip(cases, spans, strict=True):
        first, last = _decode_box._region_columns(cols, w)
        feats.append((rows[1] / h, (rows[1] - rows[0]) * (last - first) / (h * w), 1 / (h * w)))
    x = np.asarray(feats)
    design = np.column_stack([x[:, 0] * whole, x[:, 1] * whole, np.full(n, 1.0)])
    (bottom, area, fixed), *_ = np.linalg.lstsq(design, region, rcond=None)
    per_pixel = np.median(whole * x[:, 2])  # ms per pixel of the whole decode
    print(f"\nregion / whole decode = {bottom:.2f} × rows to the bottom + {area:.2f} × area + "
          f"{fixed * 1e3:.0f} µs (about {fixed / per_pixel:,.0f} pixels' worth), over {n} boxes")
    chosen = [_decode_box._region_pays(*spans[i], cases[i][1]) for i in range(n)]
    for label, part in (("train boxes", slice(0, len(data))), ("Caffe 224 of 256", slice(len(data), n))):
        r, wh, c = region[part], whole[part], np.asarray(chosen[part])
        print(f"  {label:18s} ms/image: always region {r.mean():.3f}, always whole {wh.mean():.3f}, "
              f"the rule {np.where(c, r, wh).mean():.3f} (region for {c.mean():.0%}), "
              f"the faster per image {np.minimum(r, wh).mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fit", action="store_true", help="only fit the region-or-whole rule")
    args = parser.parse_args()
    data = imagenet_like(args.images)
    n = len(data)
    sizes = [simplejpeg.decode_jpeg_header(d)[:2] for d in data]
    rng = np.random.default_rng(1)
    train = [random_resized_box(h, w, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for h, w in sizes]
    evals = []
    for h, w in sizes:  # the part of the image CenterCrop keeps
        (nh, nw), (top, left) = centre_box(h, w, 256, (224, 224))
        evals.append((int(top * h / nh), int(left * w / nw), int(224 * h / nh), int(224 * w / nw)))
    print(f"{n} JPEGs, median {np.median([h for h, _ in sizes]):.0f}×{np.median([w for _, w in sizes]):.0f}, "
          f"{sum(max(s) > 1000 for s in sizes)} above 1,000 px; box decoder here: {_decode_box.box_decoder()}")

    nv = _decode_box._import_region_library()
    decoder = _decode_box._region_decoder()
    if args.fit:
        if nv is None:
            raise SystemExit("--fit needs nvidia-nvimgcodec-cu12 (the region decoder)")
        fit_region_rule(data, sizes, train, args.rounds)
        return

    def nv_region(d: bytes, box: tuple[int, int, int, int]) -> np.ndarray:
        top, left, h, w = box
        region = nv.Region(start=(top, left), end=(top + h, left + w))
        return np.asarray(decoder.decode(nv.CodeStream(d).get_sub_code_stream(region=region),
                                         params=_decode_box._local.params[False]).cpu())

    def sj_scaled(d: bytes, box: tuple[int, int, int, int], s: int) -> np.ndarray:
        h, w = simplejpeg.decode_jpeg_header(d)[:2]
        kw = {} if s == 1 else {"min_height": -(-h // s), "min_width": -(-w // s)}
        return cut(simplejpeg.decode_jpeg(d, **kw), box, s)

    def draft(d: bytes, box: tuple[int, int, int, int], s: int) -> np.ndarray:
        img = Image.open(io.BytesIO(d))
        img.draft("RGB", (img.width // s, img.height // s))
        return cut(np.asarray(img), box, s)

    print("\nwhole-image decode, ms/image:")
    print(f"  simplejpeg {per_image(lambda i: simplejpeg.decode_jpeg(data[i]), n, args.rounds):.3f}   "
          f"Pillow {per_image(lambda i: np.asarray(Image.open(io.BytesIO(data[i])).convert('RGB')), n, args.rounds):.3f}"
          + (f"   nvimgcodec {per_image(lambda i: nv_region(data[i], (0, 0, *sizes[i])), n, args.rounds):.3f}"
             if nv is not None else ""))
    def time_boxes(label: str, boxes: list[tuple[int, int, int, int]]) -> None:
        scales = [_scale_for(b[2], b[3], 224, 224) for b in boxes]
        share = np.mean([b[2] * b[3] / (h * w) for b, (h, w) in zip(boxes, sizes, strict=True)])
        counts = {int(k): int(v) for k, v in zip(*np.unique(scales, return_counts=True), strict=True)}
        print(f"\n{label}: mean box {share:.0%} of the image; DCT scales {counts}; ms/image:")
        rows = [("whole decode + cut (simplejpeg)", lambda i: sj_scaled(data[i], boxes[i], 1)),
                ("DCT-scaled decode + cut (simplejpeg)", lambda i: sj_scaled(data[i], boxes[i], scales[i])),
                ("DCT-scaled decode + cut (Pillow draft)", lambda i: draft(data[i], boxes[i], scales[i])),
                ("ap.decode_box at scale 1", lambda i: ap.decode_box(data[i], boxes[i])),
                ("ap.decode_box at the DCT scale", lambda i: ap.decode_box(data[i], boxes[i], scale=scales[i]))]
        if nv is not None:
            rows.insert(3, ("region decode, scale 1 (nvimgcodec)", lambda i: nv_region(data[i], boxes[i])))
        for name, fn in rows:
            print(f"  {name:40s} {per_image(fn, n, args.rounds):.3f}")

    time_boxes("train (RandomResizedCrop(224) boxes)", train)
    time_boxes("eval (CenterCrop 224 of 256)", evals)

    regions = [np.ascontiguousarray(ap.decode_box(data[i], train[i])) for i in range(n)]  # scale 1
    if _resample._import_fast(warn=False) is not None:
        times = {r: per_image(lambda i, r=r: _resample.resize_region(regions[i], (224, 224), None, r), n, args.rounds)
                 for r in ("pillow", "fast")}
        print(f"\nthe resize alone, train boxes at scale 1 to 224×224, ms/image: Pillow {times['pillow']:.3f}, "
              f"fast_image_resize {times['fast']:.3f}")

    print("\ntransforms, ms/image (uint8 HWC 224×224):")
    seeds = [np.random.default_rng(i) for i in range(n)]

    def full_train(i: int) -> np.ndarray:  # torchvision on PIL: decode all, crop, resize
        img = Image.fromarray(decode_image(data[i], name="x"))
        top, left, h, w = train[i]
        return np.asarray(img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR))

    def full_eval(i: int) -> np.ndarray:
        img = Image.fromarray(decode_image(data[i], name="x"))
        (nh, nw), (top, left) = centre_box(img.height, img.width, 256, (224, 224))
        return np.asarray(img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + 224, top + 224)))

    on_t, off_t = ap.RandomResizedCropDecode(224), ap.RandomResizedCropDecode(224, dct_scale=False)
    on_e, off_e = ap.CenterCropDecode(224), ap.CenterCropDecode(224, dct_scale=False)
    pil_t, pil_e = (ap.RandomResizedCropDecode(224, dct_scale=False, resampler="pillow"),
                    ap.CenterCropDecode(224, dct_scale=False, resampler="pillow"))
    pil_on_t, pil_on_e = ap.RandomResizedCropDecode(224, resampler="pillow"), ap.CenterCropDecode(224, resampler="pillow")
    results = {}
    for name, fn in (("train: full decode + crop + resize", full_train),
                     ("train: dct_scale=False, resampler='pillow'", lambda i: pil_t({"image": data[i]}, seeds[i])),
                     ("train: resampler='pillow'", lambda i: pil_on_t({"image": data[i]}, seeds[i])),
                     ("train: dct_scale=False", lambda i: off_t({"image": data[i]}, seeds[i])),
                     ("train: RandomResizedCropDecode(224), the defaults", lambda i: on_t({"image": data[i]}, seeds[i])),
                     ("eval: full decode + resize + crop", full_eval),
                     ("eval: dct_scale=False, resampler='pillow'", lambda i: pil_e({"image": data[i]}, None)),
                     ("eval: resampler='pillow'", lambda i: pil_on_e({"image": data[i]}, None)),
                     ("eval: dct_scale=False", lambda i: off_e({"image": data[i]}, None)),
                     ("eval: CenterCropDecode(224), the defaults", lambda i: on_e({"image": data[i]}, None))):
        results[name] = per_image(fn, n, args.rounds)
        print(f"  {name:50s} {results[name]:.3f}")
    print(f"resampler here: {'fast (cykooz.resizer)' if _resample._import_fast(warn=False) else 'Pillow (no cykooz.resizer)'}")
    comparisons = (("dct_scale=True against False (the same resampler)", (on_t, off_t), (on_e, off_e)),
                   ("the defaults against torchvision's values (dct_scale=False, resampler='pillow')",
                    (on_t, pil_t), (on_e, pil_e)))
    for label, (t_a, t_b), (e_a, e_b) in comparisons:
        psnr_t = [psnr(t_a({"image": d}, np.random.default_rng(i))["image"], t_b({"image": d}, np.random.default_rng(i))["image"])
                  for i, d in enumerate(data)]
        psnr_e = [psnr(e_a({"image": d}, None)["image"], e_b({"image": d}, None)["image"]) for d in data]
        for name, values in (("train", psnr_t), ("eval", psnr_e)):
            finite = [v for v in values if math.isfinite(v)]
            print(f"PSNR of {label}, {name}: {sum(not math.isfinite(v) for v in values)} of {n} identical; "
                  f"over the others median {np.median(finite):.1f} dB, min {min(finite):.1f} dB"
                  if finite else f"PSNR of {label}, {name}: all identical")

if __name__ == "__main__":
    main()
