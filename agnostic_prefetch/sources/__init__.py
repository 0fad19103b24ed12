"""Map-style sources: arrays, and Caffe's LMDB cursor, image list and window sampler."""

from agnostic_prefetch.sources.array import ArraySource

__all__ = ["ArraySource"]
