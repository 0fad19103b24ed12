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
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fuzz_seeds as seeds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agnostic_prefetch.caffe import _net_text, prototxt
from agnostic_prefetch.caffe._datum import decode_blobproto, decode_datum
from agnostic_prefetch.caffe._protowire import WireError
from agnostic_prefetch.caffe.image_list import ImageListError, parse_image_list
from agnostic_prefetch.caffe.window import WindowFileError, parse_window_file
from agnostic_prefetch.sources._tar_index import TarFormatError, scan_tar
from agnostic_prefetch.sources._tf_example import ExampleParseError, parse_example
from agnostic_prefetch.sources.images import ImageDecodeError, ImageTooLargeError, decode_image
from agnostic_prefetch.sources.packed_arrays import RecordError, decode_record
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


def fuzz(parser: Parser, examples: int) -> None:
    parser.seeds()  # built (and cached) before hypothesis draws from them
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
