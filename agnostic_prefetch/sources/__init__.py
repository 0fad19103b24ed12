"""Map-style sources: arrays, and Caffe's LMDB cursor, image list and window sampler.

The Caffe sources import Pillow and lmdb; they load on first use so that a worker (or a
program) that never touches them does not pay for those imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agnostic_prefetch.sources.array import ArraySource

if TYPE_CHECKING:
    from agnostic_prefetch.sources.image_list import ImageListSource
    from agnostic_prefetch.sources.lmdb import LMDBSource, write_array_records
    from agnostic_prefetch.sources.window import WindowSource

_LAZY = {
    "ImageListSource": "agnostic_prefetch.sources.image_list",
    "LMDBSource": "agnostic_prefetch.sources.lmdb",
    "write_array_records": "agnostic_prefetch.sources.lmdb",
    "WindowSource": "agnostic_prefetch.sources.window",
}

__all__ = ["ArraySource", "ImageListSource", "LMDBSource", "WindowSource", "write_array_records"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
