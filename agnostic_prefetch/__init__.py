"""agnostic_prefetch: a shared-memory ring loader that keeps accelerators fed.

Loader processes decode and batch data straight into a shared-memory ring; the caller gets
numpy views of it (no copy). JAX, PyTorch and CuPy are imported only by the parts that
hand batches to them, never by ``import agnostic_prefetch`` nor by a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agnostic_prefetch._lazy import attach
from agnostic_prefetch.errors import (
    LayoutError,
    LoaderError,
    LoaderTimeoutError,
    RingTooLargeError,
    WorkerDiedError,
    WorkerError,
)
from agnostic_prefetch.sources.protocol import BatchOrderSource

if TYPE_CHECKING:
    from agnostic_prefetch.batching import Bucket, Pack, Pad
    from agnostic_prefetch.caffe import CaffeTransform, ImageListSource, LMDBSource, WindowSource
    from agnostic_prefetch.device import prefetch_to_device
    from agnostic_prefetch.diagnosis import Diagnosis, diagnose
    from agnostic_prefetch.loader import Loader, LoaderIterator
    from agnostic_prefetch.prefetch import Prefetcher
    from agnostic_prefetch.sharding import shard_for
    from agnostic_prefetch.sources import ArraySource
    from agnostic_prefetch.sources.arrayrecord import ArrayRecordSource
    from agnostic_prefetch.sources.crops import (
        CenterCropDecode,
        RandomResizedCropDecode,
        decode_box,
    )
    from agnostic_prefetch.sources.huggingface import HuggingFaceSource
    from agnostic_prefetch.sources.imagefolder import ImageFolderSource
    from agnostic_prefetch.sources.images import decode_image
    from agnostic_prefetch.sources.mixture import Mixture
    from agnostic_prefetch.sources.parquet import ParquetSource
    from agnostic_prefetch.sources.tfrecord import TFRecordSource
    from agnostic_prefetch.sources.webdataset import WebDatasetSource
    from agnostic_prefetch.streams import Fetcher, Stream, StreamInfo, stream_info
    from agnostic_prefetch.tracing import trace

__all__ = [
    "ArrayRecordSource",
    "ArraySource",
    "BatchOrderSource",
    "Bucket",
    "CaffeTransform",
    "CenterCropDecode",
    "Diagnosis",
    "Fetcher",
    "HuggingFaceSource",
    "ImageFolderSource",
    "ImageListSource",
    "LMDBSource",
    "WindowSource",
    "LayoutError",
    "Loader",
    "LoaderError",
    "LoaderIterator",
    "LoaderTimeoutError",
    "Mixture",
    "Pack",
    "Pad",
    "ParquetSource",
    "RingTooLargeError",
    "Stream",
    "StreamInfo",
    "TFRecordSource",
    "WebDatasetSource",
    "WorkerDiedError",
    "Prefetcher",
    "RandomResizedCropDecode",
    "WorkerError",
    "decode_box",
    "decode_image",
    "diagnose",
    "prefetch_to_device",
    "shard_for",
    "stream_info",
    "trace",
]
__version__ = "0.1.0"

# Imported on first use: a worker process imports this package too, and needs none of
# these (the loader's process management, Pillow, lmdb, JAX): each costs start-up time.
_LAZY = {
    "Loader": "agnostic_prefetch.loader",
    "LoaderIterator": "agnostic_prefetch.loader",
    "Prefetcher": "agnostic_prefetch.prefetch",
    "ArraySource": "agnostic_prefetch.sources",
    "Mixture": "agnostic_prefetch.sources.mixture",
    "decode_image": "agnostic_prefetch.sources.images",
    "decode_box": "agnostic_prefetch.sources.crops",
    "RandomResizedCropDecode": "agnostic_prefetch.sources.crops",
    "CenterCropDecode": "agnostic_prefetch.sources.crops",
    "ArrayRecordSource": "agnostic_prefetch.sources.arrayrecord",
    "ParquetSource": "agnostic_prefetch.sources.parquet",
    "TFRecordSource": "agnostic_prefetch.sources.tfrecord",
    "WebDatasetSource": "agnostic_prefetch.sources.webdataset",
    "ImageFolderSource": "agnostic_prefetch.sources.imagefolder",
    "HuggingFaceSource": "agnostic_prefetch.sources.huggingface",
    "Pad": "agnostic_prefetch.batching",
    "Bucket": "agnostic_prefetch.batching",
    "Pack": "agnostic_prefetch.batching",
    "ImageListSource": "agnostic_prefetch.caffe",
    "LMDBSource": "agnostic_prefetch.caffe",
    "WindowSource": "agnostic_prefetch.caffe",
    "CaffeTransform": "agnostic_prefetch.caffe",
    "prefetch_to_device": "agnostic_prefetch.device",
    "diagnose": "agnostic_prefetch.diagnosis",
    "Diagnosis": "agnostic_prefetch.diagnosis",
    "trace": "agnostic_prefetch.tracing",
    "shard_for": "agnostic_prefetch.sharding",
    "Stream": "agnostic_prefetch.streams",
    "Fetcher": "agnostic_prefetch.streams",
    "StreamInfo": "agnostic_prefetch.streams",
    "stream_info": "agnostic_prefetch.streams",
}


__getattr__, __dir__ = attach(__name__, _LAZY, __all__)
