"""Where ``CaffeTransform`` lived in 0.1; it is in :mod:`agnostic_prefetch.caffe` (and ``ap.CaffeTransform``)."""

from __future__ import annotations

import warnings

from agnostic_prefetch.caffe.transform import CaffeTransform

__all__ = ["CaffeTransform"]

warnings.warn("agnostic_prefetch.transforms moved to agnostic_prefetch.caffe (CaffeTransform is "
              "also ap.CaffeTransform)", DeprecationWarning, stacklevel=2)
