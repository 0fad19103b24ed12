"""Every parser of bytes from disk that is our code, fed hostile bytes: valid files (fuzz_seeds.py)
mutated by bit flips, truncations, splices, repeats, huge length fields and random bytes.

The properties, per parser: only its documented error types escape (the exact classes:
an IndexError, struct.error, UnicodeDecodeError, OverflowError or a bare numpy ValueError
is a bug); the peak of traced allocations stays under a bound from the input's size; and
no call runs for long (a per-example deadline, and an alarm that stops a loop that never
ends). The default run tries a short form per parser; the long form, minutes per parser:

    AP_FUZZ_LONG=1 python -m pytest -q -m slow tests/test_fuzz_parsers.py

(``AP_FUZZ_EXAMPLES`` sets its examples per parser, 20000 by default).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import tempfile
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fuzz_seeds as seeds
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agnostic_prefetch.caffe import _net_text, _protowire, prototxt
from agnostic_prefetch.caffe._datum import decode_blobproto, decode_datum
from agnostic_prefetch.caffe._protowire import (
    I32,
    WireError,
    encode_key,
    encode_len_field,
    encode_varint,
    encode_varint_field,
)
from agnostic_prefetch.caffe.image_list import ImageListError, parse_image_list
from agnostic_prefetch.caffe.window import WindowFileError, parse_window_file
from agnostic_prefetch.sources._tar_index import TarFormatError, scan_tar
from agnostic_prefetch.sources._tf_example import ExampleParseError, parse_example
from agnostic_prefetch.sources.images import ImageDecodeError, ImageTooLargeError, decode_image
from agnostic_prefetch.sources.packed_arrays import MAGIC, RecordError, decode_record
from agnostic_prefetch.sources.tfrecord import TFRecordError, TFRecordSource

MiB = 1 << 20
SHORT_EXAMPLES = 120
LONG = bool(os.environ.get("AP_FUZZ_LONG"))
LONG_EXAMPLES = int(os.environ.get("AP_FUZZ_EXAMPLES", "20000"))
HANG_S = 20.0  # a call this long is a hang (the deadline below flags merely slow ones)


@dataclass(frozen=True)
class Parser:
    """One parser under fuzzing: how to call it on bytes, what it may raise, its seeds."""

    name: str
    parse: Callable[[bytes], Any]
    errors: tuple[type[BaseException], ...]  # the documented classes, matched exactly
    seeds: Callable[[], tuple[bytes, ...]]
    repair: Callable[[bytes], bytes] | None = None  # checksums made right, to get past them
    bound: Callable[[bytes], int] = lambda data: 64 * len(data) + MiB

    def __repr__(self) -> str:
        return self.name


# -- the parsers, called as their callers call them ----------------------------------------

def _in_file(data: bytes, suffix: str, use: Callable[[str, str], Any]) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"fuzz{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        return use(path, folder)


def _tfrecord(data: bytes) -> Any:
    def read(path: str, folder: str) -> Any:
        source = TFRecordSource(path, index_dir=folder)
        return source.__getitems__(list(range(len(source))))
    return _in_file(data, ".tfrecord", read)


def _prototxt(data: bytes) -> Any:
    def parse(path: str, folder: str) -> Any:
        text = _net_text.read_net_text(path)
        state = (1, 0, frozenset())  # TEST: the seeds' data layers are included, so read strictly
        return [prototxt._data_layer(block, n, path, state) for n, block in enumerate(_net_text.layers_of(text, path))]
    return _in_file(data, ".prototxt", parse)


def _png_bound(data: bytes) -> int:
    """A decoded PNG may hold ~1000× its bytes (zlib's limit); the walker's int64 arrays take
    up to ~200 bytes a pixel: the bound follows the pixels IHDR declares, as Pillow decodes them."""
    pixels = int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big") if len(data) >= 24 else 0
    return 64 * len(data) + MiB + 256 * min(pixels, 1032 * len(data))


PARSERS = [
    Parser("datum", decode_datum, (WireError,), seeds.datum_seeds),
    Parser("blobproto", decode_blobproto, (WireError,), seeds.blobproto_seeds),
    Parser("tf.train.Example", parse_example, (ExampleParseError,), seeds.example_seeds),
    Parser("tfrecord", _tfrecord, (TFRecordError,), seeds.tfrecord_seeds, seeds.repair_tfrecord),
    Parser("png gray", lambda data: decode_image(data, name="fuzz.png", color=False),
           (ImageDecodeError, ImageTooLargeError), seeds.png_seeds, seeds.repair_png, _png_bound),
    Parser("tar index", lambda data: _in_file(data, ".tar", lambda path, _: scan_tar(path)),
           (TarFormatError,), seeds.tar_seeds, seeds.repair_tar),
    Parser("packed arrays", decode_record, (RecordError,), seeds.packed_array_seeds),
    Parser("window file", lambda data: parse_window_file(data.decode("utf-8", "surrogateescape")),
           (WindowFileError,), lambda: seeds.text_seeds(seeds.WINDOW_FILE)),
    Parser("image list", lambda data: parse_image_list(data.decode("utf-8", "surrogateescape")),
           (ImageListError,), lambda: seeds.text_seeds(seeds.IMAGE_LIST)),
    Parser("prototxt", _prototxt, (ValueError,), seeds.prototxt_seeds),
]


# -- hostile bytes -------------------------------------------------------------------------

_HUGE = [b"\xff\xff\xff\xff\x0f", b"\xff" * 9 + b"\x01", b"\x80\x80\x80\x80\x08", b"\xff\xff\xff\xff",
         b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"99999999999",
         b"-1", b"1e400", b"\x80" * 11]  # varints, 32/64-bit fields, numbers as text


@st.composite
def hostile(draw: Any, parser: Parser) -> bytes:
    """A seed of ``parser``, mutated a few times (and maybe its checksums repaired), or noise."""
    pool = parser.seeds()
    if draw(st.integers(0, 15)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "byte", "truncate", "delete", "insert", "splice", "huge", "repeat"]))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[min(at, len(data) - 1)] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x0A]))
        elif op == "truncate":
            del data[at:]
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            other = draw(st.sampled_from(pool))
            start = draw(st.integers(0, len(other)))
            data[at:at + draw(st.integers(0, 64))] = other[start:start + draw(st.integers(1, 256))]
        elif op == "huge":
            value = draw(st.sampled_from(_HUGE))
            data[at:at + (len(value) if draw(st.booleans()) else 0)] = value
        elif op == "repeat":  # many copies of one small piece: how a parser's cost grows
            piece = bytes(data[at:at + draw(st.integers(1, 48))]) or b"\x00"
            data[at:at] = piece * draw(st.sampled_from([2, 10, 100, 2000]))
    if parser.repair is not None and draw(st.booleans()):
        return parser.repair(bytes(data))
    return bytes(data)


class Hang(BaseException):  # not an Exception: no parser's ``except Exception`` may swallow it
    pass


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(parser: Parser, data: bytes) -> None:
    """The three properties for one input: documented errors only, bounded memory, no hang."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        with alarm(HANG_S):
            parser.parse(data)
    except parser.errors as exc:
        assert type(exc) in parser.errors, f"{parser.name} raised {type(exc).__name__}: {exc}"
        assert str(exc), f"{parser.name} raised {type(exc).__name__} with no message"
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak <= parser.bound(data), (
        f"{parser.name} allocated {peak} bytes for {len(data)} bytes of input (bound {parser.bound(data)})")


@contextlib.contextmanager
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def fuzz_warm(parser: Parser) -> None:
    """Seeds built (and cached) before hypothesis draws from them, and the parser called on
    good and bad bytes once: the lazy imports of a first call (Pillow's plugins) are not ours."""
    for data in (*parser.seeds(), b"", bytes(64)):
        with contextlib.suppress(*parser.errors):
            parser.parse(data)


def fuzz(parser: Parser, examples: int) -> None:
    fuzz_warm(parser)
    @settings(max_examples=examples, deadline=timedelta(seconds=5), derandomize=not LONG,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
    @given(data=hostile(parser))
    def run(data: bytes) -> None:
        check(parser, data)

    with traced():
        run()


@pytest.mark.parametrize("parser", PARSERS, ids=repr)
def test_seeds_parse(parser):
    for data in parser.seeds():
        with traced():
            check(parser, data)
        parser.parse(data)  # valid: no error at all


@pytest.mark.parametrize("parser", PARSERS, ids=repr)
def test_hostile_bytes_raise_only_documented_errors_within_memory_and_time(parser):
    fuzz(parser, SHORT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="the long fuzz runs with AP_FUZZ_LONG=1 (see the module docstring)")
@pytest.mark.parametrize("parser", PARSERS, ids=repr)
def test_long_fuzz_hostile_bytes(parser):
    fuzz(parser, LONG_EXAMPLES)


# -- regressions: the inputs that found each bug -------------------------------------------

def _tar_with(field: slice, value: bytes, repair: bool = True) -> bytes:
    data = bytearray(seeds.tar_seeds()[0])
    data[field] = value
    return seeds.repair_tar(bytes(data)) if repair else bytes(data)


def _pax_tar(size: bytes) -> bytes:
    """The pax seed with its ``path=`` record turned into a ``size=`` record of the same length."""
    data = seeds.tar_seeds()[2]
    start = data.index(b" path=") - 3
    length = int(data[start:start + 3])
    record = b"%d size=%s" % (length, size)
    return seeds.repair_tar(data[:start] + record.ljust(length - 1) + b"\n" + data[start + length:])


def _shape(*dims: int) -> bytes:
    return encode_len_field(7, encode_len_field(1, b"".join(encode_varint(d) for d in dims)))


def _record(header: str, payload: bytes = b"") -> bytes:
    return MAGIC + struct.pack("<I", len(header)) + header.encode() + payload


def _field(name: str, shape: str, nbytes: int = 0, offset: int = 0) -> str:
    return f'{{"name":"{name}","dtype":"|u1","shape":{shape},"offset":{offset},"nbytes":{nbytes}}}'


def _example(feature: bytes) -> bytes:
    return encode_len_field(1, encode_len_field(1, encode_len_field(1, b"x") + encode_len_field(2, feature)))


def _png16_bomb() -> bytes:
    """A 1×1 16-bit RGB PNG whose image data inflates to 20 MB (Pillow reads its first row only)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = zlib.compress(b"\0" + b"\x12\x34" * 3 + bytes(20 << 20), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _by_name(name: str) -> Parser:
    return next(p for p in PARSERS if p.name == name)


FOUND = {  # parser, the input, and what escaped (or what it cost) before the fix
    "tar: checksum field no octal number (ValueError)": ("tar index", lambda: _tar_with(slice(148, 156), b"0\x02\x12\x86~T06", False)),
    "tar: size field no octal number, checksum right (ValueError)": ("tar index", lambda: _tar_with(slice(124, 136), b"xxxxxxxxxxx\0")),
    "tar: pax size no number (ValueError)": ("tar index", lambda: _pax_tar(b"6x0")),
    "blobproto: dims past 2**63 with a zero (numpy ValueError)": ("blobproto", lambda: _shape(2**63, 2**63, 0)),
    "blobproto: dims whose int64 product wraps to 0 (numpy ValueError)": ("blobproto", lambda: _shape(2**32, 2**32)),
    "blobproto: negative legacy dims (numpy ValueError)": ("blobproto", lambda: encode_varint_field(1, -1) + encode_varint_field(2, -1)),
    "packed arrays: a dimension of Infinity (OverflowError)": ("packed arrays", lambda: _record(f'{{"fields":[{_field("a", "[Infinity]")}]}}')),
    "packed arrays: a header nested 100000 deep (RecursionError)": ("packed arrays", lambda: _record("[" * 100000 + "]" * 100000)),
    "packed arrays: dims whose int64 product wraps to 0 (numpy ValueError)": ("packed arrays", lambda: _record(f'{{"fields":[{_field("a", "[4294967296,4294967296]")}]}}')),
    "packed arrays: a huge dimension beside a zero (numpy ValueError)": ("packed arrays", lambda: _record(f'{{"fields":[{_field("a", "[1e30,0]")}]}}')),
    "packed arrays: 80 fields over one 1 MiB span (80x the input)": ("packed arrays", lambda: _record(
        '{"fields":[' + ",".join(_field(f"a{i}", "[1048576]", 1 << 20) for i in range(80)) + "]}", bytes(1 << 20))),
    "tf.train.Example: 100000 unpacked int64 values (196x the input)": ("tf.train.Example", lambda: _example(
        encode_len_field(3, (encode_key(1, 0) + encode_varint(1)) * 100000))),
    "png gray: a 16-bit zlib bomb behind a 1x1 image (400x the input)": ("png gray", _png16_bomb),
    "prototxt: blocks nested 5000 deep (RecursionError)": ("prototxt", lambda: b'layer { name: "a" type: "Data" ' + b"p { " * 5000 + b"}" * 5001),
    "prototxt: bytes that are no UTF-8 (UnicodeDecodeError)": ("prototxt", lambda: b'layer { name: "\xff" }'),
    "prototxt: 20000 layers (scanned in quadratic time and memory)": ("prototxt layers", lambda: b'layer { name: "a" type: "Conv" }\n' * 20000),
}
PARSERS_FOR_REGRESSIONS = [*PARSERS, Parser("prototxt layers", lambda data: _net_text.layers_of(data.decode(), "x.prototxt"),
                                            (ValueError,), seeds.prototxt_seeds)]


@pytest.mark.parametrize("case", list(FOUND), ids=list(FOUND))
def test_an_input_that_found_a_bug_raises_only_documented_errors_within_memory_and_time(case):
    name, make = FOUND[case]
    parser = next(p for p in PARSERS_FOR_REGRESSIONS if p.name == name)
    data = make()
    fuzz_warm(parser)
    with traced():
        check(parser, data)


def test_a_datum_of_many_short_float_runs_is_read_in_linear_time(monkeypatch):
    """Each run of unpacked floats looked at every record after it: quadratic in the message."""
    looked = []

    class CountingNumpy:
        def __getattr__(self, name: str) -> Any:
            return getattr(np, name)

        def frombuffer(self, buffer: Any, *args: Any, **kwargs: Any) -> np.ndarray:
            looked.append(len(buffer))
            return np.frombuffer(buffer, *args, **kwargs)

    monkeypatch.setattr(_protowire, "np", CountingNumpy())
    data = (encode_key(6, I32) + bytes(4) + encode_varint_field(5, 1)) * 20000
    assert decode_datum(data).float_data.size == 20000
    assert sum(looked) <= 4 * len(data)


def test_a_double_beyond_float32_in_a_blobproto_becomes_inf_without_a_warning():
    data = _shape(1) + encode_len_field(8, struct.pack("<d", 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_blobproto(data).tolist() == [np.inf]
