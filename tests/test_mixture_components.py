"""Mixture components that order themselves: nested mixtures, WindowSource, any BatchOrderSource.

Every leaf here reads ``{"i": 10000 * tag + index}``, so a delivered item names its leaf
(``tag``) and the index it was read at.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.caffe.window import WindowSource


def leaf(n: int, tag: int) -> ap.ArraySource:
    return ap.ArraySource({"i": np.arange(n, dtype=np.int64) + 10000 * tag})


def delivered(source, batch_size: int, epochs: int, **options) -> list[int]:
    with ap.Loader(source, batch_size, epochs=epochs, **{"workers": 0, **options}) as loader:
        return [int(i) for batch in loader for i in batch["i"]]


def by_epoch(codes: list[int], epoch_items: int) -> list[list[int]]:
    return [codes[k : k + epoch_items] for k in range(0, len(codes), epoch_items)]


# --- the cases a reviewer found ----------------------------------------------------------


def test_a_nested_mixture_gives_each_inner_component_its_share_of_every_epoch():
    inner = ap.Mixture({"A": leaf(100, 1), "B": leaf(10, 2)}, {"A": 1, "B": 1})
    outer = ap.Mixture({"inner": inner, "C": leaf(20, 3)}, {"inner": 1, "C": 1})
    assert (len(inner), len(outer)) == (20, 40)
    codes = delivered(outer, 8, epochs=3)
    for epoch in by_epoch(codes, 40):
        assert Counter(c // 10000 for c in epoch) == {1: 10, 2: 10, 3: 20}
        # B's own epoch is ten draws, one inner epoch: every record of B, once
        assert sorted(c % 10000 for c in epoch if c // 10000 == 2) == list(range(10))


def test_the_outer_mixture_counts_a_nested_mixtures_items_as_its_component():
    inner = ap.Mixture({"A": leaf(100, 1), "B": leaf(10, 2)}, {"A": 1, "B": 1})
    outer = ap.Mixture({"inner": inner, "C": leaf(20, 3)}, {"inner": 1, "C": 1})
    with ap.Loader(outer, 8, workers=0, epochs=2) as loader:
        for _ in loader:
            pass
        assert loader.stats()["items_per_source"] == {"inner": 40, "C": 40}


CROP = 6  # the windows' side


@pytest.fixture
def windows(tmp_path) -> tuple[WindowSource, dict[bytes, int]]:
    """Eight foreground windows (labels 1..8) and four background ones on one image,
    mirrored; and which index reads each crop."""
    y, x = np.mgrid[0:24, 0:24]
    image = np.stack([x * 9 % 256, y * 5 % 256, (x * y) % 256], axis=2).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "img0.png")
    boxes = [(k, k, k + 8, k + 5) for k in range(12)]  # distinct, asymmetric crops
    rows = [f"{label} 0.9 " + " ".join(map(str, b)) for label, b in zip(range(1, 9), boxes[:8], strict=True)]
    rows += ["0 0.1 " + " ".join(map(str, b)) for b in boxes[8:]]
    (tmp_path / "windows.txt").write_text("\n".join(["# 0", "img0.png", "3", "24", "24", "12", *rows]) + "\n")
    source = WindowSource(tmp_path / "windows.txt", root_folder=f"{tmp_path}/", crop_size=CROP,
                          fg_fraction=0.5, mirror=True)
    index_of = {source[index]["image"].tobytes(): index for index in range(2 * len(source))}
    assert len(index_of) == 24  # every window and flip reads a different crop
    return source, index_of


def like_windows(n: int) -> ap.ArraySource:
    """Items shaped like a WindowSource's, labelled 100."""
    return ap.ArraySource({"image": np.zeros((n, CROP, CROP, 3), np.float32), "label": np.full(n, 100, np.int32),
                           "overlap": np.zeros(n, np.float32), "box": np.zeros((n, 4), np.int32)})


def test_a_window_source_in_a_mixture_reads_every_window_both_ways_with_its_foreground_share(windows):
    source, index_of = windows
    mix = ap.Mixture({"windows": source, "plain": like_windows(24)}, [1, 1])
    assert len(mix) == 24  # the windows run out first: 12 / 0.5
    with ap.Loader(mix, 8, workers=0, epochs=10) as loader:
        read = [index_of.get(image.tobytes(), -1)
                for batch in loader for image, label in zip(batch["image"], batch["label"], strict=True)
                if label != 100]
    assert len(read) == 120 and -1 not in read  # every item from the windows is one of its crops
    for epoch in by_epoch(read, 12):  # one WindowSource epoch per mixture epoch
        assert sum(i // 2 < 8 for i in epoch) == 6  # foreground: int(12 * 0.5) of its 12 draws
    assert {i // 2 for i in read} == set(range(12))  # every window, foreground and background
    assert {i % 2 for i in read} == {0, 1}  # mirrored and not


# --- components that break the protocol are named ----------------------------------------


class Strays:
    """Orders itself with indices past its length, and says nothing of its index space."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"i": np.int64(index)}

    def batch_order(self, *, seed, epoch, batch_size):
        return [np.arange(8)]


class Wavering(Strays):
    """Orders itself in epochs of different lengths."""

    def batch_order(self, *, seed, epoch, batch_size):
        return [np.arange(4 - epoch % 2)]


def test_an_index_outside_a_components_index_space_is_refused_with_the_remedy():
    mix = ap.Mixture({"strays": Strays(), "plain": leaf(4, 1)}, [1, 1])
    with pytest.raises(ValueError, match=r"'strays'.* index 4 .*range\(4\).*index_space"):
        mix.batch_order(seed=0, epoch=0, batch_size=4)


def test_a_component_whose_epochs_differ_in_length_is_refused():
    mix = ap.Mixture({"wavering": Wavering(), "plain": leaf(40, 1)}, [1, 1])
    with pytest.raises(ValueError, match=r"'wavering'.* epoch 1 .* 3 indices .* epoch 0 .* 4"):
        for epoch in range(3):
            mix.batch_order(seed=0, epoch=epoch, batch_size=4)
