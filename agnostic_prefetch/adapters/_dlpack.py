"""DLPack hand-off of pytrees between numpy, JAX, PyTorch and CuPy, zero-copy where possible.

Each framework is imported only when a conversion needs it. Every leaf goes through the
consumer's own ``from_dlpack``, which asks the producer for a capsule (versioned where
both sides speak DLPack 1.x) and, on CUDA, passes its current stream so the producer can
order its pending work before the consumer reads. Where the protocol cannot carry an
array as it is, the reason is handled here, leaf by leaf:

* bfloat16 numpy arrays (``ml_dtypes``) have no DLPack type code in numpy: they travel as
  a uint16 view and are viewed back as bfloat16 on the other side (still zero-copy);
* numpy exports read-only arrays only through versioned capsules, which JAX does not
  request: JAX then reads them with ``jax.device_put`` (zero-copy on the CPU when
  aligned); torch tensors are always writable, so read-only arrays are copied for torch;
* JAX accepts only compact layouts (a transposition is fine, gaps are not) and torch
  cannot represent negative strides: such arrays are copied to C order first;
* non-native byte order and torch tensors that require grad are not exportable: the
  former is converted (a copy), the latter detached (no copy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from agnostic_prefetch._tree import flatten, key_paths, unflatten

__all__ = ["array_kind", "to_cupy", "to_jax", "to_numpy", "to_torch"]


def array_kind(x: Any) -> str | None:
    """``"numpy"``, ``"jax"``, ``"torch"``, ``"cupy"``, ``"dlpack"`` or None (not an array).

    Decided from the type's module, so no framework is imported to ask.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    root = type(x).__module__.split(".", 1)[0]
    if root in ("jax", "jaxlib") and hasattr(x, "__dlpack__"):
        return "jax"
    if root in ("torch", "cupy"):
        return root
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return None


def _map_leaves(tree: Any, convert: Callable[[Any], Any], target: str) -> Any:
    leaves, treedef = flatten(tree)
    out = []
    for path, leaf in zip(key_paths(treedef), leaves, strict=True):
        if array_kind(leaf) is None:
            out.append(leaf)  # strings, file names, Python numbers: left as they are
            continue
        try:
            out.append(convert(leaf))
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            shape = getattr(leaf, "shape", "?")
            dtype = getattr(leaf, "dtype", "?")
            message = (f"cannot convert leaf {path or '<tree>'} ({type(leaf).__name__}, shape "
                       f"{tuple(shape) if shape != '?' else shape}, dtype {dtype}) to {target}: {exc}")
            try:
                error = type(exc)(message)
            except Exception:  # an exception class with another constructor
                error = ValueError(message)
            raise error from exc
    return unflatten(treedef, out)


# ---- numpy-side helpers ---------------------------------------------------------------


def _bfloat16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _is_bfloat16(dtype: Any) -> bool:
    return getattr(dtype, "name", str(dtype)) == "bfloat16"


def _is_compact(a: np.ndarray) -> bool:
    """Dense in memory in some axis order (what JAX's DLPack import accepts)."""
    dims = sorted(((s, n) for s, n in zip(a.strides, a.shape, strict=True) if n > 1), reverse=True)
    expected = a.itemsize
    for stride, n in reversed(dims):
        if stride != expected:
            return False
        expected *= n
    return True


def _native(a: np.ndarray) -> np.ndarray:
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))  # DLPack has no byte order: a copy
    return a


# ---- to_numpy ---------------------------------------------------------------------------


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()  # a tensor that requires grad cannot be exported; detaching copies nothing
    if t.device.type != "cpu":
        t = t.cpu()  # numpy lives in host memory: a device-to-host copy
    if t.dtype == torch.bfloat16:
        return np.from_dlpack(t.view(torch.uint16)).view(_bfloat16())
    return np.from_dlpack(t)


