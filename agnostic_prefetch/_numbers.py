"""Which dtypes are numbers, and which numbers a dtype holds (the check behind a scalar leaf).

Numbers are numpy's bool, integer, float and complex dtypes and ``ml_dtypes``' (bfloat16,
float8_*, int4, ...): these batch into arrays. Structured and raw ``np.void`` dtypes, strings
and objects are not: such leaves travel as lists.

A scalar leaf (shape ``()``: a label, a weight) keeps the dtype it was laid out with; a later
value of another dtype goes in only if the leaf holds it:

* a bool leaf: bools only;
* an integer leaf: a bool or integer value in its range (never a float, even a whole one:
  the leaf's dtype says the data are integers, and a float there is more likely a bug);
* a float leaf: a bool, integer or float value whose magnitude is at most the dtype's
  largest finite value, *rounded* to the dtype's precision as any float arithmetic rounds
  (a label of 0.1 in a float32 leaf is float32(0.1)); inf and nan where the dtype has them.
  A finite value beyond the range (1e6 in float16) is refused, never turned into inf;
* a complex leaf: the same for each part.

Anything else (an integer that would wrap, a negative value in an unsigned leaf, a float in
an integer leaf) is refused by the caller with the record, the value and the remedy.
"""

from __future__ import annotations

import functools
import math

import numpy as np

BOOL, INTEGER, FLOAT, COMPLEX = range(4)  # each holds the kinds before it
_KINDS = {"b": BOOL, "i": INTEGER, "u": INTEGER, "f": FLOAT, "c": COMPLEX}
_NAMES = ("bool", "integer", "float", "complex")


@functools.lru_cache(maxsize=64)  # asked per layout leaf and per value cast into a leaf
def number_kind(dtype: np.dtype) -> int | None:
    """``BOOL``, ``INTEGER``, ``FLOAT`` or ``COMPLEX``; ``None`` for a dtype that is no number.

    ``ml_dtypes``' types (bfloat16, the float8 family, int4) are numbers: numpy gives them
    kind ``"V"`` like a structured or raw ``np.void`` dtype, which is none.

    Example:
        >>> import numpy as np
        >>> number_kind(np.dtype(np.uint8)) == INTEGER, number_kind(np.dtype([("a", "i4")]))
        (True, None)
    """
    if dtype.kind != "V":
        return _KINDS.get(dtype.kind)
    if issubclass(dtype.type, np.void):
        return None  # structured, raw bytes or a subarray: no one number
    try:
        np.finfo(dtype)  # ml_dtypes registers its floats with finfo
    except ValueError:
        return INTEGER
    return FLOAT


@functools.lru_cache(maxsize=64)  # asked per value cast into a float leaf
def _largest(dtype: np.dtype) -> float:
    """The largest finite magnitude of a float or complex dtype (of each part of a complex)."""
    info = np.finfo(dtype)
    return math.inf if info.bits > 64 else float(info.max)  # a long double holds any float64


def holds(a: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the 0-d array ``a`` stored as ``dtype`` keeps its number (floats: rounded).

    Example:
        >>> import numpy as np
        >>> holds(np.asarray(200), np.dtype(np.uint8)), holds(np.asarray(-1), np.dtype(np.uint8))
        (True, False)
        >>> holds(np.asarray(0.1), np.dtype(np.float32)), holds(np.asarray(1e6), np.dtype(np.float16))
        (True, False)
    """
    leaf, value = number_kind(dtype), number_kind(a.dtype)
    if leaf is None or value is None or value > leaf:
        return False
    if leaf <= INTEGER:
        # The cast wraps silently; a value that survives the round trip fits.
        return int(a.astype(dtype)) == int(a)
    largest = _largest(dtype)
    for part in (a.real, a.imag) if value == COMPLEX else (a,):
        if value <= INTEGER:
            if abs(int(part)) > largest:  # int against float compares exactly in Python
                return False
        elif np.isfinite(part):
            if abs(float(part)) > largest:
                return False
        elif leaf == FLOAT:
            # inf or nan: kept only where the dtype has it (float8_e4m3fn has no inf).
            x, stored = float(part), float(part.astype(dtype))
            if not (stored == x or (math.isnan(x) and math.isnan(stored))):
                return False
    return True


def why_not_held(a: np.ndarray, dtype: np.dtype) -> str:
    """Why :func:`holds` is false for ``a`` and ``dtype``, in words (for the error)."""
    leaf, value = number_kind(dtype), number_kind(a.dtype)
    if value is None:
        if isinstance(a.item(), int):
            return "a Python int beyond 64 bits has no numpy dtype"
        return f"a value of dtype {a.dtype} is not a number"
    if leaf is None:
        return f"{dtype} holds no numbers"
    if value > leaf:
        article = "an" if leaf == INTEGER else "a"
        takes = ", ".join(_NAMES[:leaf]) + " and " * (leaf > 0) + _NAMES[leaf]
        return f"{article} {_NAMES[leaf]} leaf takes {takes} values only"
    if leaf <= INTEGER:
        try:
            info = np.iinfo(dtype)
        except ValueError:
            return f"it would arrive as {int(a.astype(dtype))}"
        return f"{dtype} holds {info.min}..{info.max}"
    largest = _largest(dtype)
    parts = (a.real, a.imag) if value == COMPLEX else (a,)
    if any(np.isfinite(p) and abs(float(p)) > largest for p in parts):
        return f"{dtype} holds finite values up to ±{largest:g}"
    return f"{dtype} has no {a.item()}"
