"""HuggingFaceSource: items equal to datasets' own numpy format, read from the Arrow table."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.sources.huggingface import HuggingFaceSource, from_huggingface  # noqa: E402

ROWS = 24


def encoded(seed: int, fmt: str, mode: str = "RGB", size=(9, 7)) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 255, (size[0] // 3 + 1, size[1] // 3 + 1, 3)), np.ones((3, 3, 1)))
    img = Image.fromarray(smooth[: size[0], : size[1]].astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


IMAGE_KINDS = [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L"), ("JPEG", "L"), ("PNG", "RGBA"), ("PNG", "P")]


def every_feature(tmp_path) -> datasets.Dataset:
    features = datasets.Features({
        "i": datasets.Value("int32"), "f": datasets.Value("float32"), "d": datasets.Value("float64"),
        "b": datasets.Value("bool"), "s": datasets.Value("string"), "by": datasets.Value("binary"),
        "label": datasets.ClassLabel(names=["cat", "dog", "owl"]),
        "tokens": datasets.List(datasets.Value("int32")),
        "vec": datasets.List(datasets.Value("float64"), length=3),
        "nested": datasets.List(datasets.List(datasets.Value("int32"))),
        "words": datasets.List(datasets.Value("string")),
        "a2": datasets.Array2D((2, 3), "float32"), "a3": datasets.Array3D((2, 2, 2), "uint8"),
        "image": datasets.Image(),
        "meta": {"x": datasets.Value("int16"), "y": datasets.Value("string"), "z": datasets.List(datasets.Value("float32"))},
    })
    path_image = tmp_path / "on_disk.png"
    path_image.write_bytes(encoded(99, "PNG"))
    images = []
    for k in range(ROWS):
        fmt, mode = IMAGE_KINDS[k % len(IMAGE_KINDS)]
        images.append({"bytes": None, "path": str(path_image)} if k == 5 else {"bytes": encoded(k, fmt, mode), "path": None})
    rows = range(ROWS)
    return datasets.Dataset.from_dict({
        "i": list(rows), "f": [k / 4 for k in rows], "d": [k / 3 for k in rows], "b": [k % 3 == 0 for k in rows],
        "s": [f"row {k}" for k in rows], "by": [bytes([k, 0]) if k % 2 else b"x" * k for k in rows],
        "label": [k % 3 for k in rows], "tokens": [list(range(k % 5)) for k in rows],
        "vec": [[k, -k, 0.5] for k in rows], "nested": [[[k], list(range(k % 3))] if k % 2 else [[k, k]] for k in rows],
        "words": [["a"] * (k % 3) for k in rows],
        "a2": [np.full((2, 3), k, np.float32) for k in rows], "a3": [np.full((2, 2, 2), k, np.uint8) for k in rows],
        "image": images,
        "meta": [{"x": k, "y": str(k), "z": [k / 2] * (k % 2)} for k in rows],
    }, features=features)


@pytest.fixture
def in_memory(tmp_path):
    return every_feature(tmp_path)


@pytest.fixture
def on_disk(tmp_path, in_memory):
    in_memory.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    return datasets.load_from_disk(str(tmp_path / "saved"))


def assert_equal_values(got, want, where=""):
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_equal_values(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, np.ndarray) and want.dtype == object:
        assert got.shape == want.shape, where
        for g, w in zip(got.ravel(), want.ravel(), strict=True):
            assert_equal_values(g, w, where)
    elif isinstance(want, np.ndarray | np.generic):
        assert got.dtype == want.dtype and np.shape(got) == np.shape(want), (where, got.dtype, want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=where)
    else:
        assert got == want, where


def assert_items_match(source, dataset, order):
    reference = dataset.with_format("numpy")
    for i, item in zip(order, source.__getitems__(order), strict=True):
        assert_equal_values(item, reference[int(i)], f"row {i}")
    assert_equal_values(source[int(order[0])], reference[int(order[0])], "getitem")


@pytest.mark.parametrize("which", ["in_memory", "on_disk"])
def test_items_equal_datasets_numpy_format_for_every_feature(which, request):
    dataset = request.getfixturevalue(which)
    source = HuggingFaceSource(dataset)
    assert len(source) == ROWS
    assert_items_match(source, dataset, list(np.random.default_rng(0).permutation(ROWS)) + [3, 3])


def test_a_rows_value_does_not_depend_on_the_nulls_of_its_batch():
    features = datasets.Features({"v": datasets.Value("int32"), "f": datasets.Value("float64"),
                                  "l": datasets.List(datasets.Value("int64")),
                                  "s": {"a": datasets.Value("int16"), "b": datasets.List(datasets.Value("int8"))}})
    data = datasets.Dataset.from_dict({
        "v": [1, None, 3, 4, None, 6], "f": [0.5, 1.5, None, 2.5, 3.5, 4.5],
        "l": [[1, None], [2], [], None, [5, 6], [7, None, 8]],
        "s": [{"a": 1, "b": [1]}, {"a": None, "b": [2]}, {"a": 3, "b": None}, {"a": 4, "b": [None]},
              None, {"a": 6, "b": []}]}, features=features)
    source = HuggingFaceSource(data)
    rng = np.random.default_rng(0)
    for order in [[k] for k in range(6)] + [list(rng.permutation(6)) for _ in range(4)] + [[1, 2], [0, 2], [3, 5]]:
        assert_items_match(source, data, order)


def test_an_image_is_decoded_to_its_own_mode_or_the_features(on_disk):
    source = HuggingFaceSource(on_disk)
    shapes = [source[k]["image"].shape for k in range(6)]
    assert shapes == [(9, 7, 3), (9, 7, 3), (9, 7), (9, 7), (9, 7, 4), (9, 7, 3)]  # row 5: the RGB file on disk
    as_rgb = on_disk.cast_column("image", datasets.Image(mode="RGB"))
    assert_items_match(HuggingFaceSource(as_rgb), as_rgb, list(range(ROWS)))


def test_select_shuffle_and_filter_honour_the_indices_mapping(on_disk):
    for view in (on_disk.select([7, 2, 2, 19]), on_disk.shuffle(seed=4), on_disk.select(range(3, 11)),
                 on_disk.filter(lambda row: row["i"] % 3 == 1), on_disk.remove_columns(["image", "meta"])):
        source = HuggingFaceSource(view)
        assert len(source) == len(view)
        assert_items_match(source, view, list(range(len(view)))[::-1])


def test_a_loaded_dataset_travels_as_its_file_paths(on_disk, in_memory):
    on_disk_bytes = len(cloudpickle.dumps(HuggingFaceSource(on_disk.shuffle(seed=1))))
    in_memory_bytes = len(cloudpickle.dumps(HuggingFaceSource(in_memory)))
    assert on_disk_bytes < 6_000 and in_memory_bytes > in_memory.data.nbytes > on_disk_bytes
    with pytest.raises(ValueError, match=r"holds 0 MiB in memory.*save_to_disk\(path\); datasets.load_from_disk"):
        HuggingFaceSource(in_memory, max_pickled_bytes=1000)


def test_pickled_after_a_read_it_reads_the_same(on_disk):
    source = HuggingFaceSource(on_disk)
    first = source[4]
    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert_equal_values(copy[4], first)
    source.release()
    assert_equal_values(source[4], first)


WORKER = """
import gc, sys, cloudpickle
source = cloudpickle.loads(sys.stdin.buffer.read())
def mapped():
    maps = open("/proc/self/maps").read()
    return sum(f in maps for f in source.cache_files)
