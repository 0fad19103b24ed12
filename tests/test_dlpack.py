"""DLPack hand-off between numpy, JAX, torch and CuPy: zero copy where the protocol allows, values kept."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import agnostic_prefetch as ap  # noqa: E402
from agnostic_prefetch.adapters import to_cupy, to_jax, to_numpy, to_torch  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
# Without jax_enable_x64 JAX keeps 32-bit types only (64-bit ones become 32-bit, as with
# jnp.asarray), so round trips through JAX use these.
DTYPES = [np.float32, np.float16, BF16, np.int32, np.int8, np.uint8, np.bool_]


def aligned(shape, dtype, align=256):
    """A writable array whose buffer starts on an ``align``-byte boundary, like a ring slot."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + n].view(dtype).reshape(shape)


def filled(shape, dtype, seed=0):
    a = aligned(shape, dtype)
    values = np.random.default_rng(seed).integers(0, 100, size=shape)
    a[...] = values.astype(np.float32).astype(dtype) if np.dtype(dtype) == BF16 else values.astype(dtype)
    return a


def jax_ptr(x) -> int:
    return x.unsafe_buffer_pointer()


# ---- zero copy on the CPU -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_to_torch_shares_memory(dtype):
    a = filled((4, 5), dtype)
    t = to_torch({"a": a})["a"]
    assert t.data_ptr() == a.ctypes.data
    np.testing.assert_array_equal(to_numpy(t), a)
    assert to_numpy(t).dtype == a.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_aligned_numpy_to_jax_shares_memory(dtype):
    a = filled((4, 5), dtype)
    x = to_jax([a])[0]
    assert jax_ptr(x) == a.ctypes.data
    assert x.dtype == a.dtype
    np.testing.assert_array_equal(np.asarray(x), a)


def test_jax_and_torch_share_memory_both_ways():
    x = jax.numpy.arange(64, dtype=jax.numpy.float32)
    t = to_torch(x)
    assert t.data_ptr() == jax_ptr(x)
    back = to_jax(t)
    assert jax_ptr(back) == t.data_ptr()
    tb = torch.arange(64).to(torch.bfloat16)
    assert jax_ptr(to_jax(tb)) == tb.data_ptr() and to_jax(tb).dtype == BF16


def test_to_numpy_shares_memory_with_cpu_torch_and_jax_and_jax_views_are_read_only():
    t = torch.arange(12.0).reshape(3, 4)
    n = to_numpy(t)
    assert n.ctypes.data == t.data_ptr() and n.flags.writeable
    x = jax.numpy.ones((3, 4))
    m = to_numpy(x)
    assert m.ctypes.data == jax_ptr(x) and not m.flags.writeable
    xb = jax.numpy.ones(8, jax.numpy.bfloat16)
    mb = to_numpy(xb)
    assert mb.dtype == BF16 and mb.ctypes.data == jax_ptr(xb)
    tb = torch.ones(8, dtype=torch.bfloat16)
    nb = to_numpy(tb)
    assert nb.dtype == BF16 and nb.ctypes.data == tb.data_ptr()


def test_loader_batches_reach_torch_and_jax_without_a_copy():
    source = ap.ArraySource({"x": np.arange(64, dtype=np.float32).reshape(16, 4)})
    with ap.Loader(source, 8, workers=0) as loader:
        batch = next(iter(loader))
        assert to_torch(batch)["x"].data_ptr() == batch["x"].ctypes.data
        assert jax_ptr(to_jax(batch)["x"]) == batch["x"].ctypes.data


# ---- edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize("convert", [to_jax, to_torch, to_numpy])
def test_zero_dimensional_and_empty_arrays_keep_shape_and_dtype(convert):
    for a in (np.array(3.5, np.float32), np.zeros((0, 3), np.uint8), np.zeros((2, 0), BF16)):
        out = to_numpy(convert(a))
        assert out.shape == a.shape and out.dtype == a.dtype
        np.testing.assert_array_equal(out, a)


def test_non_compact_numpy_is_copied_for_jax_and_viewed_by_torch():
    base = filled((6, 8), np.float32)
    a = base[:, ::2]
    x = to_jax(a)
    np.testing.assert_array_equal(np.asarray(x), a)
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.stride() == (8, 2)


