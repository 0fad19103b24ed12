"""LMDBSource: Caffe Datum databases (raw, encoded, float) and our array records, read lazily per process."""

from __future__ import annotations

import io
import os
import pickle

import cloudpickle
import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_datum import caffe_messages

from agnostic_prefetch.caffe.lmdb import LMDBSource, write_array_records
from agnostic_prefetch.caffe.transform import CaffeTransform
from agnostic_prefetch.sources.packed_arrays import RecordError, decode_record, encode_record


def rgb_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def raw_datum(image: np.ndarray, label: int) -> bytes:
    """A raw Datum as Caffe writes it (BGR C×H×W), built by the protobuf runtime."""
    h, w, c = image.shape
    chw = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
    return caffe_messages()["Datum"](channels=c, height=h, width=w, data=chw.tobytes(), label=label, encoded=False).SerializeToString()


def encoded_datum(image: np.ndarray, label: int, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format=fmt, **save)
    return caffe_messages()["Datum"](data=buf.getvalue(), label=label, encoded=True).SerializeToString()


def write_db(path, values: list[bytes], *, subdir: bool = True) -> str:
    env = lmdb.open(str(path), map_size=1 << 26, subdir=subdir)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(b"%08d_img%d.jpg" % (i, i), value)
    env.close()
    return str(path)


@pytest.fixture
def images():
    return [rgb_image(6, 5, seed=i) for i in range(10)]


def test_raw_datum_yields_rgb_hwc_uint8_and_int32_label(tmp_path, images):
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)]))
    item = source[3]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (6, 5, 3)
    np.testing.assert_array_equal(item["image"], images[3])
    assert item["label"] == 3 and item["label"].dtype == np.int32
    assert source.kind == "datum (raw)" and len(source) == 10


def test_bgr_channel_order_gives_caffes_stored_order(tmp_path, images):
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, 0) for im in images]), channel_order="bgr")
    np.testing.assert_array_equal(source[0]["image"], images[0][:, :, ::-1])


def test_png_encoded_and_raw_datums_give_identical_pixels(tmp_path, images):
    raw = LMDBSource(write_db(tmp_path / "raw", [raw_datum(im, i) for i, im in enumerate(images)]))
    png = LMDBSource(write_db(tmp_path / "png", [encoded_datum(im, i) for i, im in enumerate(images)]))
    assert png.kind == "datum (encoded)"
    for i in range(len(images)):
        np.testing.assert_array_equal(raw[i]["image"], png[i]["image"])
        assert raw[i]["label"] == png[i]["label"]


def test_jpeg_encoded_datum_within_jpeg_tolerance_of_raw(tmp_path):
    import skimage.data

    photo = np.ascontiguousarray(skimage.data.astronaut()[:128, 100:228])
    raw = LMDBSource(write_db(tmp_path / "raw", [raw_datum(photo, 1)]))
    jpg = LMDBSource(write_db(tmp_path / "jpg", [encoded_datum(photo, 1, "JPEG", quality=95)]))
    diff = raw[0]["image"].astype(np.float64) - jpg[0]["image"]
    psnr = 10 * np.log10(255.0**2 / np.mean(diff**2))
    # measured on scikit-image photographs at quality 95: mean |diff| 1.6-2.4, PSNR 37-40 dB
    assert np.mean(np.abs(diff)) < 3.0 and psnr > 33.0


def test_gray_encoded_datum_decodes_to_one_channel(tmp_path):
    gray = rgb_image(4, 4)[:, :, :1]
    source = LMDBSource(write_db(tmp_path / "db", [encoded_datum(gray, 0)]))
    np.testing.assert_array_equal(source[0]["image"], gray)


def test_float_datum_yields_float32(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.float32)  # C×H×W, BGR
    msg = caffe_messages()["Datum"](channels=2, height=3, width=4, float_data=values.tolist(), label=9)
    source = LMDBSource(write_db(tmp_path / "db", [msg.SerializeToString()]))
    item = source[0]
    assert item["image"].dtype == np.float32 and item["image"].shape == (3, 4, 2)
    np.testing.assert_array_equal(item["image"], values.reshape(2, 3, 4).transpose(1, 2, 0)[:, :, ::-1])


