"""Generic reading: the map-style source protocol, ``ArraySource``, array records, image decoding.

A source is any object with ``__len__`` and ``__getitem__`` (see
:class:`~agnostic_prefetch.sources.protocol.MapSource`); it is sent to the workers by value
and should open files lazily. Caffe's sources live in :mod:`agnostic_prefetch.caffe`.

Example:
    >>> import numpy as np
    >>> from agnostic_prefetch.sources import ArraySource
    >>> ArraySource({"x": np.arange(3)})[1]["x"].item()
    1
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from agnostic_prefetch.sources.array import ArraySource
from agnostic_prefetch.sources.protocol import BatchOrderSource, MapSource

__all__ = ["ArraySource", "BatchOrderSource", "MapSource"]

# Where these lived in 0.1; the Caffe sources moved to agnostic_prefetch.caffe.
_MOVED = {name: f"agnostic_prefetch.caffe.{module}" for name, module in (
    ("ImageListSource", "image_list"), ("LMDBSource", "lmdb"),
    ("WindowSource", "window"), ("write_array_records", "lmdb"))}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"agnostic_prefetch.sources.{name} moved to agnostic_prefetch.caffe.{name} "
                      f"(also ap.{name})", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