before = mapped()
source[3]
during = mapped()
source.release()
gc.collect()
print(before, during, mapped(), "datasets" in sys.modules)
"""


def test_a_worker_maps_the_files_without_datasets_and_release_unmaps_them(on_disk):
    payload = cloudpickle.dumps(HuggingFaceSource(on_disk.remove_columns(["image"])))
    out = subprocess.run([sys.executable, "-c", WORKER], input=payload, capture_output=True, check=True)
    assert out.stdout.split() == [b"0", b"2", b"0", b"False"]


LOADER_COLUMNS = ["i", "vec", "a2", "label", "s"]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_equal_for_any_worker_count_and_resume_exactly(on_disk, workers):
    source = HuggingFaceSource(on_disk.select_columns(LOADER_COLUMNS))
    kw = dict(shuffle=True, seed=11, epochs=2)

    def flat(batch):
        return [batch["i"].tolist(), batch["vec"].tolist(), batch["a2"].tolist(), batch["label"].tolist(), list(batch["s"])]

    with ap.Loader(source, 5, workers=0, **kw) as loader:
        reference = [flat(b) for b in loader]
    with ap.Loader(source, 5, workers=workers, **kw) as loader:
        it = iter(loader)
        head = [flat(next(it)) for _ in range(6)]
        state = json.loads(json.dumps(loader.state_dict()))
    with ap.Loader(source, 5, workers=workers, **kw) as loader:
        loader.load_state_dict(state)
        rest = [flat(b) for b in loader]
    assert head + rest == reference
    assert sorted(i for b in reference[:5] for i in b[0]) == list(range(ROWS))


def test_images_decode_in_the_workers_equal_to_datasets(on_disk):
    view = on_disk.select([k for k in range(ROWS) if k % len(IMAGE_KINDS) in (0, 1)]).select_columns(["image", "i"])
    with ap.Loader(HuggingFaceSource(view), 2, workers=2) as loader:
        got = [(int(i), image.copy()) for b in loader for i, image in zip(b["i"], b["image"], strict=True)]
    reference = view.with_format("numpy")
    assert [i for i, _ in got] == [int(r["i"]) for r in reference]
    for (_, image), row in zip(got, reference, strict=True):
        np.testing.assert_array_equal(image, row["image"])


def test_lengths_of_list_columns_come_from_offsets_through_the_mapping(on_disk):
    view = on_disk.select([4, 1, 3])
    source = HuggingFaceSource(view, length_columns=("tokens",))
    assert source.lengths()["tokens"].tolist() == [4, 1, 3]
    assert source.lengths("words").tolist() == [1, 1, 0]
    assert HuggingFaceSource(view).lengths() is None
    with pytest.raises(ValueError, match="length column 'i' is not a list column"):
        HuggingFaceSource(view, length_columns=("i",))


def test_from_huggingface_recognises_a_dataset_only(on_disk):
    assert isinstance(from_huggingface(on_disk), HuggingFaceSource)
    assert from_huggingface({"i": [1]}) is None and from_huggingface(np.zeros(3)) is None
    code = "import agnostic_prefetch.sources.huggingface as h, sys; h.from_huggingface([1]); print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.strip() == b"False"


def test_a_moved_cache_file_is_named_with_the_remedy(tmp_path, on_disk):
    import shutil

    source = HuggingFaceSource(on_disk)
    shutil.move(str(tmp_path / "saved"), str(tmp_path / "moved"))
    with pytest.raises(ValueError, match=r"cannot map the dataset's cache file .*data-00000-of-00002.arrow.*load the "
                                         r"dataset again"):
        source[0]


def test_undecodable_features_and_images_are_named(tmp_path):
    album = datasets.Dataset.from_dict({"a": [[{"bytes": encoded(0, "PNG"), "path": None}]]},
                                       features=datasets.Features({"a": datasets.List(datasets.Image())}))
    with pytest.raises(ValueError, match=r"column 'a' is a List feature decoded by datasets .*decode=False"):
        HuggingFaceSource(album)
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"\xff\xd8\xffnot a jpeg", "path": None}]},
                                        features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match=r"cannot decode the image of row 0 \('image'\)"):
        HuggingFaceSource(broken)[0]


def test_a_bad_image_is_named_by_its_row_not_its_place_in_the_batch():
    images = [{"bytes": encoded(k, "PNG"), "path": None} for k in range(10)]
    images[7] = {"bytes": b"not an image", "path": None}
    data = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match=r"cannot decode the image of row 7 \('image'\)"):
        HuggingFaceSource(data).__getitems__([3, 7])


def test_a_bad_image_is_skipped_alone_by_the_loader(caplog):
    images = [{"bytes": encoded(k, "PNG"), "path": None} for k in range(6)]
    images[3] = {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": None}
    data = datasets.Dataset.from_dict({"image": images, "i": list(range(6))},
                                      features=datasets.Features({"image": datasets.Image(), "i": datasets.Value("int64")}))
    with ap.Loader(data, 3, workers=2, on_error="skip", remainder="pad") as loader:
        got = [int(i) for b in loader for i, real in zip(b["i"], b["mask"], strict=True) if real]
        assert loader.stats()["skipped"] == 1
    assert got == [0, 1, 2, 4, 5]
    assert "row 3" in caplog.text


def test_repr_and_locate_say_what_is_read(on_disk):
    source = HuggingFaceSource(on_disk.select([9, 8]))
    assert repr(source).startswith("HuggingFaceSource(2 rows, columns ['i', 'f', ")
    assert "through an indices mapping" in repr(source)
    assert source.locate(1).startswith("row 1 (table row 8) of ") and "data-00000-of-00002.arrow" in source.locate(1)


def test_the_loader_takes_a_dataset_as_it_is_and_reads_it_from_arrow(on_disk, monkeypatch):
    view = on_disk.select_columns(LOADER_COLUMNS)
    with ap.Loader(HuggingFaceSource(view), 4, workers=0, shuffle=True, seed=2) as loader:
        want = [b["i"].tolist() for b in loader]
    numpy_view = view.with_format("numpy")
    rows = {int(numpy_view[k]["i"]): numpy_view[k]["vec"] for k in range(len(view))}

    def not_through_formatting(*args, **kwargs):
        raise AssertionError("read through datasets' Python formatting")

    monkeypatch.setattr(type(view), "__getitem__", not_through_formatting)
    monkeypatch.setattr(type(view), "__getitems__", not_through_formatting, raising=False)
    with ap.Loader(view, 4, workers=0, shuffle=True, seed=2) as loader:
        batches = [{k: np.array(v).copy() for k, v in b.items()} for b in loader]
    assert [b["i"].tolist() for b in batches] == want
    for b in batches:
        np.testing.assert_array_equal(b["vec"], np.stack([rows[int(i)] for i in b["i"]]))


def test_a_dataset_saved_to_object_storage_loads_back_and_reads_equal(s3, in_memory, tmp_path):
    url = s3.url("hf/every_feature")
    in_memory.save_to_disk(url)
    loaded = datasets.load_from_disk(url)  # datasets copies it to a local cache, memory-mapped
    source = HuggingFaceSource(loaded)
    assert_items_match(source, in_memory, range(len(in_memory)))
    with ap.Loader(loaded.select_columns(LOADER_COLUMNS), 4, workers=2) as loader:
        got = [int(i) for b in loader for i in b["i"]]
    assert got == [int(r["i"]) for r in in_memory.with_format("numpy")]