def test_missing_path_is_file_not_found_and_nothing_is_created(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        LMDBSource(missing)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="data.mdb"):
        LMDBSource(empty)
    assert list(empty.iterdir()) == []


def test_reading_creates_no_lock_file(tmp_path, images):
    path = write_db(tmp_path / "db", [raw_datum(im, 0) for im in images])
    os.remove(os.path.join(path, "lock.mdb"))
    LMDBSource(path)[0]
    assert sorted(os.listdir(path)) == ["data.mdb"]


def test_single_file_database_is_detected(tmp_path, images):
    path = write_db(tmp_path / "db.mdb", [raw_datum(im, i) for i, im in enumerate(images)], subdir=False)
    assert LMDBSource(path)[2]["label"] == 2


def test_images_of_different_sizes_fail_at_construction_with_the_remedy(tmp_path):
    values = [raw_datum(rgb_image(6, 5), 0), raw_datum(rgb_image(7, 5), 1)]
    path = write_db(tmp_path / "db", values)
    with pytest.raises(ValueError, match=r"different sizes.*record 1.*crop_size"):
        LMDBSource(path)
    source = LMDBSource(path, allow_varying_sizes=True)
    assert source[1]["image"].shape == (7, 5, 3)


def test_odd_size_missed_by_the_sample_fails_when_read(tmp_path):
    values = [raw_datum(rgb_image(4, 4), 0) for _ in range(200)]
    values[5] = raw_datum(rgb_image(5, 4), 0)  # not among the 64 sampled records
    source = LMDBSource(write_db(tmp_path / "db", values))
    source[4]
    with pytest.raises(ValueError, match=r"different sizes.*record 5 "):
        source[5]


def test_sequential_and_random_reads_agree(tmp_path, images):
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)]))
    sequential = [source[i]["label"] for i in range(10)]
    shuffled = {int(i): source[int(i)]["label"] for i in np.random.default_rng(0).permutation(10)}
    assert sequential == list(range(10)) and shuffled == {i: i for i in range(10)}


def test_pickles_small_without_an_open_environment_and_reads_after(tmp_path, images):
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)]))
    source[0]
    blob = cloudpickle.dumps(source)
    assert len(blob) < 4000  # keys and a few attributes, no handles, no pixels
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy[7]["image"], source[7]["image"])


def test_corrupt_datum_names_the_record(tmp_path):
    values = [raw_datum(rgb_image(2, 2), 0)] * 200
    values[5] = b"\x22\x50short"  # not among the records checked at construction
    source = LMDBSource(write_db(tmp_path / "db", values))
    with pytest.raises(ValueError, match=r"record 5 \(key b'00000005_img5.jpg'\) .* not a valid Caffe Datum"):
        source[5]
    values[0] = values[5]
    with pytest.raises(ValueError, match=r"record 0 .* not a valid Caffe Datum"):
        LMDBSource(write_db(tmp_path / "db2", values))


def test_raw_datum_with_wrong_data_length_names_the_record(tmp_path):
    bad = caffe_messages()["Datum"](channels=3, height=2, width=2, data=b"123", label=0).SerializeToString()
    with pytest.raises(ValueError, match=r"record 0 .*3 data bytes"):
        LMDBSource(write_db(tmp_path / "db", [bad]))


def test_array_records_round_trip(tmp_path):
    records = [{"x": np.full((2, 3), i, np.float32), "y": np.int64(i), "mask": np.array([True, False])} for i in range(1500)]
    assert write_array_records(tmp_path / "db", records) == 1500
    source = LMDBSource(tmp_path / "db")
    assert source.kind == "array" and len(source) == 1500
    got = source[1234]
    assert set(got) == {"x", "y", "mask"}
    np.testing.assert_array_equal(got["x"], records[1234]["x"])
    assert got["y"].shape == () and got["y"] == 1234 and got["mask"].dtype == np.bool_


def test_array_records_refuse_objects_and_strings():
    with pytest.raises(RecordError, match="numeric"):
        encode_record({"s": np.array(["a"])})
    with pytest.raises(RecordError, match="numeric"):
        encode_record({"o": np.array([{}], dtype=object)})


def test_array_record_header_cannot_smuggle_an_object_dtype():
    raw = encode_record({"x": np.zeros(2, np.int64)}).replace(b'"<i8"', b'"|O8"')
    with pytest.raises(RecordError, match="numeric|O"):
        decode_record(raw)


