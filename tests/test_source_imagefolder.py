"""ImageFolderSource: torchvision's ImageFolder layout, order, labels and decoding, on disk and through S3."""

from __future__ import annotations

import io
import os
import shutil

import cloudpickle
import numpy as np
import pytest
from PIL import Image

import agnostic_prefetch as ap
from agnostic_prefetch.sources.imagefolder import IMG_EXTENSIONS, ImageFolderSource
from agnostic_prefetch.sources.images import ImageDecodeError

# The tree below, listed as torchvision's find_classes and make_dataset order it: classes
# sorted ("Dog" before "cat"); inside a class sorted(os.walk(...)) orders folders by their
# path as a string, so "cat/sub-x" ('-' is 0x2d) comes before "cat/sub/deeper" ('/' is 0x2f),
# which a depth-first walk would not give; files by sorted name ("A.PNG" before "b.jpg"),
# extensions matched lower-cased, "notes.txt" and "x.gif" left out.
EXPECTED = [
    ("Dog/1.ppm", 0), ("Dog/2.pgm", 0),
    ("cat/A.PNG", 1), ("cat/b.jpg", 1), ("cat/d.jpeg", 1), ("cat/sub/a.png", 1),
    ("cat/sub-x/z.bmp", 1), ("cat/sub/deeper/y.webp", 1), ("cat/sub/deeper/y2.TIFF", 1),
]
OTHER_FILES = ["cat/notes.txt", "cat/x.gif", "top.jpg"]


