"""Framework hand-off: DLPack conversions of pytrees and the torch / CuPy stagers.

Nothing here imports jax, torch or cupy until a function that needs it is called.

Example:
    >>> import numpy as np
    >>> from agnostic_prefetch.adapters import to_torch, to_numpy
    >>> batch = {"x": np.arange(4.0)}
    >>> t = to_torch(batch)["x"]                 # shares memory with batch["x"]
    >>> to_numpy({"x": t})["x"].tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

from agnostic_prefetch.adapters._cupy_stage import cupy_prefetch
from agnostic_prefetch.adapters._dlpack import to_cupy, to_jax, to_numpy, to_torch
from agnostic_prefetch.adapters._torch_stage import torch_prefetch

__all__ = ["cupy_prefetch", "to_cupy", "to_jax", "to_numpy", "to_torch", "torch_prefetch"]