def test_write_array_records_refuses_an_existing_database(tmp_path):
    write_array_records(tmp_path / "db", [{"x": np.zeros(1)}])
    with pytest.raises(FileExistsError, match="db"):
        write_array_records(tmp_path / "db", [{"x": np.zeros(1)}])


def test_repr_says_what_it_reads(tmp_path, images):
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, 0) for im in images]))
    assert "records=10" in repr(source) and "datum (raw)" in repr(source) and "6×5×3" in repr(source)


def test_loader_reads_shuffled_batches_with_two_workers(tmp_path):
    from agnostic_prefetch.loader import Loader

    images = [rgb_image(8, 8, seed=i) for i in range(20)]
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)]))
    transform = CaffeTransform(crop_size=6, mirror=True, mean=(10.0, 20.0, 30.0))
    with Loader(source, batch_size=8, workers=2, shuffle=True, seed=3, transform=transform) as loader:
        batches = [{k: np.array(v) for k, v in b.items()} for b in loader]
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels.tolist()) == list(range(20)) and labels.tolist() != list(range(20))
    assert batches[0]["image"].shape == (8, 6, 6, 3) and batches[0]["image"].dtype == np.float32
    with Loader(source, batch_size=8, workers=0, shuffle=True, seed=3, transform=transform) as loader:
        again = [np.array(b["image"]) for b in loader]
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["image"], b)  # same draws in workers and in the caller


def test_thread_backend_readers_each_get_their_own_cursor(tmp_path):
    from agnostic_prefetch.loader import Loader

    images = [rgb_image(4, 4, seed=i) for i in range(64)]
    source = LMDBSource(write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)]))
    with Loader(source, batch_size=4, workers=2, backend="thread", shuffle=True) as loader:
        got = {int(label): np.array(image) for b in loader for label, image in zip(b["label"], b["image"], strict=True)}
    assert sorted(got) == list(range(64))
    for i, im in enumerate(images):
        np.testing.assert_array_equal(got[i], im)


numeric_dtypes = st.sampled_from(["<u1", "<i2", ">i4", "<i8", "<f2", "<f4", ">f8", "|b1", "<c8"])