def test_transposed_numpy_reaches_jax_without_a_copy():
    a = filled((8, 8), np.float32).T
    x = to_jax(a)
    np.testing.assert_array_equal(np.asarray(x), a)
    assert jax_ptr(x) == a.ctypes.data


def test_negative_strides_are_copied_for_torch_instead_of_crashing_it():
    a = filled((8,), np.float32)[::-1]
    t = to_torch(a)
    assert t.tolist() == a.tolist() and t.data_ptr() != a.ctypes.data
    np.testing.assert_array_equal(np.asarray(to_jax(a)), a)


def test_read_only_numpy_reaches_jax_zero_copy_and_torch_as_a_writable_copy():
    a = filled((4, 4), np.float32)
    a.flags.writeable = False
    x = to_jax(a)
    assert jax_ptr(x) == a.ctypes.data
    t = to_torch(a)
    assert t.data_ptr() != a.ctypes.data
    t += 1  # writable, and the read-only original is untouched
    np.testing.assert_array_equal(t.numpy() - 1, a)


def test_non_native_byte_order_is_converted():
    a = np.arange(6, dtype=">i4")
    assert to_torch(a).tolist() == list(range(6))
    assert np.asarray(to_jax(a)).tolist() == list(range(6))


def test_torch_tensor_that_requires_grad_is_detached_not_copied():
    t = torch.arange(64.0, requires_grad=True)
    assert jax_ptr(to_jax(t)) == t.data_ptr()
    assert to_numpy(t).ctypes.data == t.data_ptr()


def test_non_array_leaves_and_structure_are_kept():
    tree = {"x": np.arange(3), "names": ["a", "b"], "meta": (1, None)}
    for convert in (to_jax, to_torch, to_numpy):
        out = convert(tree)
        assert out["names"] == ["a", "b"] and out["meta"] == (1, None)


def test_a_failing_leaf_is_named_in_the_error():
    sharded = jax.numpy.arange(4.0)
    with pytest.raises(Exception, match=r"leaf \['bad'\]"):
        to_numpy({"ok": np.zeros(2), "bad": _NotExportable(sharded)})


class _NotExportable:
    def __init__(self, x):
        self.x = x

    def __dlpack__(self, **kwargs):
        raise BufferError("refuses to export")

    def __dlpack_device__(self):
        return (1, 0)


# ---- round trips (hypothesis) ---------------------------------------------------------


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    a = filled(shape, dtype, seed)
    if a.ndim and draw(st.booleans()):
        a = a[::2]  # non-contiguous input
    return a


@settings(max_examples=60, deadline=None)
@given(arrays())
def test_numpy_jax_torch_numpy_round_trip_preserves_values_dtype_and_shape(a):
    out = to_numpy(to_torch(to_jax(a)))
    assert out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == np.ascontiguousarray(a).tobytes()


@settings(max_examples=40, deadline=None)
@given(arrays())
def test_numpy_torch_jax_numpy_round_trip_preserves_values_dtype_and_shape(a):
    out = to_numpy(to_jax(to_torch(a)))
    assert out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == np.ascontiguousarray(a).tobytes()


# ---- CuPy -------------------------------------------------------------------------------

HAVE_CUPY_GPU = importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_CUPY_GPU, reason="CuPy and a GPU are present: the error path does not apply")
def test_to_cupy_without_cupy_or_a_gpu_is_a_clear_error():
    with pytest.raises((ImportError, RuntimeError), match="GPU"):
        to_cupy({"x": np.zeros(2)})


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUPY_GPU, reason="needs CuPy and a CUDA GPU (neither is on this machine)")
def test_to_cupy_copies_host_arrays_to_the_gpu_and_back():
    import cupy

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert cupy.asnumpy(to_cupy({"a": a})["a"]).tolist() == a.tolist()
    on_gpu = torch.arange(6, device="cuda", dtype=torch.float32)
    shared = to_cupy({"t": on_gpu})["t"]
    assert shared.data.ptr == on_gpu.data_ptr()  # on the GPU already: zero-copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_tensors_reach_jax_and_back_without_a_copy():
    if jax.default_backend() != "gpu":
        pytest.skip(f"JAX runs on {jax.default_backend()}, not the GPU")
    t = torch.arange(8, device="cuda", dtype=torch.float32)
    x = to_jax({"t": t})["t"]
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    assert to_torch({"x": x})["x"].data_ptr() == t.data_ptr()
