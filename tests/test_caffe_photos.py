"""Integration on real photographs (scikit-image's data): list -> convert -> LMDB -> transform -> Loader."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agnostic_prefetch.caffe.convert import compute_mean, convert_imageset
from agnostic_prefetch.caffe.image_list import ImageListSource
from agnostic_prefetch.caffe.lmdb import LMDBSource
from agnostic_prefetch.caffe.transform import CaffeTransform
from agnostic_prefetch.caffe.window import WindowSource

skdata = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]  # camera is gray


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    lines = []
    for i, name in enumerate(PHOTOS):
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.jpg", quality=92)
        lines.append(f"{name}.jpg {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


def test_raw_and_png_databases_match_the_image_list_source(photos, tmp_path):
    prefix = str(photos) + "/"
    convert_imageset(prefix, photos / "list.txt", tmp_path / "raw", resize_height=64, resize_width=80, progress=False)
    convert_imageset(prefix, photos / "list.txt", tmp_path / "png", resize_height=64, resize_width=80, encoded=True, encode_type="png", progress=False)
    listed = ImageListSource(photos / "list.txt", root_folder=prefix, new_height=64, new_width=80)
    raw, png = LMDBSource(tmp_path / "raw"), LMDBSource(tmp_path / "png")
    assert len(raw) == len(png) == len(listed) == len(PHOTOS)
    for i in range(len(PHOTOS)):
        np.testing.assert_array_equal(raw[i]["image"], listed[i]["image"])
        np.testing.assert_array_equal(png[i]["image"], listed[i]["image"])
        assert raw[i]["label"] == listed[i]["label"] == i
    gray = raw[PHOTOS.index("camera")]["image"]
    assert (gray[:, :, 0] == gray[:, :, 1]).all()  # a gray photo in a colour database


def test_jpeg_database_through_the_loader_with_caffe_transform(photos, tmp_path):
    from agnostic_prefetch.loader import Loader

    convert_imageset(str(photos) + "/", photos / "list.txt", tmp_path / "db", resize_height=72, resize_width=72, encoded=True, encode_type="jpg", progress=False)
    mean = compute_mean(tmp_path / "db", tmp_path / "mean.binaryproto", progress=False)["mean"]
    source = LMDBSource(tmp_path / "db")
    transform = CaffeTransform(crop_size=64, mirror=True, mean_file=tmp_path / "mean.binaryproto", scale=1 / 64, layout="CHW")
    with Loader(source, batch_size=2, workers=2, shuffle=True, seed=1, transform=transform) as loader:
        batches = [{k: np.array(v) for k, v in b.items()} for b in loader]
    assert [b["image"].shape for b in batches] == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels.tolist()) == list(range(len(PHOTOS)))
    # mean-subtracted, scaled photographs are centred near 0 with a spread of about one unit
    images = np.concatenate([b["image"] for b in batches])
    assert abs(images.mean()) < 0.5 and 0.2 < images.std() < 2.0
    assert mean.shape == (72, 72, 3)


def test_window_on_a_photograph_warps_the_known_box(photos):
    cat = np.asarray(Image.open(photos / "chelsea.jpg").convert("RGB"))
    h, w = cat.shape[:2]
    box = (140, 20, 299, 179)  # 160×160, inside the 451×300 photograph
    (photos / "windows.txt").write_text(f"# 0\nchelsea.jpg\n3\n{h}\n{w}\n2\n1 0.8 {' '.join(map(str, box))}\n0 0.1 0 0 99 99\n")
    source = WindowSource(photos / "windows.txt", root_folder=str(photos) + "/", crop_size=160, mean=(100.0, 100.0, 100.0))
    x1, y1, x2, y2 = box
    np.testing.assert_allclose(source[0]["image"], cat[y1 : y2 + 1, x1 : x2 + 1] - np.float32(100.0))
    assert source[0]["label"] == 1 and source[2]["label"] == 0