@settings(max_examples=100, deadline=None)
@given(
    fields=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.tuples(numeric_dtypes, st.lists(st.integers(0, 4), max_size=3)),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_array_record_decodes_to_equal_arrays(fields, seed):
    rng = np.random.default_rng(seed)
    record = {name: rng.integers(0, 100, size=shape).astype(dtype) for name, (dtype, shape) in fields.items()}
    decoded = decode_record(encode_record(record))
    assert list(decoded) == list(record)
    for name, arr in record.items():
        assert decoded[name].dtype == arr.dtype and decoded[name].shape == arr.shape
        np.testing.assert_array_equal(decoded[name], arr)


def test_forked_child_reopens_after_the_parent_read(tmp_path, images):
    # Forking this pytest process is unsafe once another test has imported JAX (its threads
    # do not survive a fork), so the fork happens in a fresh interpreter.
    import subprocess
    import sys
    import textwrap

    db = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    script = textwrap.dedent(f"""
        import multiprocessing, sys
        from agnostic_prefetch.caffe.lmdb import LMDBSource

        def read(source, index, queue):
            queue.put(int(source[index]["label"]))

        if __name__ == "__main__":
            source = LMDBSource({str(db)!r})
            source[0]  # the parent holds an open environment when it forks (as torch's DataLoader does)
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            child = ctx.Process(target=read, args=(source, 7, queue))
            child.start()
            got = queue.get(timeout=20)
            child.join(timeout=20)
            assert (got, child.exitcode) == (7, 0), (got, child.exitcode)
            assert source[8]["label"] == 8  # the parent's environment is untouched
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- the JPEG fast path (simplejpeg) against Pillow ----------------------------------------


def _jpeg(image: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    (pil.convert(mode) if mode else pil).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture
def pillow_only(monkeypatch):
    """Decode as if simplejpeg were not installed."""
    from agnostic_prefetch.sources import images as _decode

    monkeypatch.setattr(_decode, "_simplejpeg", None)


def _decode_both(data: bytes, monkeypatch, **kw) -> tuple[np.ndarray, np.ndarray]:
    from agnostic_prefetch.sources import images as _decode

    fast = _decode.decode_image(data, name="x", **kw)
    with monkeypatch.context() as m:
        m.setattr(_decode, "_simplejpeg", None)
        slow = _decode.decode_image(data, name="x", **kw)
    return fast, slow


@pytest.mark.parametrize("quality,subsampling", [(75, 2), (90, 2), (95, 0), (95, 1)])
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_jpeg_decoders_agree_with_pillow(monkeypatch, name, quality, subsampling):
    # Both are libjpeg-turbo with the accurate integer DCT and fancy upsampling; on these
    # photographs they gave identical pixels. A different libjpeg build may differ by a few
    # levels: the bound below is the tolerance, identical is what was measured.
    pytest.importorskip("simplejpeg")
    import skimage.data

    photo = getattr(skimage.data, name)()
    photo = photo[:, :, None] if photo.ndim == 2 else photo
    fast, slow = _decode_both(_jpeg(photo, quality=quality, subsampling=subsampling), monkeypatch)
    assert fast.shape == slow.shape == photo.shape and fast.dtype == np.uint8 and fast.flags.c_contiguous
    diff = np.abs(fast.astype(np.int16) - slow)
    assert diff.max() <= 2 and diff.mean() < 0.05


@pytest.mark.parametrize("color", [None, True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_colour_rules_match_pillow(monkeypatch, channels, color):
    # color=False on a colour JPEG must be Pillow's luma (not libjpeg's Y channel), gray
    # stays one channel unless color=True: conversions go through Pillow
    img = rgb_image(20, 30)[:, :, :channels]
    fast, slow = _decode_both(_jpeg(img, quality=90), monkeypatch, color=color)
    assert fast.shape == slow.shape
    assert np.abs(fast.astype(np.int16) - slow).max() <= 2


def test_cmyk_jpeg_goes_through_pillow(monkeypatch):
    fast, slow = _decode_both(_jpeg(rgb_image(16, 16), "CMYK", quality=90), monkeypatch)
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == (16, 16, 3)


def test_corrupt_and_truncated_jpegs_raise_pillows_error_naming_the_record(tmp_path):
    from agnostic_prefetch.sources.images import ImageDecodeError, decode_image

    good = _jpeg(rgb_image(64, 64), quality=90)
    for bad in (good[: len(good) // 2], good[:4] + b"\x00" * 100):
        with pytest.raises(ImageDecodeError, match="cannot decode rec7"):
            decode_image(bad, name="rec7")


def test_jpeg_above_the_pixel_limit_is_refused_by_both_paths(monkeypatch):
    from agnostic_prefetch.sources import images as _decode

    data = _jpeg(rgb_image(40, 40), quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 pixels: above twice the limit
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(_decode, "_simplejpeg", None)
            with pytest.raises(_decode.ImageTooLargeError, match="too large"):
                _decode.decode_image(data, name="big")


def test_jpeg_datums_read_in_place_give_the_same_pixels_as_pillow(tmp_path, monkeypatch):
    # the source hands the memory-mapped bytes to the decoder without copying them
    from agnostic_prefetch.sources import images as _decode

    photos = [rgb_image(24, 24, seed=i) for i in range(5)]
    source = LMDBSource(write_db(tmp_path / "db", [encoded_datum(p, i, "JPEG", quality=90) for i, p in enumerate(photos)]))
    fast = [source[i]["image"] for i in (4, 0, 1, 2, 3)]  # keyed and sequential reads
    monkeypatch.setattr(_decode, "_simplejpeg", None)
    slow = [source[i]["image"] for i in (4, 0, 1, 2, 3)]
    for a, b in zip(fast, slow, strict=True):
        assert np.abs(a.astype(np.int16) - b).max() <= 2


def test_png_and_raw_datums_identical_without_simplejpeg(tmp_path, images, pillow_only):
    raw = LMDBSource(write_db(tmp_path / "raw", [raw_datum(im, i) for i, im in enumerate(images)]))
    png = LMDBSource(write_db(tmp_path / "png", [encoded_datum(im, i) for i, im in enumerate(images)]))
    for i in range(len(images)):
        np.testing.assert_array_equal(raw[i]["image"], images[i])
        np.testing.assert_array_equal(png[i]["image"], images[i])


def test_pillow_is_forced_by_the_environment_variable():
    import subprocess
    import sys

    code = "from agnostic_prefetch.sources.images import jpeg_decoder; print(jpeg_decoder() == 'pillow')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "AGNOSTIC_PREFETCH_JPEG": "pillow"}).stdout
    assert out.strip() == "True"


def test_without_simplejpeg_installed_jpegs_decode_with_pillow():
    import subprocess
    import sys

    code = (
        "import sys, io; sys.modules['simplejpeg'] = None\n"  # makes `import simplejpeg` raise ImportError
        "import numpy as np; from PIL import Image\n"
        "from agnostic_prefetch.sources import images as _decode\n"
        "assert _decode.jpeg_decoder() == 'pillow'\n"
        "b = io.BytesIO(); Image.new('RGB', (9, 7), (10, 200, 30)).save(b, 'JPEG')\n"
        "print(_decode.decode_image(b.getvalue(), name='x').shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(7, 9, 3)"


@pytest.mark.parametrize("order", ["rgb", "bgr"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("kind", ["raw", "float"])
def test_raw_and_float_datums_are_the_exact_chw_to_hwc_permutation(tmp_path, order, channels, kind):
    # the plane-by-plane conversion must be exactly numpy's transpose (+ channel reversal for rgb)
    chw = np.random.default_rng(channels).integers(0, 256, (channels, 7, 9), dtype=np.uint8)
    Datum = caffe_messages()["Datum"]
    if kind == "raw":
        msg = Datum(channels=channels, height=7, width=9, data=chw.tobytes(), label=4)
    else:
        msg = Datum(channels=channels, height=7, width=9, float_data=chw.astype(np.float32).ravel().tolist(), label=4)
    source = LMDBSource(write_db(tmp_path / "db", [msg.SerializeToString()]), channel_order=order)
    want = chw.transpose(1, 2, 0)
    if order == "rgb":
        want = want[:, :, ::-1]
    got = source[0]["image"]
    assert got.flags.c_contiguous and got.dtype == (np.uint8 if kind == "raw" else np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels", [1, 3])
def test_encoded_png_in_bgr_order_is_exact(tmp_path, channels):
    img = rgb_image(6, 5)[:, :, :channels]
    source = LMDBSource(write_db(tmp_path / "db", [encoded_datum(img, 0)]), channel_order="bgr")
    got = source[0]["image"]
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, img[:, :, ::-1])


def test_a_loader_lets_go_of_the_database_in_the_parent_so_the_user_may_open_it(tmp_path, images):
    import agnostic_prefetch as ap

    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    source = LMDBSource(path)  # kept, as a user keeps it
    with ap.Loader(source, 2, workers=1) as loader:
        env = lmdb.open(path, readonly=True, lock=False)  # counting records, say
        try:
            assert env.stat()["entries"] == len(images)
            assert sum(len(b["label"]) for b in loader) == len(images)
        finally:
            env.close()


def test_a_database_the_user_holds_open_is_a_clear_error_not_pylmdbs(tmp_path, images):
    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with pytest.raises(RuntimeError, match="already open in this process outside agnostic_prefetch.*Close that"):
            LMDBSource(path)
    finally:
        env.close()
    assert len(LMDBSource(path)) == len(images)  # once it is closed


def test_force_color_and_force_gray_exclude_each_other(tmp_path, images):
    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    with pytest.raises(ValueError, match="exclude each other"):
        LMDBSource(path, force_color=True, force_gray=True)


@pytest.mark.parametrize("workers,backend", [(0, "process"), (2, "thread")])
def test_a_loader_whose_workers_read_here_lets_the_database_go_at_close(tmp_path, images, workers, backend):
    import agnostic_prefetch as ap

    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    source = LMDBSource(path)  # the user keeps it (for a second loader, say)
    with ap.Loader(source, 2, workers=workers, backend=backend) as loader:
        assert len(list(loader)) == 5
    lmdb.open(path, readonly=True, lock=False).close()  # py-lmdb: "already open" if it were not let go
    assert source[3]["label"] == 3  # and the source reopens it when read again


CONSTRUCTION_FAILURES = {  # the records of a database a source refuses at construction
    "images of different sizes": [raw_datum(rgb_image(6, 5), 0), raw_datum(rgb_image(7, 5), 1)],
    "a first record that is not a Datum": [b"\x22\x50short", raw_datum(rgb_image(2, 2), 0)],
    "a raw Datum of the wrong length": [
        caffe_messages()["Datum"](channels=3, height=2, width=2, data=b"123", label=0).SerializeToString()],
    "no records": [],
}


@pytest.mark.parametrize("how", CONSTRUCTION_FAILURES)
def test_a_source_that_fails_to_construct_lets_go_of_the_database(tmp_path, how):
    path = write_db(tmp_path / "db", CONSTRUCTION_FAILURES[how])
    with pytest.raises(ValueError) as failure:  # kept, as a notebook keeps its last traceback
        LMDBSource(path)
    lmdb.open(path, readonly=True, lock=False).close()  # py-lmdb: "already open" if it were held
    assert failure.traceback  # alive until here: the release did not wait for the collector


def test_an_environment_whose_first_transaction_fails_is_let_go_at_once(tmp_path, images, monkeypatch):
    import agnostic_prefetch.caffe.lmdb as module

    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    attach = module.acquire_env

    class Resized:  # the environment opens, then its read transaction fails (a writer grew the map)
        def __init__(self, env):
            self.env = env

        def begin(self, **options):
            raise lmdb.MapResizedError("simulated MDB_MAP_RESIZED")

    monkeypatch.setattr(module, "acquire_env", lambda *args, **kwargs: Resized(attach(*args, **kwargs)))
    with pytest.raises(lmdb.MapResizedError) as failure:  # kept, as a notebook keeps its last traceback
        LMDBSource(path)
    monkeypatch.undo()
    lmdb.open(path, readonly=True, lock=False).close()
    assert failure.traceback


@pytest.mark.parametrize("workers,backend", [(0, "process"), (1, "process"), (2, "thread")])
def test_a_loader_that_fails_to_construct_lets_go_of_the_database(tmp_path, images, workers, backend):
    import agnostic_prefetch as ap
    from agnostic_prefetch.errors import LoaderError

    def refuse(example, rng):
        raise ValueError("a transform that refuses every record")

    path = write_db(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(images)])
    with pytest.raises(LoaderError, match="a transform that refuses every record") as failure:
        ap.Loader(LMDBSource(path), 2, workers=workers, backend=backend, transform=refuse)
    lmdb.open(path, readonly=True, lock=False).close()
    assert failure.traceback  # kept until here, as a notebook keeps its last traceback


def test_a_source_finalized_by_the_collector_while_another_opens_does_not_hang(tmp_path, images, monkeypatch):
    """The collector may run a dropped source's finalizer (release_env) on the thread that is
    inside acquire_env, opening another database: the registry's lock must let it through."""
    import threading

    from agnostic_prefetch.caffe import _lmdb_env

    # A fresh lock of the registry's own kind: if it deadlocked, only this one stays held.
    same_kind = threading.RLock if type(_lmdb_env._envs_lock) is type(threading.RLock()) else threading.Lock
    monkeypatch.setattr(_lmdb_env, "_envs_lock", same_kind())
    first = LMDBSource(write_db(tmp_path / "a", [raw_datum(im, i) for i, im in enumerate(images)]))
    second_path = write_db(tmp_path / "b", [raw_datum(im, i) for i, im in enumerate(images)])
    first[0]  # holds its environment now
    real_open = lmdb.open

    def open_while_collecting(*args, **kwargs):
        first._finalizer()  # what the collector does to a source dropped in a cycle
        return real_open(*args, **kwargs)

    monkeypatch.setattr(_lmdb_env.lmdb, "open", open_while_collecting)
    opened = []
    thread = threading.Thread(target=lambda: opened.append(LMDBSource(second_path)), daemon=True)
    thread.start()
    thread.join(10)
    assert opened, "LMDBSource hung: the finalizer waited on the lock its own thread held"
    monkeypatch.undo()
    assert len(opened[0]) == len(images)
    lmdb.open(str(tmp_path / "a"), readonly=True, lock=False).close()  # the first was let go
