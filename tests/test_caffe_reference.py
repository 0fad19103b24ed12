"""Against real Caffe: the converter's records, compute-mean's bytes and the TEST-phase tops
of Data, ImageData and WindowData layers, equal to what BVLC Caffe itself produced from the
same inputs (tests/caffe_reference: inputs, nets, and the expected outputs generate.py made)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("google.protobuf")

from agnostic_prefetch.caffe import convert_imageset, from_prototxt  # noqa: E402
from agnostic_prefetch.caffe._lmdb_write import LMDBWriter  # noqa: E402
from agnostic_prefetch.caffe.convert import compute_mean  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caffe_reference")
INPUTS, NETS, EXPECTED = (os.path.join(HERE, d) for d in ("inputs", "nets", "expected"))
DATABASES = {  # as generate.py makes them: our convert options, and the list
    "raw_resized": ({"resize_height": 40, "resize_width": 50}, "list.txt"),
    "gray_resized": ({"resize_height": 40, "resize_width": 50, "gray": True}, "list.txt"),
    "encoded": ({"encoded": True}, "list.txt"),
    "encoded_resized": ({"encoded": True, "resize_height": 40, "resize_width": 50}, "list.txt"),
    "gray16": ({"gray": True}, "list16.txt"),
    "colour16": ({}, "list16.txt"),
    "raw_sizes": ({}, "list.txt"),
    "large_encoded": ({"encoded": True}, "list227.txt"),
}
# Nets whose per-batch shapes go beyond the first record's: each batch of 1 is its own
# datum's size (raw), or its own channel count under a 227 crop (encoded gray and colour).

_spec = importlib.util.spec_from_file_location("caffe_reference_generate", os.path.join(HERE, "generate.py"))
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)
unpack = _generate.unpack  # how generate.py packs the records

if not os.path.isdir(EXPECTED):
    pytest.skip("no reference outputs: run tests/caffe_reference/generate.py with a built Caffe",
                allow_module_level=True)


def expected_db(name):
    with np.load(os.path.join(EXPECTED, f"convert_{name}.npz")) as f:
        arrays = dict(f)
    return unpack(arrays, "keys"), unpack(arrays, "values")


def our_db(tmp_path, name):
    path = tmp_path / name
    options, list_name = DATABASES[name]
    convert_imageset(INPUTS + "/", os.path.join(INPUTS, list_name), path, progress=False, **options)
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return [k for k, _ in items], [v for _, v in items]


@pytest.mark.parametrize("name", sorted(set(DATABASES) - {"encoded_resized"}))
def test_convert_writes_the_records_convert_imageset_writes(tmp_path, name):
    keys, values = our_db(tmp_path, name)
    want_keys, want_values = expected_db(name)
    assert keys == want_keys
    for key, ours, theirs in zip(keys, values, want_values, strict=True):
        assert ours == theirs, key


def test_where_convert_imageset_re_encodes_the_pixels_are_its_own(tmp_path):
    from agnostic_prefetch.caffe._datum import decode_datum
    from agnostic_prefetch.sources.images import decode_image

    keys, values = our_db(tmp_path, "encoded_resized")
    want_keys, want_values = expected_db("encoded_resized")
    assert keys == want_keys
    for key, ours, theirs in zip(keys, values, want_values, strict=True):
        a, b = decode_datum(ours), decode_datum(theirs)
        assert a.encoded and b.encoded and a.label == b.label
        np.testing.assert_array_equal(decode_image(a.data, name="ours"), decode_image(b.data, name="caffe"),
                                      err_msg=key.decode())


def test_compute_mean_writes_the_bytes_compute_image_mean_writes(tmp_path):
    caffe_db(tmp_path, "raw_resized")
    compute_mean(tmp_path / "raw_resized", tmp_path / "mean.binaryproto", progress=False)
    with open(os.path.join(EXPECTED, "mean.binaryproto"), "rb") as f:
        assert (tmp_path / "mean.binaryproto").read_bytes() == f.read()


def caffe_db(tmp_path, name):
    """Caffe's own database of ``name``, written back from the reference records."""
    path = tmp_path / name
    if not path.exists():
        keys, values = expected_db(name)
        with LMDBWriter(str(path)) as writer:
            for key, value in zip(keys, values, strict=True):
                writer.put(key, value)
    return path


@pytest.mark.parametrize("case", sorted(n.removesuffix(".prototxt") for n in os.listdir(NETS)))
def test_test_phase_tops_equal_caffes_in_every_value(tmp_path, case):
    text = open(os.path.join(NETS, case + ".prototxt")).read()
    for name in DATABASES:
        if f"$DB/{name}" in text:
            caffe_db(tmp_path, name)
    text = text.replace("$DB", str(tmp_path)).replace("$INPUTS", INPUTS).replace("$EXPECTED", EXPECTED)
    (tmp_path / "net.prototxt").write_text(text)
    with np.load(os.path.join(EXPECTED, case + ".npz")) as f:
        want_label = f["label"]
        want_data = [f["data"]] if "data" in f else [f[f"data_{i}"][None] for i in range(len(want_label))]
    want_data = [w.astype(np.float32) for w in want_data]  # "# stored: uint8" nets: whole values
    options = {}
    if case.endswith("per_batch"):  # sizes and channel counts vary: slots for the largest item
        options = {"spec": {"data": np.zeros((4, 64, 96), np.float32), "label": np.float32(0)},
                   "shapes": "per_batch"}
    with from_prototxt(tmp_path / "net.prototxt", "TEST", workers=0, **options)["data"] as loader:
        got = []
        for batch in loader:
            got.append(batch)
            if sum(len(b["label"]) for b in got) >= len(want_label):
                break
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), want_label)
    if len(want_data) == 1:
        data = np.concatenate([b["data"] for b in got])
        assert data.shape == want_data[0].shape and data.dtype == np.float32
        np.testing.assert_array_equal(data, want_data[0])
    else:
        assert [b["data"].shape for b in got] == [w.shape for w in want_data]
        for ours, theirs in zip(got, want_data, strict=True):
            np.testing.assert_array_equal(ours["data"], theirs)
