"""Generic reading: the map-style source protocol, ``ArraySource``, packed-array records, image decoding.

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

from agnostic_prefetch.sources.array import ArraySource
from agnostic_prefetch.sources.protocol import BatchOrderSource, MapSource

__all__ = ["ArraySource", "BatchOrderSource", "MapSource"]
