"""Invariants of scalar leaves over random dtypes and values: a delivered value is the
record's number (a float leaf: rounded to its precision), or the loader refuses the record."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sources_for_tests import Records

import agnostic_prefetch as ap

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMPY = [np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                               np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)]
try:
    import ml_dtypes

    ML = [np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)]
except ImportError:
    ML = []
PYTHON = [bool, int, float]  # laid out as bool, int64, float64


def kind(t) -> str:
    """'b', 'i' (signed or unsigned) or 'f' for a Python type or a numpy dtype."""
    if isinstance(t, type):  # not `t in PYTHON`: np.dtype(bool) == bool
        return {bool: "b", int: "i", float: "f"}[t]
    return {"b": "b", "i": "i", "u": "i", "f": "f", "V": "f"}[t.kind]  # V: ml_dtypes' floats


def has_inf(leaf: np.dtype) -> bool:
    return not leaf.name.endswith("fn")  # ml_dtypes' "fn": finite and nan, no inf


@st.composite
def scalars(draw, t):
    """A value of type or dtype ``t``, as (the value a record holds, its number)."""
    if t is bool or kind(t) == "b":
        b = draw(st.booleans())
        return (b if t is bool else np.bool_(b)), b
    if t is int:
        n = draw(st.one_of(st.integers(-3, 300), st.integers(-(2**65), 2**65)))
        return n, n
    if t is float:
        x = draw(st.one_of(st.floats(-300, 300), st.floats()))
        return x, x
    if kind(t) == "i":
        info = np.iinfo(t)
        n = draw(st.one_of(st.integers(max(info.min, -3), min(info.max, 300)),
                           st.integers(int(info.min), int(info.max))))
        return t.type(n), n
    width = min(64, max(32, 8 * t.itemsize) if t.kind == "V" else 8 * t.itemsize)
    with np.errstate(over="ignore"):  # a draw into float16 may become inf: that is the value
        value = t.type(draw(st.one_of(st.floats(-300, 300, width=width), st.floats(width=width))))
    return value, float(value)


def leaf_dtype(t) -> np.dtype:
    return np.dtype({bool: np.bool_, int: np.int64, float: np.float64}[t]) if isinstance(t, type) else t


def fits(number, number_kind: str, leaf: np.dtype) -> bool:
    """The documented rule, in exact arithmetic: integers in range, floats within the range."""
    leaf_kind = kind(leaf)
    if "bif".index(number_kind) > "bif".index(leaf_kind):
        return False
    if number_kind != "f" and not -(2**63) <= int(number) < 2**64:
        return False  # a Python int numpy has no dtype for
    if leaf_kind in "bi":
        info = np.iinfo(leaf) if leaf_kind == "i" else None
        return info is None or info.min <= int(number) <= info.max
    if math.isnan(number):
        return True
    if math.isinf(number):
        return has_inf(leaf)
    return abs(Fraction(number)) <= Fraction(float(np.finfo(leaf).max))


def arrived_as(delivered, number, leaf: np.dtype) -> bool:
    """Whether a delivered item is the record's number (a float leaf: rounded to nearest)."""
    if kind(leaf) in "bi":
        return int(delivered) == int(number)
    d = float(delivered)
    if math.isnan(number) or math.isinf(number):
        return d == number or (math.isnan(d) and math.isnan(number))
    info = np.finfo(leaf)
    error = abs(Fraction(d) - Fraction(number))
    return math.isfinite(d) and error <= Fraction(float(info.eps)) * abs(Fraction(number)) + Fraction(
        float(info.smallest_subnormal))


def dtypes_and_values(types):
    @st.composite
    def draw_case(draw):
        leaf_type = draw(st.sampled_from(types))
        first = draw(scalars(leaf_type))
        rest = draw(st.lists(st.sampled_from(types).flatmap(
            lambda t: scalars(t).map(lambda v: (*v, kind(t)))), min_size=1, max_size=6))
        return leaf_type, first, rest
    return draw_case()


def check_delivered_or_refused(leaf_type, first, rest, batch_size, workers=0):
    leaf = leaf_dtype(leaf_type)
    records = [{"v": first[0]}] + [{"v": value} for value, _, _ in rest]
    numbers = [first[1]] + [number for _, number, _ in rest]
    ok = [True] + [fits(number, k, leaf) for _, number, k in rest]
    try:
        with ap.Loader(Records(records), batch_size, workers=workers) as loader:
            got = [row for batch in loader for row in batch["v"]]
            dtypes = {batch["v"].dtype for batch in loader}
    except ap.WorkerError as error:
        assert isinstance(error.__cause__, ap.LayoutError)
        assert not all(ok), f"refused a value the leaf holds: {error}"
        assert f"record {ok.index(False)}:" in str(error.__cause__)
        return
    assert all(ok), f"delivered {got} for {numbers} into {leaf}, some not held"
    assert dtypes <= {leaf}
    for delivered, number in zip(got, numbers, strict=True):
        assert arrived_as(delivered, number, leaf), (delivered, number, leaf)


@SETTINGS
@given(dtypes_and_values(NUMPY + PYTHON + ML), st.integers(1, 4))
def test_every_scalar_arrives_as_the_records_number_or_its_record_is_refused(case, batch_size):
    check_delivered_or_refused(*case, batch_size)


def test_every_scalar_arrives_as_the_records_number_or_its_record_is_refused_in_process_workers():
    workers = 1
    rest = [(np.int8(-5), -5, "i"), (np.uint16(300), 300, "i"), (True, True, "b"),
            (np.float32(1.5), 1.5, "f")]
    check_delivered_or_refused(np.dtype(np.int16), (np.int16(7), 7), rest[:3], 2, workers)
    check_delivered_or_refused(np.dtype(np.int16), (np.int16(7), 7), rest, 2, workers)
    check_delivered_or_refused(np.dtype(np.float16), (np.float16(1), 1.0),
                               [(1e6, 1e6, "f"), (2, 2, "i")], 1, workers)
    if ML:
        bf16 = ML[0]
        check_delivered_or_refused(bf16, (bf16.type(1), 1.0), [(0.1, 0.1, "f"), (3, 3, "i")], 2, workers)
        check_delivered_or_refused(bf16, (bf16.type(1), 1.0), [(1e39, 1e39, "f")], 2, workers)
