"""The convert / inspect / compute-mean commands (Caffe convert_imageset semantics)."""

from __future__ import annotations

import argparse
import logging
import os

import lmdb
import numpy as np
import pytest
from PIL import Image
from test_datum import caffe_messages

from agnostic_prefetch.caffe._datum import Datum, encode_datum
from agnostic_prefetch.caffe.convert import add_commands, compute_mean, convert_imageset, inspect_db
from agnostic_prefetch.caffe.lmdb import LMDBSource, write_array_records


@pytest.fixture
def image_set(tmp_path):
    """Five 6×8 PNGs (one gray) in imgs/, a list with labels, and the pixels (RGB)."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub dir").mkdir(parents=True)
    names, pixels = [], []
    for i in range(5):
        img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        name = f"sub dir/img {i}.png"
        if i == 4:
            img = np.repeat(img[:, :, :1], 3, axis=2)
            Image.fromarray(img[:, :, 0]).save(tmp_path / "imgs" / name)
        else:
            Image.fromarray(img).save(tmp_path / "imgs" / name)
        names.append(name)
        pixels.append(img)
    (tmp_path / "list.txt").write_text("".join(f"{n} {i + 10}\n" for i, n in enumerate(names)))
    return tmp_path, names, pixels


def read_raw(db: str) -> list[tuple[bytes, object]]:
    """Every (key, Datum) of a database, parsed by the protobuf runtime (independent of our reader)."""
    env = lmdb.open(db, readonly=True, lock=False)
    with env.begin() as txn:
        out = [(bytes(k), caffe_messages()["Datum"].FromString(bytes(v))) for k, v in txn.cursor()]
    env.close()
    return out


def test_raw_datums_are_bgr_chw_with_caffes_keys(image_set):
    tmp, names, pixels = image_set
    result = convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", progress=False)
    assert result["written"] == 5 and result["skipped"] == 0 and result["shape"] == (6, 8, 3)
    records = read_raw(str(tmp / "db"))
    assert [k for k, _ in records] == [f"{i:08d}_{n}".encode() for i, n in enumerate(names)]
    for (_, datum), img, label in zip(records, pixels, range(10, 15), strict=True):
        assert (datum.channels, datum.height, datum.width, datum.label, datum.encoded) == (3, 6, 8, label, False)
        np.testing.assert_array_equal(np.frombuffer(datum.data, np.uint8).reshape(3, 6, 8), img[:, :, ::-1].transpose(2, 0, 1))
    source = LMDBSource(tmp / "db")
    np.testing.assert_array_equal(source[2]["image"], pixels[2])


def test_shuffle_numbers_keys_after_a_seeded_permutation(image_set):
    tmp, names, _ = image_set
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "a", shuffle=True, seed=3, progress=False)
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "b", shuffle=True, seed=3, progress=False)
    keys = [k.decode() for k, _ in read_raw(str(tmp / "a"))]
    assert keys == [k.decode() for k, _ in read_raw(str(tmp / "b"))]
    assert [k[:8] for k in keys] == [f"{i:08d}" for i in range(5)]
    order = [names[i] for i in np.random.default_rng(3).permutation(5)]
    assert [k[9:] for k in keys] == order


def test_resize_and_gray(image_set):
    tmp, *_ = image_set
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", resize_height=3, resize_width=4, gray=True, progress=False)
    datum = read_raw(str(tmp / "db"))[0][1]
    assert (datum.channels, datum.height, datum.width) == (1, 3, 4)
    assert LMDBSource(tmp / "db")[0]["image"].shape == (3, 4, 1)


def test_only_one_resize_size_is_an_error(image_set):
    tmp, *_ = image_set
    with pytest.raises(ValueError, match="both"):
        convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", resize_height=3)


def test_encoded_keeps_files_as_they_are_and_reencodes_only_to_another_format(image_set):
    tmp, names, pixels = image_set
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "png", encoded=True, progress=False)
    records = read_raw(str(tmp / "png"))
    assert records[0][1].encoded and records[0][1].data == (tmp / "imgs" / names[0]).read_bytes()
    # a gray file is stored as it is too, as convert_imageset does; force_color decodes
    # every record to 3 channels, as Caffe's transform_param does
    assert records[4][1].data == (tmp / "imgs" / names[4]).read_bytes()
    with pytest.raises(ValueError, match="different channel counts.*force_color=True"):
        LMDBSource(tmp / "png")
    source = LMDBSource(tmp / "png", force_color=True)
    for i in range(5):
        np.testing.assert_array_equal(source[i]["image"], pixels[i])
    assert LMDBSource(tmp / "png", force_gray=True)[0]["image"].shape == (6, 8, 1)
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "jpg", encoded=True, encode_type="jpg", progress=False)
    assert read_raw(str(tmp / "jpg"))[0][1].data[:2] == b"\xff\xd8"  # a JPEG now
    assert LMDBSource(tmp / "jpg")[0]["image"].shape == (6, 8, 3)


def test_unreadable_images_are_skipped_with_a_warning_and_counted(image_set, caplog):
    tmp, *_ = image_set
    (tmp / "imgs" / "bad.png").write_bytes(b"garbage")
    (tmp / "list.txt").write_text((tmp / "list.txt").read_text() + "bad.png 1\nmissing.png 2\n")
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch.convert"):
        result = convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", progress=False)
    assert result["written"] == 5 and result["skipped"] == 2
    assert "bad.png" in caplog.text and "missing.png" in caplog.text and "skipped 2 of 7" in caplog.text


def test_check_size_stops_at_a_different_size(image_set):
    tmp, *_ = image_set
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp / "imgs" / "small.png")
    (tmp / "list.txt").write_text((tmp / "list.txt").read_text() + "small.png 1\n")
    with pytest.raises(ValueError, match=r"small.png.*5×5×3.*6×8×3.*incomplete"):
        convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", check_size=True, progress=False)


def test_refuses_an_existing_database(image_set):
    tmp, *_ = image_set
    (tmp / "db").mkdir()
    (tmp / "db" / "data.mdb").write_bytes(b"")
    with pytest.raises(FileExistsError, match="db"):
        convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", progress=False)


def test_map_grows_when_full(image_set):
    tmp, *_ = image_set
    (tmp / "list.txt").write_text((tmp / "list.txt").read_text() * 40)
    result = convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", map_size=32 * 1024, progress=False)
    assert result["written"] == 200 and len(LMDBSource(tmp / "db")) == 200


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="agnostic-prefetch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_inspect_compute_mean(image_set, capsys):
    tmp, _, pixels = image_set
    assert run_cli("convert", str(tmp / "imgs") + "/", str(tmp / "list.txt"), str(tmp / "db"), "--quiet") == 0
    assert "wrote 5 records" in capsys.readouterr().out
    assert run_cli("inspect", str(tmp / "db"), "--quiet") == 0
    out = capsys.readouterr().out
    assert "5 records (5 raw)" in out and "00000000_sub dir/img 0.png" in out and "10: 1, 11: 1" in out and "6×8×3 uint8" in out
    assert run_cli("compute-mean", str(tmp / "db"), str(tmp / "mean.npy"), "--quiet") == 0
    mean = np.load(tmp / "mean.npy")
    assert mean.dtype == np.float32 and mean.shape == (6, 8, 3)
    np.testing.assert_allclose(mean, np.mean(pixels, axis=0), rtol=1e-6)
    assert "per channel: R " in capsys.readouterr().out
    assert run_cli("compute-mean", str(tmp / "db"), str(tmp / "bgr.npy"), "--bgr", "--quiet") == 0
    np.testing.assert_allclose(np.load(tmp / "bgr.npy"), mean[:, :, ::-1])


def test_compute_mean_writes_a_caffe_binaryproto(image_set):
    tmp, _, pixels = image_set
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", progress=False)
    compute_mean(tmp / "db", tmp / "mean.binaryproto", progress=False)
    blob = caffe_messages()["BlobProto"].FromString((tmp / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 6, 8)
    # compute_image_mean: a float32 sum, one record at a time in key order, / count in float32
    total = np.zeros((6, 8, 3), np.float32)
    for image in pixels:
        total = (total + image.astype(np.float32)).astype(np.float32)
    expected = (total / np.float32(len(pixels)))[:, :, ::-1].transpose(2, 0, 1)  # BGR C×H×W
    np.testing.assert_array_equal(np.array(blob.data, np.float32).reshape(3, 6, 8), expected)
    as_caffe = caffe_messages()["BlobProto"](num=1, channels=3, height=6, width=8, data=expected.reshape(-1).tolist())
    assert (tmp / "mean.binaryproto").read_bytes() == as_caffe.SerializeToString()


def test_the_mean_is_accumulated_in_float32_as_caffe_does(tmp_path):
    from agnostic_prefetch.caffe._datum import Datum, encode_datum
    from agnostic_prefetch.caffe._lmdb_write import LMDBWriter

    # float_data Datums: float32 sums round (uint8 sums stay exact below 2**24)
    values = np.random.default_rng(3).normal(100, 30, (2000, 4)).astype(np.float32)
    with LMDBWriter(str(tmp_path / "db")) as writer:
        for i, row in enumerate(values):
            writer.put(b"%08d" % i, encode_datum(Datum(channels=1, height=2, width=2, float_data=row)))
    mean = compute_mean(tmp_path / "db", progress=False)["mean"].reshape(-1)
    total = np.zeros(4, np.float32)
    for row in values:
        total = (total + row).astype(np.float32)
    np.testing.assert_array_equal(mean, total / np.float32(len(values)))
    assert not np.array_equal(mean, values.astype(np.float64).mean(axis=0).astype(np.float32))


def test_cli_errors_are_a_message_and_exit_code_one(tmp_path, capsys):
    assert run_cli("inspect", str(tmp_path / "nope"), "--quiet") == 1
    assert "nope" in capsys.readouterr().out


def test_inspect_counts_labels_without_decoding(image_set):
    tmp, *_ = image_set
    convert_imageset(str(tmp / "imgs") + "/", tmp / "list.txt", tmp / "db", encoded=True, progress=False)
    info = inspect_db(tmp / "db")
    assert info["count"] == 5 and info["kinds"] == {"encoded": 5} and info["labels"] == {i: 1 for i in range(10, 15)}


# -- compute-mean on every kind of bad input: a message, exit code 1, no output file --------


def compute_mean_cli(db, out, capsys, *flags: str) -> tuple[int, str]:
    """Exit code and printed text of ``agnostic-prefetch compute-mean DB OUT``."""
    from agnostic_prefetch.cli import main

    code = main(["compute-mean", str(db), str(out), "--quiet", *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_compute_mean_of_records_without_an_image_leaf_names_the_record_and_its_leaves(tmp_path, capsys):
    write_array_records(tmp_path / "db", ({"x": np.full(3, i, np.float32), "label": i} for i in range(3)))
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 1 and "compute-mean: error:" in text
    assert "record 0 (key b'00000000')" in text and str(tmp_path / "db") in text
    assert "no 'image' leaf" in text and "'x', 'label'" in text and "write_array_records" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_compute_mean_of_gray_images_is_h_w_1_as_caffe_treats_one_channel(tmp_path, capsys):
    images = [np.full((4, 5), 10 * i, np.uint8) for i in range(3)]
    write_array_records(tmp_path / "db", ({"image": image} for image in images))
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 0 and "mean of 3 images (4×5×1)" in text and "gray 10.000" in text
    mean = np.load(tmp_path / "mean.npy")
    assert mean.dtype == np.float32 and mean.shape == (4, 5, 1) and (mean == 10).all()
    code, _ = compute_mean_cli(tmp_path / "db", tmp_path / "mean.binaryproto", capsys)
    blob = caffe_messages()["BlobProto"].FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert code == 0 and (blob.num, blob.channels, blob.height, blob.width) == (1, 1, 4, 5)
    assert list(blob.data) == [10.0] * 20


def test_compute_mean_of_images_of_differing_shapes_names_both_and_the_remedy(tmp_path, capsys):
    write_array_records(tmp_path / "db", ({"image": np.zeros((4, 5 + (i == 2), 3), np.uint8)} for i in range(3)))
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.binaryproto", capsys)
    assert code == 1 and "record 2 (key b'00000002')" in text and str(tmp_path / "db") in text
    assert "4×6×3" in text and "4×5×3" in text and "--resize-height" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_compute_mean_of_images_that_are_not_h_w_or_h_w_c_is_refused(tmp_path, capsys):
    write_array_records(tmp_path / "db", ({"image": np.zeros(7, np.uint8)} for _ in range(2)))
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 1 and "record 0 (key b'00000000')" in text and "shape (7,)" in text
    assert "H×W" in text and sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_compute_mean_of_an_empty_database_says_so_with_the_remedy(tmp_path, capsys):
    lmdb.open(str(tmp_path / "db"), map_size=1 << 20).close()
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 1 and "holds no records" in text and "convert" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


@pytest.mark.parametrize("kind", ["file", "folder", "missing"])
def test_compute_mean_of_a_path_that_is_not_an_lmdb_names_it(tmp_path, capsys, kind):
    path = tmp_path / "db"
    if kind == "file":
        path.write_bytes(b"not a database " * 100)
    elif kind == "folder":
        path.mkdir()
    code, text = compute_mean_cli(path, tmp_path / "mean.npy", capsys)
    assert code == 1 and text.startswith("compute-mean: error:") and str(path) in text
    assert "Traceback" not in text and not (tmp_path / "mean.npy").exists()


def test_compute_mean_of_records_that_do_not_decode_names_the_record(tmp_path, capsys):
    from agnostic_prefetch.caffe._lmdb_write import LMDBWriter

    with LMDBWriter(str(tmp_path / "db")) as writer:
        writer.put(b"00000000", encode_datum(Datum(channels=1, height=2, width=2, data=bytes(4))))
        writer.put(b"00000001", b"\xff\xff\xff")
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 1 and "record 1 (key b'00000001')" in text and "not a valid Caffe Datum" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_compute_mean_that_fails_while_writing_leaves_no_file(tmp_path, capsys, monkeypatch):
    write_array_records(tmp_path / "db", ({"image": np.zeros((2, 2, 3), np.uint8)} for _ in range(2)))

    def disk_full(file, arr, **kwargs):
        file.write(b"\x93NUMPY half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    code, text = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    assert code == 1 and "No space left on device" in text and str(tmp_path / "mean.npy") in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_compute_mean_writes_its_file_with_the_umasks_permissions(tmp_path, capsys):
    write_array_records(tmp_path / "db", ({"image": np.zeros((2, 2, 3), np.uint8)} for _ in range(2)))
    old = os.umask(0o022)
    try:
        code, _ = compute_mean_cli(tmp_path / "db", tmp_path / "mean.npy", capsys)
    finally:
        os.umask(old)
    assert code == 0 and (tmp_path / "mean.npy").stat().st_mode & 0o777 == 0o644


def test_convert_refuses_a_negative_shuffle_seed_naming_it(image_set, capsys):
    tmp, *_ = image_set
    code = run_cli("convert", str(tmp / "imgs") + "/", str(tmp / "list.txt"), str(tmp / "db"),
                   "--shuffle", "--seed", "-1", "--quiet")
    out = capsys.readouterr().out
    assert code == 1 and "seed must be a non-negative integer" in out and "got -1" in out
    assert not (tmp / "db").exists()
