"""agnostic_prefetch: a shared-memory ring loader that keeps accelerators fed."""

from agnostic_prefetch.sampler import BatchOrderSource

__all__ = ["BatchOrderSource"]
__version__ = "0.1.0"
