"""WindowSource: Caffe WindowData rules — window file, fg/bg split, batch draws, and window geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agnostic_prefetch.caffe._resize import resize_bilinear
from agnostic_prefetch.caffe.window import (
    WindowFileError,
    WindowSource,
    _c_round,
    parse_window_file,
)


def gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], axis=2).astype(np.uint8)


def write_windows(tmp_path, images: list[np.ndarray], windows: list[list[tuple]]) -> str:
    lines = []
    for i, (img, wins) in enumerate(zip(images, windows, strict=True)):
        name = f"img{i}.png"
        Image.fromarray(img).save(tmp_path / name)
        lines += [f"# {i}", name, "3", str(img.shape[0]), str(img.shape[1]), str(len(wins))]
        lines += [" ".join(str(v) for v in win) for win in wins]
    (tmp_path / "windows.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "windows.txt")


@pytest.fixture
def mixed(tmp_path):
    """Image 0: two foreground, one in-between, two background windows."""
    wins = [(1, 0.9, 2, 2, 11, 11), (2, 0.5, 0, 0, 19, 9), (3, 0.4, 1, 1, 5, 5), (1, 0.1, 5, 5, 15, 15), (0, 0.0, 0, 10, 9, 19)]
    path = write_windows(tmp_path, [gradient(20, 20)], [wins])
    return path, str(tmp_path) + "/"


def test_c_round_sends_halves_away_from_zero():
    assert [_c_round(v) for v in (2.5, -2.5, 0.5, -0.5, 1.4999, np.float32(0.49999997))] == [3, -3, 1, -1, 1, 0]


def test_windows_split_by_thresholds_and_middle_ones_are_unused(mixed):
    path, root = mixed
    source = WindowSource(path, root_folder=root, crop_size=8, fg_threshold=0.5, bg_threshold=0.3)
    assert (source.num_fg, source.num_bg, len(source)) == (2, 2, 4)  # overlap 0.4 is neither
    items = [source[2 * w] for w in range(4)]
    assert [int(it["label"]) for it in items] == [1, 2, 0, 0]
    assert [float(it["overlap"]) for it in items] == [pytest.approx(0.9), 0.5, 0.0, 0.0]  # background overlap forced to 0
    assert items[0]["box"].tolist() == [2, 2, 11, 11] and items[0]["box"].dtype == np.int32


def test_batches_hold_the_foreground_share_spread_evenly(mixed):
    path, root = mixed
    source = WindowSource(path, root_folder=root, crop_size=8, fg_fraction=0.25, mirror=True)
    batches = source.batch_order(seed=1, epoch=0, batch_size=8)
    assert len(batches) == 1 and len(batches[0]) == 8  # ceil(5 / 8) batches of full draws
    is_fg = np.asarray(batches[0]) // 2 < source.num_fg
    assert is_fg.tolist() == [False, False, False, True, False, False, False, True]  # int(8 * 0.25) = 2
    assert len(source.batch_order(seed=1, epoch=0, batch_size=3)) == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 64), st.floats(0.0, 1.0), st.data())
def test_every_slice_of_a_global_batch_keeps_the_foreground_share_to_within_one_window(mixed, g, fraction, data):
    path, root = mixed
    source = WindowSource(path, root_folder=root, crop_size=8, fg_fraction=fraction)
    num_fg = int(np.float32(g) * np.float32(fraction))  # Caffe's split, in float32
    batch = source.batch_order(seed=2, epoch=0, batch_size=g)[0]
    is_fg = np.asarray(batch) // 2 < source.num_fg
    assert is_fg.sum() == num_fg
    count = data.draw(st.sampled_from([d for d in range(1, g + 1) if g % d == 0]))
    for part in is_fg.reshape(count, -1):  # the slices of `count` shards
        assert abs(part.sum() - len(part) * num_fg / g) < 1


def test_draws_are_a_pure_function_of_seed_epoch_batch(mixed):
    path, root = mixed
    source = WindowSource(path, root_folder=root, crop_size=8, mirror=True)
    a = source.batch_order(seed=4, epoch=2, batch_size=2)
    b = WindowSource(path, root_folder=root, crop_size=8, mirror=True).batch_order(seed=4, epoch=2, batch_size=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    epochs = {tuple(np.concatenate(source.batch_order(seed=4, epoch=e, batch_size=2)).tolist()) for e in range(10)}
    assert len(epochs) > 1


def test_flips_only_with_mirror_and_about_half_then(mixed):
    path, root = mixed
    plain = WindowSource(path, root_folder=root, crop_size=8)
    assert all((b % 2 == 0).all() for e in range(5) for b in plain.batch_order(seed=0, epoch=e, batch_size=100))
    mirrored = WindowSource(path, root_folder=root, crop_size=8, mirror=True)
    flips = np.concatenate(mirrored.batch_order(seed=0, epoch=0, batch_size=1000)) % 2
    assert 400 < flips.sum() < 600


def test_warp_without_context_cuts_the_box_and_resizes_it(mixed):
    path, root = mixed
    img = gradient(20, 20)
    source = WindowSource(path, root_folder=root, crop_size=10)
    np.testing.assert_array_equal(source[0]["image"], img[2:12, 2:12].astype(np.float32))  # 10×10 box, no resize
    np.testing.assert_array_equal(source[1]["image"], img[2:12, 2:12][:, ::-1].astype(np.float32))  # odd index: flipped
    wide = source[2]["image"]  # box 20×10 warped to 10×10
    np.testing.assert_array_equal(wide, resize_bilinear(img[0:10, 0:20], 10, 10).astype(np.float32))


def test_context_padding_outside_the_image_stays_zero_after_mean_and_scale(tmp_path):
    img = np.full((20, 20, 3), 200, np.uint8)
    path = write_windows(tmp_path, [img], [[(1, 1.0, 0, 0, 9, 9)]])
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=20, context_pad=5, mean=(50.0, 60.0, 70.0), scale=0.5, fg_fraction=1.0)
    # context_scale 2: box -> x, y in [-5, 15]; 21 wide unclipped, 5 clipped on the left/top;
    # at scale 20/21 that is round(4.76) = 5 pixels of padding and round(15.24) = 15 of image
    out = source[0]["image"]
    assert (out[:5] == 0).all() and (out[:, :5] == 0).all()
    np.testing.assert_allclose(out[5:, 5:], np.broadcast_to((np.float32([200, 200, 200]) - [50, 60, 70]) * 0.5, (15, 15, 3)))
    flipped = source[1]["image"]  # the padding is mirrored too: now on the right
    assert (flipped[:5] == 0).all() and (flipped[:, 15:] == 0).all() and (flipped[5:, :15] != 0).all()


def test_context_rounding_is_c_round_half_away_from_zero(tmp_path):
    img = gradient(20, 20)
    path = write_windows(tmp_path, [img], [[(1, 1.0, 5, 5, 9, 9)]])
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=16, context_pad=4, fg_fraction=1.0)
    # scale 16 / 8 = 2 (exact): 5 + 2.5 -/+ 5 = 2.5 and 12.5 -> 3 and 13 (Python's round: 2 and 12)
    np.testing.assert_array_equal(source[0]["image"], resize_bilinear(img[3:14, 3:14], 16, 16).astype(np.float32))


def test_square_mode_makes_the_box_square_around_its_centre(tmp_path):
    img = gradient(40, 40)
    path = write_windows(tmp_path, [img], [[(1, 1.0, 18, 15, 21, 24)]])  # 4 wide, 10 tall
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=10, crop_mode="square", fg_fraction=1.0)
    # half 5 around centre (20, 20): [15, 25] both ways, 11×11 warped to 10×10
    np.testing.assert_array_equal(source[0]["image"], resize_bilinear(img[15:26, 15:26], 10, 10).astype(np.float32))


def test_mean_image_is_taken_from_its_centre(tmp_path):
    img = gradient(20, 20)
    path = write_windows(tmp_path, [img], [[(1, 1.0, 0, 0, 9, 9)]])
    mean = np.random.default_rng(0).uniform(0, 255, (14, 14, 3)).astype(np.float32)
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=10, mean=mean, fg_fraction=1.0)
    np.testing.assert_allclose(source[0]["image"], img[:10, :10] - mean[2:12, 2:12], atol=1e-4)


def test_a_mean_that_is_not_square_is_offset_by_the_widths_margin_as_caffe_does(tmp_path):
    img = gradient(20, 20)
    path = write_windows(tmp_path, [img], [[(1, 1.0, 0, 0, 9, 9)]])
    mean = np.random.default_rng(1).uniform(0, 255, (14, 18, 3)).astype(np.float32)  # margin (18 - 10) / 2 = 4
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=10, mean=mean, fg_fraction=1.0)
    np.testing.assert_allclose(source[0]["image"], img[:10, :10] - mean[4:14, 4:14], atol=1e-4)


def test_a_mean_that_caffe_would_read_past_the_end_of_is_refused_naming_the_rows(tmp_path):
    path = write_windows(tmp_path, [gradient(20, 20)], [[(1, 1.0, 0, 0, 9, 9)]])
    mean = np.zeros((12, 20, 3), np.float32)  # rows 5..14 of a mean 12 tall
    with pytest.raises(ValueError, match=r"12×20: Caffe's WindowData reads its rows 5\.\.14.*at least 15 tall"):
        WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=10, mean=mean)


def test_bgr_channel_order(mixed):
    path, root = mixed
    rgb = WindowSource(path, root_folder=root, crop_size=10)[0]["image"]
    bgr = WindowSource(path, root_folder=root, crop_size=10, channel_order="bgr")[0]["image"]
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("# 0\na.png\n3\n20\n20\n1\n1 0.9 0 0 5\n", 7, "file ends"),
        ("# 1\na.png\n3\n20\n20\n0\n", 1, "expected 0"),
        ("# 0\na.png\n3\n20\n20\n1\n1 0.9 0 0 20 5\n", 7, "not inside image"),
        ("# 0\na.png\n3\n20\n20\n1\n1 high 0 0 5 5\n", 7, "overlap must be float"),
        ("# 0\na.png\n3\n20\n20\n0\n% 1\n", 7, "expected '# image_index'"),
    ],
)
def test_malformed_window_file_names_file_and_line(text, line, message):
    with pytest.raises(WindowFileError, match=rf"w.txt, line {line}: .*{message}"):
        parse_window_file(text, name="w.txt")


def test_foreground_class_must_be_positive(tmp_path):
    path = write_windows(tmp_path, [gradient(10, 10)], [[(0, 0.9, 0, 0, 5, 5)]])
    with pytest.raises(WindowFileError, match="must be > 0"):
        WindowSource(path, root_folder=str(tmp_path) + "/")


def test_batches_needing_missing_windows_are_refused(tmp_path):
    path = write_windows(tmp_path, [gradient(10, 10)], [[(1, 0.9, 0, 0, 5, 5)]])
    source = WindowSource(path, root_folder=str(tmp_path) + "/", crop_size=4)
    with pytest.raises(ValueError, match="background windows"):
        source.batch_order(seed=0, epoch=0, batch_size=4)


def test_loader_delivers_the_sources_own_batches(mixed):
    from agnostic_prefetch.loader import Loader

    path, root = mixed
    source = WindowSource(path, root_folder=root, crop_size=8, mirror=True)
    expected = source.batch_order(seed=7, epoch=0, batch_size=4)
    with Loader(source, batch_size=4, workers=2, seed=7) as loader:
        batches = [{k: np.array(v) for k, v in b.items()} for b in loader]
    assert len(batches) == len(expected) == 2  # ceil(5 windows / 4)
    for batch, indices in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(batch["image"], np.stack([source[int(i)]["image"] for i in indices]))
        np.testing.assert_array_equal(batch["label"], [source[int(i)]["label"] for i in indices])


def test_batch_order_refuses_a_negative_seed_naming_it(mixed):
    path, root = mixed
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer.*got -1.*seed % 2\*\*32"):
        WindowSource(path, root_folder=root, crop_size=8).batch_order(seed=-1, epoch=0, batch_size=2)
