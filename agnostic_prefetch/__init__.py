"""agnostic_prefetch: a shared-memory ring loader that keeps accelerators fed.

Loader processes decode and batch data straight into a shared-memory ring; the caller gets
numpy views of it (no copy). JAX, PyTorch and CuPy are imported only by the parts that
hand batches to them, never by ``import agnostic_prefetch`` nor by a worker.
"""

from agnostic_prefetch.errors import (
    LayoutError,
    LoaderError,
    LoaderTimeoutError,
    RingTooLargeError,
    WorkerDiedError,
    WorkerError,
)
from agnostic_prefetch.loader import Loader
from agnostic_prefetch.sampler import BatchOrderSource
from agnostic_prefetch.sources import ArraySource

__all__ = [
    "ArraySource",
    "BatchOrderSource",
    "LayoutError",
    "Loader",
    "LoaderError",
    "LoaderTimeoutError",
    "RingTooLargeError",
    "WorkerDiedError",
    "WorkerError",
]
__version__ = "0.1.0"
