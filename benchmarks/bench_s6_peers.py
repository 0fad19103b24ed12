"""S6's contenders other than our fused transforms: what each peer runs, per image.

- our full-decode path: the user transform one writes today (``ap.decode_image``, then
  Pillow crops and resizes), in our ``Loader`` over ``ImageFolderSource(root, decode=False)``;
- torchvision's pipeline: torchvision's wheel does not load beside the CPU torch here, so
  the Pillow operations its transforms perform on PIL images, in the same order and with the
  same rules (``RandomResizedCrop``'s box rule drawn from torch's generator, crop then
  ``resize`` BILINEAR, which Pillow antialiases; ``RandomHorizontalFlip``; ``Resize(256)``
  of the shorter side and ``CenterCrop``; ``ToTensor`` then ``Normalize``), in a torch
  ``DataLoader`` over an ``ImageFolder``-like dataset that opens each file with Pillow and
  converts it to RGB, as ``pil_loader`` does;
- NVIDIA DALI's CPU pipeline (``device_id=None``): ``fn.readers.file`` over the folder,
  ``fn.decoders.image_random_crop`` → ``fn.resize`` → ``fn.crop_mirror_normalize`` for
  training; ``fn.decoders.image`` → ``fn.resize(resize_shorter=)`` → a centre
  ``crop_mirror_normalize`` for evaluation.

Every contender hands over a batch of 64 float32 C×H×W images normalised with ImageNet's
mean and standard deviation (torch as a ``torch.Tensor`` from its collate, DALI as its dense
``as_tensor()``, ours as numpy views of the ring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from agnostic_prefetch.sources.imagefolder import ImageFolderSource
from agnostic_prefetch.sources.images import decode_image

BATCH = 64
SIZE = 224
RESIZE = 256  # evaluation: the shorter side before the centre crop (224 / 0.875)
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, of values in [0, 1]
STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_MEAN = np.array(MEAN, np.float32)
_INV_STD = 1 / np.array(STD, np.float32)


def random_resized_box(height: int, width: int, uniform: Callable[[float, float], float],
                       integers: Callable[[int, int], int]) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) by torchvision's ``RandomResizedCrop.get_params``
    rule: up to 10 draws of an area share and a log-uniform aspect, then its centre fallback."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * uniform(*SCALE)
        aspect = math.exp(uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return integers(0, height - h + 1), integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    """torchvision's ``Resize(shorter)`` on a PIL image: the long side truncated, bilinear."""
    w, h = img.size
    if w <= h:
        size = (shorter, int(shorter * h / w))
    else:
        size = (int(shorter * w / h), shorter)
    return img.resize(size, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's ``CenterCrop`` on a PIL image at least ``size`` on each side."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def crop_resize(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """torchvision's ``resized_crop`` on a PIL image: crop, then an antialiased bilinear resize."""
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


# ---- our full-decode path: the user transform written today --------------------------------


def _normalised_chw(img: Image.Image) -> np.ndarray:
    x = (np.asarray(img, dtype=np.float32) * np.float32(1 / 255) - _MEAN) * _INV_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class FullDecodeTrain:
    """Decode the whole JPEG, then torchvision's random-resized-crop rule with Pillow, a flip
    with probability ½, float32 C×H×W normalised."""

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        arr = decode_image(example["image"], name="image", color=True)
        box = random_resized_box(arr.shape[0], arr.shape[1], rng.uniform, lambda lo, hi: int(rng.integers(lo, hi)))
        img = crop_resize(Image.fromarray(arr), box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": _normalised_chw(img), "label": example["label"]}


class FullDecodeEval:
    """Decode the whole JPEG, resize its shorter side to 256, take the centre 224×224."""

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        arr = decode_image(example["image"], name="image", color=True)
        img = center_crop(resize_shorter(Image.fromarray(arr), RESIZE), SIZE)
        return {"image": _normalised_chw(img), "label": example["label"]}


# ---- torchvision's pipeline, its Pillow operations in a torch DataLoader ---------------------


class TorchvisionFolder:
    """An ``ImageFolder`` with torchvision's ImageNet transforms, for a torch ``DataLoader``."""

    def __init__(self, root: str, train: bool) -> None:
        self.samples = ImageFolderSource(root).samples
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import torch

        path, label = self.samples[index]
        with open(path, "rb") as f:  # torchvision's pil_loader
            img = Image.open(f).convert("RGB")
        if self.train:
            box = random_resized_box(img.height, img.width,
                                     lambda a, b: torch.empty(1).uniform_(a, b).item(),
                                     lambda lo, hi: int(torch.randint(lo, hi, size=(1,)).item()))
            img = crop_resize(img, box)
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = center_crop(resize_shorter(img, RESIZE), SIZE)
        # ToTensor: H×W×C uint8 → C×H×W float in [0, 1]; Normalize: subtract, divide, per channel
        tensor = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = tensor.to(torch.float32).div(255)
        mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
        return tensor.sub_(mean).div_(std), label


def torch_loader(root: str, train: bool, workers: int) -> tuple[Callable[[], Any], Callable[[], None]]:
    """(next batch, close) of an endless, shuffled torch ``DataLoader`` with persistent workers."""
    import torch.utils.data

    dataset = TorchvisionFolder(root, train)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=False, num_samples=10**9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                                         persistent_workers=True)
    it = iter(loader)

    def close() -> None:
        if loader._iterator is not None:  # persistent workers: end them now, not at exit
            loader._iterator._shutdown_workers()

    return (lambda: next(it)[0]), close


# ---- DALI's CPU pipeline ----------------------------------------------------------------------


def dali_loader(root: str, train: bool, threads: int) -> tuple[Callable[[], Any], Callable[[], None]]:
    """(next batch, close) of DALI's CPU pipeline over the folder.

    Raises:
        ImportError: ``nvidia-dali-cuda120`` is not installed (``pip install nvidia-dali-cuda120``).
    """
    from nvidia.dali import fn, pipeline_def, types

    mean = [255 * m for m in MEAN]
    std = [255 * s for s in STD]

    @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    def pipeline() -> Any:
        jpegs, labels = fn.readers.file(file_root=root, random_shuffle=True, initial_fill=1024, name="reader")
        if train:
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                   random_area=list(SCALE), random_aspect_ratio=list(RATIO),
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=SIZE, resize_y=SIZE)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=RESIZE)
            mirror = 0
        images = fn.crop_mirror_normalize(images, crop=(SIZE, SIZE), mirror=mirror, mean=mean, std=std,
                                          dtype=types.FLOAT, output_layout="CHW")
        return images, labels

    holder = [pipeline()]
    holder[0].build()

    def next_batch() -> np.ndarray:
        images, _ = holder[0].run()
        return np.asarray(images.as_tensor())

    return next_batch, holder.clear  # DALI frees its threads and buffers with the last reference


def dali_eval_images(files: list[str]) -> np.ndarray:
    """DALI's evaluation pipeline over ``files`` in order, as one float32 N×3×224×224 array."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None, seed=0)
    def pipeline() -> Any:
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=RESIZE)
        return fn.crop_mirror_normalize(images, crop=(SIZE, SIZE), mean=[255 * m for m in MEAN],
                                        std=[255 * s for s in STD], dtype=types.FLOAT, output_layout="CHW")

    pipe = pipeline()
    pipe.build()
    (images,) = pipe.run()
    return np.array(images.as_tensor())


def psnr(ours: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two normalised C×H×W images, measured in grey levels (inf when equal)."""
    levels = (ours - reference) * (255 * np.array(STD, np.float32)[:, None, None])
    mse = float(np.mean(levels.astype(np.float64) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