def _jax_to_numpy(x: Any) -> np.ndarray:
    on_one_cpu = len(x.sharding.device_set) == 1 and next(iter(x.devices())).platform == "cpu"
    if on_one_cpu and not _is_bfloat16(x.dtype):
        return np.from_dlpack(x)
    # bfloat16 has no numpy DLPack code, and device or multi-device arrays must be
    # gathered to the host: numpy's own buffer path (zero-copy for a CPU bfloat16 array).
    return np.asarray(x)


def _leaf_to_numpy(x: Any) -> np.ndarray:
    kind = array_kind(x)
    if kind == "numpy":
        return np.asarray(x)
    if kind == "torch":
        return _torch_to_numpy(x)
    if kind == "jax":
        return _jax_to_numpy(x)
    if kind == "cupy":
        return x.get()  # device to host: a copy
    return np.from_dlpack(x)


def to_numpy(tree: Any) -> Any:
    """Every array leaf of ``tree`` as a numpy array, without a copy where the data is on the host.

    Zero-copy: CPU torch tensors (writable), CPU JAX arrays (read-only views, since JAX
    arrays are immutable), numpy arrays (returned as they are). Copies: GPU arrays of any
    framework (to the host) and JAX arrays spread over several devices (gathered).
    bfloat16 arrives as ``ml_dtypes.bfloat16``. Non-array leaves are returned unchanged.

    Args:
        tree: dicts, lists and tuples of arrays (any mix of frameworks).

    Raises:
        BufferError, TypeError, ValueError: a leaf that cannot be exported, naming it.

    Example:
        >>> import torch
        >>> to_numpy({"x": torch.arange(3)})["x"].tolist()
        [0, 1, 2]
    """
    return _map_leaves(tree, _leaf_to_numpy, "numpy")


# ---- to_torch ---------------------------------------------------------------------------


