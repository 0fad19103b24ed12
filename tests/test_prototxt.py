"""from_prototxt: the data layers of a Caffe net as Loaders, parsed strictly, selected by phase."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("google.protobuf")

from agnostic_prefetch.caffe import CaffeTransform, LMDBSource, convert_imageset, from_prototxt  # noqa: E402
from agnostic_prefetch.caffe.convert import compute_mean  # noqa: E402
from agnostic_prefetch.errors import LoaderError  # noqa: E402

CONV = """
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 96
    kernel_size: 11
    stride: 4
    weight_filler { type: "gaussian" std: 0.01 }
    bias_filler { type: "constant" value: 0 }
  }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "accuracy"
  type: "Accuracy"
  bottom: "conv1"
  bottom: "label"
  top: "accuracy"
  include { phase: TEST }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv1" bottom: "label" top: "loss" }
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with an LMDB of 7 colour 12x10 PNGs, its mean, an image list and a
    window file; relative paths in the prototxts resolve against it, as in Caffe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "list.txt", "w") as f:
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
            f.write(f"{i}.png {i % 3}\n")
    convert_imageset(str(tmp_path / "imgs") + "/", tmp_path / "list.txt", tmp_path / "train_lmdb", progress=False)
    compute_mean(tmp_path / "train_lmdb", tmp_path / "mean.binaryproto", progress=False)
    (tmp_path / "windows.txt").write_text(
        "# 0\nimgs/0.png\n3\n12\n10\n2\n1 0.9 1 1 8 9\n0 0.1 0 0 9 11\n")
    return tmp_path


def write(work, text, name="net.prototxt"):
    (work / name).write_text(text)
    return str(work / name)


CAFFENET = """
name: "CaffeNet"
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TRAIN }
  transform_param {
    mirror: true
    crop_size: 8
    mean_file: "mean.binaryproto"
  }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB }
}
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TEST }
  transform_param { mirror: false crop_size: 8 mean_file: "mean.binaryproto" }
  data_param { source: "train_lmdb" batch_size: 3 backend: LMDB }
}
""" + CONV