def image(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tree(root) -> None:
    for k, (rel, _) in enumerate(EXPECTED + [(f, -1) for f in OTHER_FILES]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = rel.rsplit(".", 1)[1].lower()
        pixels = image(k)
        if ext == "txt":
            path.write_text("not an image")
            continue
        if ext == "pgm":
            Image.fromarray(pixels[:, :, 0]).save(path, format="PPM")
        elif ext == "png" and k == 5:
            Image.fromarray(np.dstack([pixels, pixels[:, :, :1]])).save(path, format="PNG")  # RGBA
        else:
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tiff": "TIFF", "ppm": "PPM"}.get(ext, ext.upper())
            Image.fromarray(pixels).save(path, format=fmt)


def pil_loader(path) -> np.ndarray:
    """torchvision's default loader (pil_loader), as numpy."""
    with open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def test_extensions_are_torchvisions():
    assert IMG_EXTENSIONS == (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def test_samples_classes_and_order_follow_torchvisions_rules(tmp_path):
    make_tree(tmp_path)
    source = ImageFolderSource(tmp_path)
    assert source.classes == ["Dog", "cat"] and source.class_to_idx == {"Dog": 0, "cat": 1}
    assert source.samples == [(os.path.join(str(tmp_path), rel), label) for rel, label in EXPECTED]
    assert source.targets == [label for _, label in EXPECTED]
    assert len(source) == len(EXPECTED)


def test_items_are_what_torchvisions_pil_loader_decodes(tmp_path):
    make_tree(tmp_path)
    source = ImageFolderSource(tmp_path)
    for i, (rel, label) in enumerate(EXPECTED):
        item = source[i]
        assert item["label"] == label and isinstance(item["label"], int)
        expected = pil_loader(tmp_path / rel)
        assert item["image"].dtype == np.uint8 and item["image"].shape == expected.shape == (6, 8, 3)
        np.testing.assert_array_equal(item["image"], expected, err_msg=rel)
    got = source.__getitems__([8, 0, 3, 3])
    assert [g["label"] for g in got] == [1, 0, 1, 1]
    np.testing.assert_array_equal(got[0]["image"], source[8]["image"])


def test_extensions_argument_selects_other_files(tmp_path):
    make_tree(tmp_path)
    source = ImageFolderSource(tmp_path, extensions=(".gif",), allow_empty=True)
    assert source.samples == [(os.path.join(str(tmp_path), "cat/x.gif"), 1)]


def test_a_folder_on_s3_lists_and_reads_as_on_disk(tmp_path, s3):
    make_tree(tmp_path)
    for rel, _ in EXPECTED + [(f, -1) for f in OTHER_FILES]:
        s3.upload(str(tmp_path / rel), f"train/{rel}")
    local, remote = ImageFolderSource(tmp_path), ImageFolderSource(s3.url("train"))
    assert remote.classes == local.classes
    assert remote.samples == [(s3.url(f"train/{rel}"), label) for rel, label in EXPECTED]
    together = remote.__getitems__(list(range(len(remote)))[::-1])
    for i in range(len(local)):
        np.testing.assert_array_equal(remote[i]["image"], local[i]["image"])
        np.testing.assert_array_equal(together[len(local) - 1 - i]["image"], local[i]["image"])
    copy = cloudpickle.loads(cloudpickle.dumps(remote))
    assert copy[2]["label"] == 1


def test_an_empty_class_is_refused_as_torchvision_does_unless_allowed(tmp_path):
    make_tree(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Found no valid file for the classes \.ipynb_checkpoints\. "
                       r"Supported extensions are: \.jpg, \.jpeg, .*allow_empty=True"):
        ImageFolderSource(tmp_path)
    source = ImageFolderSource(tmp_path, allow_empty=True)
    assert source.classes == [".ipynb_checkpoints", "Dog", "cat"] and source.targets[0] == 1


def test_no_class_folder_or_no_image_at_all_is_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="Couldn't find any class folder in .*Remedy"):
        ImageFolderSource(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images in the class folders"):
        ImageFolderSource(tmp_path, allow_empty=True)


def test_a_bad_image_names_its_file_and_is_skipped_with_on_error_skip(tmp_path):
    for k in range(6):
        folder = tmp_path / ("a" if k < 3 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(image(k)).save(folder / f"{k}.png")
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG broken")
    source = ImageFolderSource(tmp_path)
    with pytest.raises(ImageDecodeError, match=r"cannot decode .*a/1\.png"):
        source[1]
    assert source.locate(1) == f"{tmp_path / 'a' / '1.png'} (class 'a', label 0)"
    assert "replace or remove" in source.remedy(1, ImageDecodeError("x"))
    with ap.Loader(source, 2, workers=2, on_error="skip") as loader:
        images = [np.array(im) for b in loader for im in b["image"]]
    assert len(images) == 5
    np.testing.assert_array_equal(images[1], image(2))


def test_loader_batches_equal_for_any_worker_count_and_resume_exactly(tmp_path):
    for k in range(14):
        folder = tmp_path / f"class{k % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image(k)).save(folder / f"{k:02d}.png")
    source = ImageFolderSource(tmp_path)
    runs = []
    for workers in (0, 2):
        with ap.Loader(source, 4, workers=workers, shuffle=True, seed=1, epochs=2) as loader:
            runs.append([(np.array(b["image"]), np.array(b["label"])) for b in loader])
    for (ia, la), (ib, lb) in zip(*runs, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=1, epochs=2) as loader:
        it = iter(loader)
        head = [np.array(next(it)["image"]) for _ in range(3)]
        state = loader.state_dict()
    with ap.Loader(source, 4, workers=2, shuffle=True, seed=1, epochs=2) as loader:
        loader.load_state_dict(state)
        rest = [np.array(b["image"]) for b in loader]
    assert len(head + rest) == len(runs[0])
    for a, (b, _) in zip(head + rest, runs[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_pickles_after_a_read_and_a_removed_file_is_named(tmp_path):
    make_tree(tmp_path)
    source = ImageFolderSource(tmp_path)
    source[0]
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    np.testing.assert_array_equal(copy[4]["image"], source[4]["image"])
    source.release()
    assert repr(source).startswith(f"ImageFolderSource({str(tmp_path)!r}, images=9, classes=2")
    shutil.rmtree(tmp_path / "Dog")
    with pytest.raises(FileNotFoundError, match="Dog/1.ppm was listed but is gone"):
        source[0]


def test_file_names_with_glob_characters_on_a_url_are_read_as_named(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    for name, value in (("img[1].png", 10), ("img1.png", 200), ("a*.png", 60)):
        fs.pipe(f"{root}/cat/{name}", encoded_png(value))
    try:
        source = ImageFolderSource(f"memory://{root}")
        one_by_one = [int(source[i]["image"][0, 0, 0]) for i in range(len(source))]
        batched = [int(item["image"][0, 0, 0]) for item in source.__getitems__([2, 0, 1, 0])]
        assert one_by_one == [60, 200, 10]  # sorted names: 'a*', 'img1', 'img['
        assert batched == [10, 60, 200, 60]
    finally:
        fs.rm(root, recursive=True)


def encoded_png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((2, 2, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()
