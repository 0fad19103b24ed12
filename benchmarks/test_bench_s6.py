"""S6's data set and its peers' pipelines do what bench_s6_crops.py says they do (fast checks;
the benchmark itself runs with ``pytest -m bench benchmarks/bench_s6_crops.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnostic_prefetch.sources.imagefolder import ImageFolderSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_s6_crops  # noqa: E402
import bench_s6_data  # noqa: E402
import bench_s6_peers as peers  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_ones(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        bench_s6_data.write_folder(str(tmp_path / name), 12, seed)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a").keys() == _files(tmp_path / "c").keys()
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_a_folder_holding_another_set_is_refused_with_the_remedy(tmp_path: Path) -> None:
    bench_s6_data.write_folder(str(tmp_path), 4, 0)
    assert bench_s6_data.write_folder(str(tmp_path), 4, 0)["count"] == 4  # the same set: reused
    with pytest.raises(FileExistsError, match="count=4, seed=0, not count=5, seed=0: pass another folder"):
        bench_s6_data.write_folder(str(tmp_path), 5, 0)


def test_drawn_sizes_follow_imagenets_shape() -> None:
    rng = np.random.default_rng(0)
    hw = np.array([bench_s6_data.draw_size(rng) for _ in range(20_000)])
    long, short = hw.max(1), hw.min(1)
    assert np.median(long) == 500 and 360 <= np.median(short) <= 390
    assert np.median(hw[:, 1]) == 500 and 360 <= np.median(hw[:, 0]) <= 390  # 500 wide, 375 high
    assert 0.09 <= np.mean(long > 1000) <= 0.11
    assert 0.6 <= np.mean(np.abs(long / short - 4 / 3) < 0.01) <= 0.7
    assert 0.75 <= np.mean(hw[:, 1] > hw[:, 0]) <= 0.85


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(0, 2**32 - 1))
def test_random_resized_box_lies_inside_the_image_and_keeps_torchvisions_ranges(height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    top, left, h, w = peers.random_resized_box(height, width, rng.uniform, lambda lo, hi: int(rng.integers(lo, hi)))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    rounding = 1 / min(h, w)  # each side was rounded to whole pixels
    if (h, w) != (height, width) and (top, left) != ((height - h) // 2, (width - w) // 2):  # a drawn box
        assert peers.SCALE[0] - 3 * rounding <= h * w / (height * width) <= peers.SCALE[1]
        assert peers.RATIO[0] * (1 - 2 * rounding) <= w / h <= peers.RATIO[1] * (1 + 2 * rounding)


@pytest.mark.parametrize(("height", "width", "box"), [
    (10, 1000, (0, 493, 10, 13)),  # wider than 4:3 and no draw fits: the centre 4:3 box, height kept
    (1000, 10, (493, 0, 13, 10)),  # taller than 3:4: the centre 3:4 box, width kept
])
def test_random_resized_box_falls_back_to_torchvisions_centre_box(height: int, width: int, box: tuple) -> None:
    # every draw at its low end: 8 % of the area at aspect 3:4 is 24×33 px, which fits neither image
    assert peers.random_resized_box(height, width, lambda lo, hi: lo, lambda lo, hi: lo) == box


def test_full_decode_eval_equals_torchvisions_pipeline_on_the_same_image(tmp_path: Path) -> None:
    bench_s6_data.write_folder(str(tmp_path), 6, 3)
    folder = ImageFolderSource(str(tmp_path), decode=False)
    tv = peers.TorchvisionFolder(str(tmp_path), train=False)
    for i in range(len(folder)):
        ours = peers.FullDecodeEval()(folder[i], np.random.default_rng(0))
        theirs, label = tv[i]
        assert ours["image"].shape == (3, 224, 224) and ours["image"].dtype == np.float32
        assert label == ours["label"]
        np.testing.assert_allclose(ours["image"], theirs.numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_our_fused_transform_without_dct_scale_with_pillow_does_the_full_decode_paths_work(tmp_path: Path, train: bool) -> None:
    bench_s6_data.write_folder(str(tmp_path), 8, 5)
    folder = ImageFolderSource(str(tmp_path), decode=False)
    fused = bench_s6_crops.fused_transform(train, dct_scale=False, resampler="pillow")
    full = peers.FullDecodeTrain() if train else peers.FullDecodeEval()
    to_pixels = 255 * np.array(peers.STD, np.float32)[:, None, None]  # normalised units → grey levels
    off = 0
    for i in range(len(folder)):
        for seed in range(3):
            ours = fused(folder[i], np.random.default_rng(seed))["image"]
            theirs = full(folder[i], np.random.default_rng(seed))["image"]
            assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == theirs.dtype == np.float32
            levels = np.abs(ours - theirs) * to_pixels
            assert levels.max() < 1.01, (i, seed)  # never more than one grey level apart
            off += int((levels > 0.5).sum())
    # train: the same box (the same draws), crop and resize, value for value; eval: the
    # centre crop's resize is computed over a window, which rounds a few values differently
    assert off == 0 if train else off < 0.005 * 24 * 3 * 224 * 224