def test_caffenet_test_phase_gives_the_test_layers_tops_centre_cropped_with_the_mean_file(work):
    loaders = from_prototxt(write(work, CAFFENET), "TEST", workers=0)
    assert list(loaders) == ["data"]
    batches = [b for _, b in zip(range(3), loaders["data"], strict=False)]
    for loader in loaders.values():
        loader.close()
    assert [b["data"].shape for b in batches] == [(3, 3, 8, 8)] * 3
    assert batches[0]["label"].dtype == np.float32
    # Caffe's Data layer never ends: 7 records in batches of 3 wrap around mid-batch
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2], [0, 1, 2], [0, 0, 1]]
    source = LMDBSource(work / "train_lmdb", channel_order="bgr")
    transform = CaffeTransform(crop_size=8, mean_file=str(work / "mean.binaryproto"), train=False,
                               layout="CHW", channel_order="bgr")
    want = transform(source[6], np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(batches[2]["data"][0], want)


def test_train_phase_picks_the_train_layer_and_epochs_makes_it_end(work):
    with from_prototxt(write(work, CAFFENET), "TRAIN", workers=0, epochs=1)["data"] as loader:
        sizes = [len(b["label"]) for b in loader]
    assert sizes == [4, 3]


LENET_V1 = """
name: "LeNet"
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param {
    source: "train_lmdb"
    backend: LMDB
    batch_size: 2
    scale: 0.00390625
  }
  include: { phase: TEST }
}
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_legacy_v1_layers_parse_and_their_data_param_scale_moves_to_the_transform(work):
    with from_prototxt(write(work, LENET_V1), "TEST", workers=0, epochs=1)["mnist"] as loader:
        batch = next(iter(loader))
    raw = LMDBSource(work / "train_lmdb", channel_order="bgr")[0]["image"]
    np.testing.assert_array_equal(batch["data"][0], raw.transpose(2, 0, 1).astype(np.float32) * np.float32(0.00390625))


GOOGLENET_STAGES = """
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TEST stage: "val" }
  transform_param { crop_size: 8 mean_value: 104 mean_value: 117 mean_value: 123 }
  data_param { source: "train_lmdb" batch_size: 2 backend: LMDB }
}
layer {
  name: "data_small" type: "Data" top: "data" top: "label"
  include { phase: TEST not_stage: "val" min_level: 1 }
  transform_param { crop_size: 4 }
  data_param { source: "train_lmdb" batch_size: 1 backend: LMDB }
}
layer {
  name: "loss3" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss3"
  exclude { phase: TRAIN }
}
"""


def test_include_rules_with_stages_and_levels_select_layers_as_caffe_does(work):
    path = write(work, GOOGLENET_STAGES)

    def names(**state):
        loaders = from_prototxt(path, "TEST", workers=0, **state)
        for loader in loaders.values():
            loader.close()
        return sorted(loaders)

    assert names(stages=["val"]) == ["data"]
    assert names() == []  # data_small needs level >= 1
    assert names(level=1) == ["data_small"]
    assert names(stages=["val"], level=1) == ["data"]


def test_mean_values_are_bgr_and_rgb_output_reverses_them(work):
    path = write(work, GOOGLENET_STAGES)
    bgr = from_prototxt(path, "TEST", stages=["val"], workers=0, epochs=1)["data"]
    rgb = from_prototxt(path, "TEST", stages=["val"], workers=0, epochs=1, channel_order="rgb", layout="NHWC")["data"]
    with bgr, rgb:
        a, b = next(iter(bgr))["data"], next(iter(rgb))["data"]
    np.testing.assert_array_equal(a.transpose(0, 2, 3, 1)[..., ::-1], b)
    raw = LMDBSource(work / "train_lmdb", channel_order="bgr")[0]["image"][2:10, 1:9].astype(np.float32)
    np.testing.assert_array_equal(a[0], (raw - np.float32([104, 117, 123])).transpose(2, 0, 1))


FLICKR = """
layer {
  name: "data"
  type: "ImageData"
  top: "data"
  top: "label"
  include { phase: TEST }
  transform_param { mirror: false crop_size: 6 mean_value: 100 }
  image_data_param { source: "list.txt" batch_size: 2 new_height: 9 new_width: 9 root_folder: "imgs/" is_color: false }
}
"""


def test_image_data_resizes_reads_gray_and_wraps_around(work):
    with from_prototxt(write(work, FLICKR), "TEST", workers=0)["data"] as loader:
        batches = [b for _, b in zip(range(4), loader, strict=False)]
    assert batches[0]["data"].shape == (2, 1, 6, 6)
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2, 0], [1, 2], [0, 0]]


PASCAL = """
layer {
  name: "data"
  type: "WindowData"
  top: "data"
  top: "label"
  include { phase: TEST }
  transform_param { mirror: false crop_size: 8 mean_value: 104 mean_value: 117 mean_value: 123 }
  window_data_param {
    source: "windows.txt"
    batch_size: 2
    fg_threshold: 0.5
    bg_threshold: 0.5
    fg_fraction: 0.5
    context_pad: 2
    crop_mode: "warp"
    cache_images: true
  }
}
"""


def test_window_data_gives_background_then_foreground_warped_windows(work, caplog):
    with caplog.at_level(logging.INFO, "agnostic_prefetch.caffe"):
        loaders = from_prototxt(write(work, PASCAL), "TEST", workers=0)
    with loaders["data"] as loader:
        batch = next(iter(loader))
    assert batch["data"].shape == (2, 3, 8, 8)
    assert batch["label"].tolist() == [0.0, 1.0]
    assert "cache_images has no effect" in caplog.text


@pytest.mark.parametrize("text, message", [
    ('layer { name: "d" type: "Data" top: "data" data_param { sorce: "x" batch_size: 1 backend: LMDB } }',
     r"line 1, column \d+ .*has no field named \"sorce\""),
    ('layer { name: "d" type: "Data" top: "data" data_param { source: "train_lmdb" batch_size: 1 } }',
     r"LEVELDB \(Caffe's default when none is given\)"),
    ('layer { name: "h" type: "HDF5Data" top: "data" hdf5_data_param { source: "x" } }',
     r"layer 'h'.*HDF5Data layer with no bottoms \(a data layer\), which agnostic_prefetch does not read"),
    ('layer { name: "d" type: "Data" top: "data"\n include { phase: TEST } exclude { phase: TRAIN }\n'
     ' data_param { source: "train_lmdb" batch_size: 1 backend: LMDB } }',
     "either include rules or exclude rules, not both"),
    ('layer { name: "d" type: "Data" top: "data"\n', r"line 1: this block is never closed"),
    ('layer { name: "x" type: "SomeCustomData" top: "data" }',
     r"layer 'x'.*SomeCustomData layer with no bottoms \(a data layer\), which agnostic_prefetch does not read"),
])
def test_errors_name_the_file_line_layer_and_remedy(work, text, message):
    with pytest.raises(ValueError, match=message):
        from_prototxt(write(work, text), "TRAIN", workers=0)


def test_a_typo_deep_in_a_data_layer_names_its_line(work):
    text = CAFFENET.replace("crop_size: 8\n    mean_file", "crop_sise: 8\n    mean_file")
    with pytest.raises(ValueError, match=r"net.prototxt, line 11, column 5 \(in the layer that starts at line 3\): "
                                         r"Message type \"caffe.TransformationParameter\" has no field named \"crop_sise\""):
        from_prototxt(write(work, text), "TRAIN", workers=0)


def test_batch_size_comes_from_the_prototxt_and_root_resolves_paths(work, tmp_path_factory, monkeypatch):
    with pytest.raises(ValueError, match="batch_size comes from the prototxt"):
        from_prototxt(write(work, CAFFENET), "TEST", batch_size=3)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with from_prototxt(str(work / "net.prototxt"), "TEST", root=work, workers=0, epochs=1)["data"] as loader:
        assert sum(len(b["label"]) for b in loader) == 7


def test_rand_skip_of_a_data_layer_is_accepted_and_said_once(work, caplog):
    text = CAFFENET.replace("batch_size: 3 backend: LMDB", "batch_size: 3 backend: LMDB rand_skip: 5 prefetch: 2")
    with caplog.at_level(logging.INFO, "agnostic_prefetch.caffe"):
        loaders = from_prototxt(write(work, text), "TEST", workers=0)
    loaders["data"].close()
    assert "rand_skip has no effect in Caffe's final master" in caplog.text
    assert "prefetch has no effect" in caplog.text


def test_uint8_output_only_where_the_values_are_whole(work):
    text = CAFFENET.replace('mean_file: "mean.binaryproto" }\n  data_param { source: "train_lmdb" batch_size: 3',
                            '}\n  data_param { source: "train_lmdb" batch_size: 3')
    with from_prototxt(write(work, text), "TEST", workers=0, dtype=np.uint8, epochs=1)["data"] as loader:
        assert next(iter(loader))["data"].dtype == np.uint8
    with pytest.raises(ValueError, match="dtype=uint8 needs no mean and scale 1"):
        from_prototxt(write(work, CAFFENET), "TEST", workers=0, dtype=np.uint8)


def test_image_data_rand_skip_starts_the_stream_at_a_line_drawn_from_the_seed(work):
    text = FLICKR.replace("is_color: false", "is_color: false rand_skip: 5")
    starts = set()
    for seed in range(12):
        with from_prototxt(write(work, text), "TEST", workers=0, seed=seed)["data"] as loader:
            first = next(iter(loader))["label"].tolist()
        skip = int(np.random.default_rng([seed, 0x534B4950]).integers(0, 5))
        assert first == [skip % 3, (skip + 1) % 3]  # line i has label i % 3
        starts.add(skip)
    assert len(starts) > 1
    with pytest.raises(ValueError, match="rand_skip=5 starts Caffe's endless stream.*no meaning with epochs="):
        from_prototxt(write(work, text), "TEST", workers=0, epochs=1)


@pytest.mark.parametrize("window_scale, transform_scale, want", [
    (None, None, 1.0), ("0.5", None, 0.5), (None, "0.25", 1.0), ("0.5", "0.25", 0.5),
])
def test_window_data_multiplies_by_window_data_param_scale_and_never_transform_param_scale(
        work, window_scale, transform_scale, want):
    from agnostic_prefetch.caffe import WindowSource

    text = PASCAL.replace("crop_size: 8", f"crop_size: 8{f' scale: {transform_scale}' if transform_scale else ''}")
    text = text.replace("batch_size: 2", f"batch_size: 2{f' scale: {window_scale}' if window_scale else ''}")
    with from_prototxt(write(work, text), "TEST", workers=0)["data"] as loader:
        data = next(iter(loader))["data"]
    source = WindowSource(work / "windows.txt", root_folder="", crop_size=8, context_pad=2, fg_fraction=0.5,
                          mean=(104.0, 117.0, 123.0), scale=want, channel_order="bgr")
    background, foreground = source[2], source[0]  # Caffe: background first, then foreground
    np.testing.assert_array_equal(data, np.stack([background["image"], foreground["image"]]).transpose(0, 3, 1, 2))


def test_window_data_says_that_transform_param_scale_has_no_effect_there(work, caplog):
    text = PASCAL.replace("crop_size: 8", "crop_size: 8 scale: 0.25").replace("batch_size: 2", "batch_size: 2 scale: 0.5")
    with caplog.at_level(logging.INFO, "agnostic_prefetch.caffe"):
        from_prototxt(write(work, text), "TEST", workers=0)["data"].close()
    assert "transform_param.scale has no effect on Caffe's WindowData layer" in caplog.text
    assert "window_data_param.scale has no effect" not in caplog.text


def test_a_v1_window_data_param_scale_moves_to_the_transform_and_so_has_no_effect(work):
    v1 = PASCAL.replace("layer {", "layers {").replace('type: "WindowData"', "type: WINDOW_DATA")
    with from_prototxt(write(work, v1), "TEST", workers=0)["data"] as loader:
        plain = next(iter(loader))["data"]
    scaled = v1.replace("batch_size: 2", "batch_size: 2 scale: 0.5")
    with from_prototxt(write(work, scaled), "TEST", workers=0)["data"] as loader:
        np.testing.assert_array_equal(next(iter(loader))["data"], plain)


@pytest.mark.parametrize("params, field", [
    ("data_param", "scale"), ("data_param", "mean_file"), ("data_param", "crop_size"), ("data_param", "mirror"),
    ("window_data_param", "mirror"), ("window_data_param", "crop_size"),
])
def test_legacy_fields_of_a_layer_net_are_ignored_as_caffe_does_and_said(work, caplog, params, field):
    value = {"scale": "0.5", "mean_file": '"mean.binaryproto"', "crop_size": "4", "mirror": "true"}[field]
    if params == "data_param":
        text = CAFFENET.replace("batch_size: 3 backend: LMDB", f"batch_size: 3 backend: LMDB {field}: {value}")
        plain = CAFFENET
    else:
        text, plain = PASCAL.replace("batch_size: 2", f"batch_size: 2 {field}: {value}"), PASCAL
    with caplog.at_level(logging.INFO, "agnostic_prefetch.caffe"):
        with from_prototxt(write(work, text), "TEST", workers=0)["data"] as loader:
            got = next(iter(loader))["data"]
    assert f"{params}.{field} has no effect in Caffe's layers" in caplog.text
    with from_prototxt(write(work, plain, "plain.prototxt"), "TEST", workers=0)["data"] as loader:
        np.testing.assert_array_equal(got, next(iter(loader))["data"])


def test_uint8_output_of_window_data_depends_on_its_own_scale(work):
    whole = PASCAL.replace(" mean_value: 104 mean_value: 117 mean_value: 123", " scale: 0.5")
    with from_prototxt(write(work, whole), "TEST", workers=0, dtype=np.uint8)["data"] as loader:
        assert next(iter(loader))["data"].dtype == np.uint8
    fractional = whole.replace("batch_size: 2", "batch_size: 2 scale: 0.5")
    with pytest.raises(ValueError, match="dtype=uint8 needs no mean and scale 1"):
        from_prototxt(write(work, fractional), "TEST", workers=0, dtype=np.uint8)


def data_layer(name="data", tops=("data", "label"), transform="crop_size: 8", batch="batch_size: 3", source="train_lmdb"):
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    return (f'layer {{ name: "{name}" type: "Data" {top_lines} include {{ phase: TEST }}\n'
            f'  transform_param {{ {transform} }}\n  data_param {{ source: "{source}" {batch} backend: LMDB }} }}\n')


SECOND = data_layer("data_b", ("data_b", "label_b"), transform="crop_size: 50")
FAILURES = {  # how a construction fails: (net text, loader options, what it raises)
    "a missing mean file": (data_layer(transform='mean_file: "missing.binaryproto"'), {}, FileNotFoundError),
    "a malformed mean file": (data_layer(transform='mean_file: "garbage.binaryproto"'), {}, ValueError),
    "a crop larger than the images": (data_layer(transform="crop_size: 50"), {}, LoaderError),
    "mean values for two channels": (data_layer(transform="mean_value: 1 mean_value: 2"), {}, LoaderError),
    "batch_size 0": (data_layer(batch="batch_size: 0"), {}, ValueError),
    "a bad loader option": (data_layer(), {"workers": -3}, ValueError),
    "uint8 with a mean": (data_layer(transform="mean_value: 1"), {"dtype": np.uint8}, ValueError),
    "a second layer after the first was built": (data_layer() + SECOND, {}, LoaderError),
    "a second layer after the first one's threads read": (data_layer() + SECOND, {"workers": 2, "backend": "thread"},
                                                          LoaderError),
    "a second layer after the first one's processes started": (data_layer() + SECOND, {"workers": 1}, LoaderError),
    "two layers producing one top": (data_layer() + data_layer("data_b", ("data", "label_b")), {}, ValueError),
    "two layers of one name": (data_layer() + data_layer(tops=("data_b", "label_b")), {}, ValueError),
    "a bad loader option after the database was opened": (data_layer(), {"shapes": "ragged"}, ValueError),
}


@pytest.mark.parametrize("how", FAILURES)
def test_a_failed_construction_lets_go_of_the_database_so_the_caller_may_open_it(work, how):
    import lmdb

    from agnostic_prefetch.caffe import write_array_records

    text, options, error = FAILURES[how]
    (work / "garbage.binaryproto").write_bytes(b"\x01\x02 not a BlobProto")
    write_array_records(work / "mixed_lmdb", [{"image": np.zeros((4, 4, 3), np.uint8)},
                                              {"image": np.zeros((5, 4, 3), np.uint8)}])
    with pytest.raises(error) as failure:  # kept, as a notebook keeps its last traceback
        from_prototxt(write(work, text), "TEST", **{"workers": 0, **options})
    for database in ("train_lmdb", "mixed_lmdb"):
        lmdb.open(str(work / database), readonly=True, lock=False).close()  # py-lmdb: "already open" if held
    assert failure.traceback  # alive until here: the release did not wait for the collector


def test_two_data_layers_of_one_name_in_a_phase_are_refused_naming_both(work):
    text = data_layer() + data_layer(tops=("data_b", "label_b"))
    with pytest.raises(ValueError, match=r"\(line 4\): the phase already includes a data layer named 'data' \(layer 'data' at line 1\)"):
        from_prototxt(write(work, text), "TEST", workers=0)


def test_two_data_layers_producing_one_top_are_refused_as_caffe_refuses_them(work):
    text = data_layer() + data_layer("data_b", ("data", "label_b"))
    with pytest.raises(ValueError, match=r"layer 'data_b' \(line 4\): top 'data' is also produced by layer 'data' "
                                         r"at line 1, which Caffe refuses"):
        from_prototxt(write(work, text), "TEST", workers=0)
