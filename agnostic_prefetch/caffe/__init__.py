"""Everything Caffe: Datum LMDBs, image lists, window files, mean files, the transformer, converters.

``LMDBSource`` reads LMDBs of Caffe ``Datum``\\ s (raw or encoded) and of our packed-array records;
``ImageListSource`` and ``WindowSource`` read the lists of Caffe's ImageData and WindowData
layers; ``CaffeTransform`` is Caffe's DataTransformer; ``from_prototxt`` turns a net's data
layers into Loaders; ``convert_imageset``,
``compute_mean`` and ``inspect_db`` are the converter commands. Each loads on first use
(they import lmdb and Pillow), so ``import agnostic_prefetch`` and the workers that never
touch them stay light. The same names are at the top level: ``ap.LMDBSource``, ...

Example:
    >>> from agnostic_prefetch.caffe import CaffeTransform
    >>> CaffeTransform(crop_size=2, mirror=False).crop_size
    2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agnostic_prefetch._lazy import attach

if TYPE_CHECKING:
    from agnostic_prefetch.caffe.convert import compute_mean, convert_imageset, inspect_db
    from agnostic_prefetch.caffe.image_list import ImageListSource
    from agnostic_prefetch.caffe.lmdb import LMDBSource, write_array_records
    from agnostic_prefetch.caffe.prototxt import from_prototxt
    from agnostic_prefetch.caffe.transform import CaffeTransform
    from agnostic_prefetch.caffe.window import WindowSource

_LAZY = {
    "CaffeTransform": "agnostic_prefetch.caffe.transform",
    "ImageListSource": "agnostic_prefetch.caffe.image_list",
    "LMDBSource": "agnostic_prefetch.caffe.lmdb",
    "WindowSource": "agnostic_prefetch.caffe.window",
    "compute_mean": "agnostic_prefetch.caffe.convert",
    "from_prototxt": "agnostic_prefetch.caffe.prototxt",
    "convert_imageset": "agnostic_prefetch.caffe.convert",
    "inspect_db": "agnostic_prefetch.caffe.convert",
    "write_array_records": "agnostic_prefetch.caffe.lmdb",
}

__all__ = [
    "CaffeTransform",
    "ImageListSource",
    "LMDBSource",
    "WindowSource",
    "compute_mean",
    "convert_imageset",
    "from_prototxt",
    "inspect_db",
    "write_array_records",
]


__getattr__, __dir__ = attach(__name__, _LAZY, __all__)
