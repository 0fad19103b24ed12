"""Decoding as OpenCV does it for Caffe: a colour JPEG's gray is its Y plane, imread turns a
JPEG by its EXIF orientation (imdecode does not), native channels as IMREAD_UNCHANGED."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from agnostic_prefetch.sources import images
from agnostic_prefetch.sources.images import decode_image, load_image, probe_image

cv2 = pytest.importorskip("cv2")


def jpeg(array, quality=90, subsampling=2, exif=None):
    out = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(array).save(out, format="JPEG", quality=quality, subsampling=subsampling, **kwargs)
    return out.getvalue()


def cv_decode(data, flags):
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def photos():
    data = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(0)
    return [data.astronaut()[:200, :300], data.coffee()[:, :333], data.chelsea(),
            rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)]


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request, monkeypatch):
    if request.param == "pillow":
        monkeypatch.setattr(images, "_simplejpeg", None)
    elif images.jpeg_decoder() == "pillow":
        pytest.skip("simplejpeg is not importable here")
    return request.param


@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["4:4:4", "4:2:2", "4:2:0"])
@pytest.mark.parametrize("quality", [75, 95])
def test_gray_from_a_colour_jpeg_is_the_y_plane_as_opencv_reads_it(decoder, subsampling, quality):
    for photo in photos():
        data = jpeg(photo, quality, subsampling)
        got = decode_image(data, name="photo", color=False)
        np.testing.assert_array_equal(got[:, :, 0], cv_decode(data, cv2.IMREAD_GRAYSCALE))


def test_colour_from_a_jpeg_equals_opencv(decoder):
    for photo in photos():
        data = jpeg(photo)
        np.testing.assert_array_equal(decode_image(data, name="photo", color=True),
                                      cv_decode(data, cv2.IMREAD_COLOR)[:, :, ::-1])


def exif_with(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_imread_turns_a_jpeg_by_its_exif_orientation_and_imdecode_does_not(tmp_path, decoder, orientation):
    photo = photos()[3]
    data = jpeg(photo, exif=exif_with(orientation))
    path = tmp_path / "turned.jpg"
    path.write_bytes(data)
    for color, flag in ((True, cv2.IMREAD_COLOR), (False, cv2.IMREAD_GRAYSCALE)):
        want = cv2.imread(str(path), flag)
        want = want[:, :, ::-1] if color else want[:, :, None]
        np.testing.assert_array_equal(load_image(str(path), color=color), want)
        stored = cv_decode(data, flag | cv2.IMREAD_IGNORE_ORIENTATION)
        stored = stored[:, :, ::-1] if color else stored[:, :, None]
        np.testing.assert_array_equal(decode_image(data, name="datum", color=color), stored)


def png(image, **kwargs):
    out = io.BytesIO()
    image.save(out, format="PNG", **kwargs)
    return out.getvalue()


def test_native_channels_are_opencvs_imread_unchanged():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    cases = {
        "RGB": png(Image.fromarray(rgb)),
        "RGBA": png(Image.fromarray(np.dstack([rgb, rgb[:, :, 0]]), "RGBA")),
        "LA": png(Image.fromarray(rgb[:, :, :2].copy(), "LA")),
        "P": png(palette),
        "P with transparency": png(palette, transparency=2),
        "L": png(Image.fromarray(rgb[:, :, 0])),
        "L with transparency": png(Image.fromarray(rgb[:, :, 0]), transparency=7),
    }
    for name, data in cases.items():
        want = cv_decode(data, cv2.IMREAD_UNCHANGED)
        want = want[:, :, None] if want.ndim == 2 else want[:, :, [2, 1, 0, 3][: want.shape[2]]]
        got = decode_image(data, name=name)
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert probe_image(data, name=name) == want.shape, name


def png_with(image, chunks=(), **kwargs):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for kind, body in chunks:
        info.add(kind, body)
    return png(image, pnginfo=info, **kwargs)


GAMMAS = {
    "no chunk": [],
    "gAMA 1/2.2": [(b"gAMA", (45455).to_bytes(4, "big"))],
    "gAMA 1.0": [(b"gAMA", (100000).to_bytes(4, "big"))],
    "gAMA 0.8": [(b"gAMA", (80000).to_bytes(4, "big"))],
    "gAMA 1.04 (within 5 %)": [(b"gAMA", (104000).to_bytes(4, "big"))],
    "sRGB": [(b"sRGB", b"\x00")],
    "sRGB and gAMA 1.0": [(b"sRGB", b"\x00"), (b"gAMA", (100000).to_bytes(4, "big"))],
}


@pytest.mark.parametrize("chunks", list(GAMMAS.values()), ids=list(GAMMAS))
@pytest.mark.parametrize("kind", ["RGB", "RGBA", "P", "P with transparency"])
def test_gray_from_a_colour_png_is_libpngs_integer_conversion(chunks, kind):
    rng = np.random.default_rng(len(chunks) * 7 + len(kind))
    for shape in [(17, 23), (40, 31)]:
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        rgb[0, :5] = rgb[0, :5, :1]  # a few gray pixels (R == G == B)
        if kind == "RGB":
            image, extra = Image.fromarray(rgb), {}
        elif kind == "RGBA":
            image, extra = Image.fromarray(np.dstack([rgb, rgb[:, :, 1]]), "RGBA"), {}
        else:
            image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            extra = {"transparency": 3} if kind.endswith("transparency") else {}
        data = png_with(image, chunks, **extra)
        got = decode_image(data, name=kind, color=False)[:, :, 0]
        np.testing.assert_array_equal(got, cv_decode(data, cv2.IMREAD_GRAYSCALE), err_msg=f"{kind} {shape}")


def with_chunks_after_ihdr(data, chunks):
    """PNG bytes with extra chunks spliced in right after IHDR (before PLTE and IDAT)."""
    import struct
    import zlib

    extra = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                     for kind, body in chunks)
    return data[:33] + extra + data[33:]  # signature (8) + IHDR (25)


@pytest.mark.parametrize("chunks", [*GAMMAS.values(), [(b"sBIT", b"\x0c\x0c\x0c"), (b"gAMA", (45455).to_bytes(4, "big"))]],
                         ids=[*GAMMAS, "sBIT 12 and gAMA 1/2.2"])
@pytest.mark.parametrize("channels", [3, 4])
def test_gray_from_a_16_bit_colour_png_is_libpngs_16_bit_conversion(chunks, channels):
    rng = np.random.default_rng(channels)
    for shape in [(19, 27), (33, 8)]:
        bgr = rng.integers(0, 65536, (*shape, channels), dtype=np.uint16)
        bgr[1, :6, 1:3] = bgr[1, :6, :1]  # gray pixels (R == G == B)
        bgr[2] = bgr[2] // 64 * 64  # runs that make libpng pick every row filter
        ok, encoded = cv2.imencode(".png", bgr)
        data = with_chunks_after_ihdr(encoded.tobytes(), chunks)
        got = decode_image(data, name="16-bit", color=False)[:, :, 0]
        np.testing.assert_array_equal(got, cv_decode(data, cv2.IMREAD_GRAYSCALE), err_msg=f"{shape} {chunks}")
