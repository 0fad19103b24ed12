"""ArraySource: a map-style source over a dict of equally long arrays (memmaps stay on disk)."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np


class ArraySource:
    """Records ``{key: array[i]}`` from a dict of arrays that share their first dimension.

    Arrays opened with ``np.load(path, mmap_mode="r")`` or ``np.memmap`` are not copied into
    the workers: they travel as (file, offset, dtype, shape) and are mapped again there, so
    a file larger than memory works and costs each worker only the pages it touches. Other
    arrays are pickled into each worker (fine for small data; use a memmap for big data).

    Args:
        arrays: a dict of arrays (or a single array, yielded as the record itself).

    Raises:
        ValueError: the arrays disagree on their length, naming each key's length.

    Example:
        >>> import numpy as np
        >>> src = ArraySource({"x": np.zeros((4, 2)), "y": np.arange(4)})
        >>> len(src), src[3]["y"]
        (4, np.int64(3))
    """

    thread_safe = True  # reads only: workers="auto" may run it in threads

    def __init__(self, arrays: dict[str, np.ndarray] | np.ndarray) -> None:
        self._single = not isinstance(arrays, dict)
        self._arrays = {"": arrays} if self._single else dict(arrays)
        if not self._arrays:
            raise ValueError("ArraySource needs at least one array")
        lengths = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in self._arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(
                f"ArraySource arrays must share their first dimension; got lengths {lengths}. "
                "Give every key one entry per record."
            )
        self._len = int(next(iter(lengths.values())))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        if self._single:
            return self._arrays[""][index]
        return {k: v[index] for k, v in self._arrays.items()}

    def __getstate__(self) -> dict[str, Any]:
        arrays = {k: _reopenable(v) or v for k, v in self._arrays.items()}
        return {"single": self._single, "arrays": arrays, "len": self._len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._single, self._len = state["single"], state["len"]
        self._arrays = {
            k: (np.memmap(v[1], dtype=v[2], mode="r", offset=v[3], shape=v[4], order=v[5])
                if isinstance(v, tuple) else v)
            for k, v in state["arrays"].items()
        }

    def __repr__(self) -> str:
        parts = ", ".join(f"{k or 'array'}: {v.dtype}{list(v.shape)}{' (memmap)' if isinstance(v, np.memmap) else ''}"
                          for k, v in self._arrays.items())
        return f"ArraySource({self._len} records; {parts})"


def _reopenable(a: Any) -> tuple | None:
    """A memmap's description if it is a whole mapping of a file (not a view of one)."""
    if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename:
        order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
        return ("memmap", a.filename, a.dtype, a.offset, a.shape, order)
    return None