def _numpy_to_torch(a: np.ndarray) -> Any:
    import torch

    a = _native(np.asarray(a))
    if not a.flags.writeable:
        # torch has no read-only tensors: an alias would let torch write into memory its
        # owner declared read-only (or crash on a read-only mapping). Copy.
        a = a.copy()
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)  # torch cannot represent negative strides (it aborts)
    if _is_bfloat16(a.dtype):
        return torch.from_dlpack(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def _leaf_to_torch(x: Any) -> Any:
    import torch

    kind = array_kind(x)
    if kind == "torch":
        return x
    if kind == "numpy":
        return _numpy_to_torch(x)
    return torch.from_dlpack(x)  # JAX, CuPy, others: torch passes its stream on CUDA


def to_torch(tree: Any) -> Any:
    """Every array leaf of ``tree`` as a ``torch.Tensor`` sharing its memory.

    Zero-copy for writable numpy arrays (any positive strides, bfloat16 included), JAX
    arrays and CuPy arrays, on the device they are on. Copies, and why: read-only numpy
    arrays (torch tensors are always writable), arrays with negative strides (torch has
    none) and non-native byte order (DLPack has none). Non-array leaves are unchanged.

    Args:
        tree: dicts, lists and tuples of arrays.

    Raises:
        BufferError, TypeError, ValueError, RuntimeError: a leaf torch cannot import
            (e.g. a JAX array sharded over several devices), naming it.

    Example:
        >>> import numpy as np
        >>> to_torch({"x": np.arange(3.0)})["x"].dtype
        torch.float64
    """
    return _map_leaves(tree, _leaf_to_torch, "torch")


# ---- to_jax -----------------------------------------------------------------------------


def _numpy_to_jax(a: np.ndarray) -> Any:
    import jax

    a = _native(np.asarray(a))
    if not _is_compact(a):
        a = np.ascontiguousarray(a)  # JAX imports compact layouts only
    if not a.flags.writeable or _is_bfloat16(a.dtype):
        # No DLPack capsule JAX can take (numpy exports read-only arrays only versioned,
        # and has no bfloat16 code); JAX reads numpy directly instead, aliasing the buffer
        # on the CPU when it is aligned.
        return jax.device_put(a)
    return jax.dlpack.from_dlpack(a)


def _leaf_to_jax(x: Any) -> Any:
    import jax

    kind = array_kind(x)
    if kind == "jax":
        return x
    if kind == "numpy":
        return _numpy_to_jax(x)
    if kind == "torch":
        x = x.detach()
        if not x.is_contiguous():
            x = x.contiguous()  # JAX imports compact layouts only: a copy
    return jax.dlpack.from_dlpack(x)


def to_jax(tree: Any) -> Any:
    """Every array leaf of ``tree`` as a ``jax.Array``, sharing memory where JAX allows it.

    Zero-copy for numpy arrays and torch tensors that are dense in memory (C order or a
    transposition) and aligned as XLA wants (the loader's 256-byte-aligned ring always is;
    JAX copies a misaligned buffer itself), and for CuPy arrays. Copies, and why: arrays
    with gaps or negative strides (JAX imports compact layouts only), non-native byte
    order. Like ``jnp.asarray``, 64-bit types become 32-bit unless ``jax_enable_x64`` is
    on (a copy). Non-array leaves are unchanged.

    A zero-copy JAX array keeps the numpy array it aliases alive; for a loader batch that
    means its ring slot stays leased while you hold the JAX array.

    Args:
        tree: dicts, lists and tuples of arrays.

    Raises:
        BufferError, TypeError, ValueError, RuntimeError: a leaf JAX cannot import, naming it.

    Example:
        >>> import numpy as np
        >>> to_jax({"x": np.ones((2, 2), np.float32)})["x"].sum().item()
        4.0
    """
    return _map_leaves(tree, _leaf_to_jax, "jax")


# ---- to_cupy ----------------------------------------------------------------------------


def import_cupy() -> Any:
    """CuPy, with a clear error when it or a CUDA device is missing."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        raise ImportError(
            "CuPy is not installed; it needs an NVIDIA GPU. Install the wheel matching your "
            "CUDA, e.g. pip install 'agnostic_prefetch[cupy]' (cupy-cuda12x)."
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when there is no driver
        raise RuntimeError(f"CuPy found no usable CUDA device ({exc}); CuPy needs an NVIDIA GPU") from exc
    if count == 0:
        raise RuntimeError("CuPy found no CUDA device; CuPy needs an NVIDIA GPU")
    return cupy


def _leaf_to_cupy(x: Any) -> Any:
    cupy = import_cupy()
    kind = array_kind(x)
    if kind == "cupy":
        return x
    if kind == "numpy":
        a = _native(np.asarray(x))
        if _is_bfloat16(a.dtype):
            raise TypeError("CuPy has no bfloat16 dtype; pass x.view(np.uint16) and reinterpret it yourself")
        return cupy.asarray(a)  # host to device: a copy
    device = getattr(x, "device", None)
    on_host = getattr(device, "type", None) == "cpu" or (
        kind == "jax" and next(iter(x.devices())).platform == "cpu")
    if on_host:
        return cupy.asarray(_leaf_to_numpy(x))  # host to device: a copy
    return cupy.from_dlpack(x)  # on the GPU already: zero-copy, CuPy passes its stream


def to_cupy(tree: Any) -> Any:
    """Every array leaf of ``tree`` as a CuPy array: zero-copy for arrays already on a GPU.

    Host arrays (numpy, CPU torch or JAX) are copied to the current CUDA device. Non-array
    leaves are unchanged.

    Args:
        tree: dicts, lists and tuples of arrays.

    Raises:
        ImportError: CuPy is not installed. RuntimeError: no CUDA device.
        TypeError: a bfloat16 numpy leaf (CuPy has no bfloat16).

    Example:
        >>> import numpy as np
        >>> to_cupy({"x": np.arange(3)})["x"].sum()  # doctest: +SKIP
        array(3)
    """
    return _map_leaves(tree, _leaf_to_cupy, "cupy")
