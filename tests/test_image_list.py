"""ImageListSource and the Caffe list format: 'path label', the label after the last space."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from agnostic_prefetch.caffe.image_list import ImageListError, ImageListSource, parse_image_list
from agnostic_prefetch.sources.images import ImageDecodeError, ImageTooLargeError

# a path: no line breaks, not blank, no trailing whitespace (a trailing space would be a separator)
paths = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    min_size=1,
    max_size=40,
).filter(lambda p: p.strip() and p == p.rstrip(" \t\r"))
labels = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.tuples(paths, labels), max_size=20), crlf=st.booleans())
def test_formatted_lists_parse_back_to_the_same_entries(entries, crlf):
    newline = "\r\n" if crlf else "\n"
    text = newline.join(f"{p} {label}" for p, label in entries) + newline
    assert parse_image_list(text) == entries


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet="abc./_", min_size=1, max_size=5), min_size=2, max_size=5), label=labels)
def test_the_label_is_after_the_last_space_so_paths_keep_their_spaces(words, label):
    path = " ".join(words)
    assert parse_image_list(f"{path} {label}") == [(path, label)]


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.tuples(paths, labels), max_size=5), bad=st.sampled_from(["nolabel", "a.jpg x", "a.jpg 1.5", " 3", "a.jpg 99999999999"]))
def test_a_malformed_line_is_reported_with_its_line_number(before, bad):
    text = "".join(f"{p} {label}\n" for p, label in before) + bad + "\n"
    with pytest.raises(ImageListError, match=rf"list.txt, line {len(before) + 1}:"):
        parse_image_list(text, name="list.txt")


def test_blank_lines_are_skipped():
    assert parse_image_list("\na.jpg 1\n   \nb.jpg 2\n") == [("a.jpg", 1), ("b.jpg", 2)]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "imgs" / "colour one.png")
    Image.fromarray(gray).save(tmp_path / "imgs" / "gray.png")
    (tmp_path / "list.txt").write_text("colour one.png 3\ngray.png 5\nmissing.png 1\n")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    return tmp_path, colour, gray


def test_yields_rgb_uint8_and_label_with_root_folder_concatenated(folder):
    tmp_path, colour, _ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/")
    item = source[0]
    np.testing.assert_array_equal(item["image"], colour)
    assert item["label"] == 3 and item["label"].dtype == np.int32 and len(source) == 3


def test_is_color_expands_gray_and_is_color_false_gives_one_channel(folder):
    tmp_path, colour, gray = folder
    root = str(tmp_path / "imgs") + "/"
    colour_source = ImageListSource(tmp_path / "list.txt", root_folder=root)
    np.testing.assert_array_equal(colour_source[1]["image"], np.repeat(gray[:, :, None], 3, axis=2))
    gray_source = ImageListSource(tmp_path / "list.txt", root_folder=root, is_color=False)
    np.testing.assert_array_equal(gray_source[1]["image"], gray[:, :, None])
    assert gray_source[0]["image"].shape == (6, 8, 1)


def test_bgr_reverses_channels(folder):
    tmp_path, colour, _ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/", channel_order="bgr")
    np.testing.assert_array_equal(source[0]["image"], colour[:, :, ::-1])


def test_resize_to_new_height_and_width(folder):
    tmp_path, colour, _ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/", new_height=3, new_width=4)
    image = source[0]["image"]
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    # halving both sides with half-pixel centres averages each 2×2 block
    expected = np.floor(colour.reshape(3, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(image, expected)


def test_only_one_of_new_height_new_width_is_an_error(folder):
    with pytest.raises(ValueError, match="both"):
        ImageListSource(folder[0] / "list.txt", new_height=4)


def test_missing_image_names_its_path(folder):
    tmp_path, *_ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        source[2]


def test_undecodable_image_names_its_path(folder):
    tmp_path, *_ = folder
    (tmp_path / "bad.txt").write_text("broken.png 0\n")
    source = ImageListSource(tmp_path / "bad.txt", root_folder=str(tmp_path / "imgs") + "/")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        source[0]


def test_malformed_list_file_names_file_and_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(ImageListError, match=r"list.txt'?, line 2"):
        ImageListSource(tmp_path / "list.txt")


def test_decompression_bomb_warning_becomes_an_error_naming_the_image(folder, monkeypatch):
    tmp_path, *_ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 48 pixels: Pillow would only warn
    with pytest.raises(ImageTooLargeError, match="colour one.png"):
        source[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # above twice the limit: Pillow's own error
    with pytest.raises(ImageTooLargeError, match="colour one.png"):
        source[0]


def test_pickles_small_and_repr_says_what_it_reads(folder):
    import cloudpickle

    tmp_path, *_ = folder
    source = ImageListSource(tmp_path / "list.txt", root_folder="r/")
    assert len(cloudpickle.dumps(source)) < 2000
    assert "images=3" in repr(source) and "list.txt" in repr(source)


def test_loader_skips_a_missing_image_with_on_error_skip(folder, caplog):
    from agnostic_prefetch.loader import Loader

    tmp_path, colour, _ = folder
    (tmp_path / "list2.txt").write_text("colour one.png 3\nmissing.png 1\ngray.png 5\n")
    source = ImageListSource(tmp_path / "list2.txt", root_folder=str(tmp_path / "imgs") + "/")
    with Loader(source, batch_size=3, workers=2, on_error="skip") as loader:
        batches = [{k: np.array(v) for k, v in b.items()} for b in loader]
        assert loader.stats()["skipped"] == 1
    assert batches[0]["label"].tolist() == [3, 5]
    assert "missing.png" in caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_a_crop_larger_than_an_image_names_the_list_line_and_new_height_new_width(folder, workers):
    import agnostic_prefetch as ap
    from agnostic_prefetch.caffe import CaffeTransform

    tmp_path, _, _ = folder
    (tmp_path / "two.txt").write_text("colour one.png 3\ngray.png 5\n")
    source = ImageListSource(tmp_path / "two.txt", root_folder=str(tmp_path / "imgs") + "/")
    with pytest.raises(ap.LoaderError) as info:
        with ap.Loader(source, 2, workers=workers, transform=CaffeTransform(crop_size=7)) as loader:
            list(loader)
    message = str(info.value)
    assert "6×8 is smaller than crop_size=7" in message
    assert f"line 1 of {tmp_path / 'two.txt'}: {tmp_path}/imgs/colour one.png" in message
    assert "ImageListSource(..., new_height=H, new_width=W)" in message and "--resize" not in message
