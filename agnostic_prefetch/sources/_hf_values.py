"""Arrow columns of a Hugging Face dataset to the values ``dataset.with_format("numpy")[i]`` gives.

``datasets`` (5.x) formats a row in three steps: the 1-row table's columns to numpy
(``NumpyArrowExtractor``), features decoded (an ``Image`` to a PIL image), then every leaf
"tensorized" (``NumpyFormatter``): integer arrays become int64, float arrays float32,
numpy scalars stay as they are (a bool becomes a 0-d array, not being a ``np.number``),
strings and bytes stay numpy strings, lists and object arrays are stacked when their parts
agree in shape and dtype. :func:`column_values` gives the same values a whole column of a
batch at a time: a vectorised path for numbers, numeric lists and ``Array2D``-``Array5D``,
images decoded one by one, and for everything else those steps written out (``_tree``).
Which path a column takes is planned once, from the features, by :func:`column_plan` in the
parent (where ``datasets`` is imported); workers import only pyarrow.

Example:
    >>> import pyarrow as pa
    >>> column_values(pa.array([[1, 2], [3]], pa.list_(pa.int32())), ("list",), "x", rows=[0, 1])
    [array([1, 2]), array([3])]
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["column_plan", "column_values", "unsupported_feature"]

_CAST = {"i": np.int64, "u": np.int64, "f": np.float32}  # NumpyFormatter's default dtypes


def column_plan(feature: Any) -> tuple:
    """How to convert the column of ``feature`` (a ``datasets`` feature): a plain tuple."""
    import datasets

    if isinstance(feature, datasets.Image) and feature.decode:
        return ("image", feature.mode)
    if isinstance(feature, datasets.ClassLabel):
        return ("number",)
    if isinstance(feature, datasets.Value):
        kind = feature.pa_type
        import pyarrow as pa

        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            return ("number",)
        return ("generic",)
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence):
        inner = feature.feature
        if isinstance(inner, datasets.Value) and np.dtype(inner.pa_type.to_pandas_dtype()).kind in "iufb":
            return ("list",)
    if isinstance(feature, datasets.features.features._ArrayXD) and feature.shape[0] is not None:
        return ("array", tuple(feature.shape), feature.dtype)
    return ("generic",)


def unsupported_feature(name: str, feature: Any) -> str | None:
    """Why a column cannot be read here (a decoded feature other than a top-level Image), or None."""
    import datasets

    if isinstance(feature, datasets.Image):
        return None
    if datasets.features.features.require_decoding(feature):
        kind = type(feature).__name__
        return (f"column {name!r} is a {kind} feature decoded by datasets ({feature}), which this source "
                f"does not decode: cast it undecoded (dataset.cast_column({name!r}, ...(decode=False))) and "
                "decode it in the Loader's transform, or remove the column.")
    return None


def column_values(arr: Any, plan: tuple, name: str, rows: Sequence[int]) -> list[Any]:
    """Each row's value of the (unchunked) Arrow column ``arr`` as ``with_format("numpy")`` gives it;
    ``rows`` are the dataset's row numbers of ``arr``'s rows (named in errors).

    A row holding a null anywhere (a null number, a null in a list) is converted alone, as
    datasets converts a one-row table: a null turns its column's integers into floats, and
    that must not reach the other rows of the batch."""
    import pyarrow as pa

    if isinstance(arr, pa.ExtensionArray):  # datasets imported here: its Array2D etc. type
        arr = arr.storage
    nulls = None if plan[0] == "image" else _null_rows(arr)
    if nulls is None or not nulls.any():
        return _converted(arr, plan, name, rows)
    out: list[Any] = [None] * len(arr)
    clean = np.flatnonzero(~nulls)
    if len(clean):
        values = _converted(arr.filter(pa.array(~nulls)), plan, name, [rows[k] for k in clean])
        for k, value in zip(clean.tolist(), values, strict=True):
            out[k] = value
    for k in np.flatnonzero(nulls).tolist():
        out[k] = _converted(arr.slice(k, 1), plan, name, [rows[k]])[0]
    return out


def _null_rows(arr: Any) -> np.ndarray:
    """Per row of ``arr``, whether it holds a null at any depth (itself, a list element, a field)."""
    import pyarrow as pa

    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    mask = np.zeros(len(arr), dtype=bool)
    if arr.null_count:
        mask |= ~arr.is_valid().to_numpy(zero_copy_only=False)
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        child, offsets = arr.values, arr.offsets.to_numpy()
    elif pa.types.is_fixed_size_list(t):
        size = t.list_size
        child = arr.values.slice(arr.offset * size, len(arr) * size)
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * size
    else:
        if pa.types.is_struct(t):
            for field in arr.flatten():
                mask |= _null_rows(field)
        return mask
    inner = _null_rows(child)
    if inner.any():
        seen = np.concatenate([[0], np.cumsum(inner)])
        mask |= seen[offsets[1:]] > seen[offsets[:-1]]
    return mask


def _converted(arr: Any, plan: tuple, name: str, rows: Sequence[int]) -> list[Any]:
    import pyarrow as pa

    kind = plan[0]
    if kind == "number" and not arr.null_count:
        return list(arr.to_numpy(zero_copy_only=False))
    if kind == "list" and not arr.null_count and not arr.values.null_count:
        return _lists(arr)
    if kind == "array" and not arr.null_count:
        values = arr
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
                or pa.types.is_fixed_size_list(values.type):
            values = values.flatten()  # (Array2D..5D store nested lists) this level's offset applied
        flat = values.to_numpy(zero_copy_only=False)
        if flat.size == len(arr) * int(np.prod(plan[1])):
            flat = flat.astype(_CAST.get(flat.dtype.kind, flat.dtype), copy=False)
            return list(flat.reshape((len(arr), *plan[1])))
    if kind == "image":
        return _images(arr, plan[1], name, rows)
    return [_tree(_unnest(v)) for v in arr.to_numpy(zero_copy_only=False)]


def _lists(arr: Any) -> list[np.ndarray]:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        values = arr.values.slice(arr.offset * size, len(arr) * size)
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * size
    else:
        values, offsets = arr.values, arr.offsets.to_numpy()
    flat = values.to_numpy(zero_copy_only=False)
    flat = flat.astype(_CAST.get(flat.dtype.kind, flat.dtype), copy=False)
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _images(arr: Any, mode: str | None, name: str, rows: Sequence[int]) -> list[np.ndarray]:
    struct = arr.type
    fields = dict(zip([struct.field(k).name for k in range(struct.num_fields)], arr.flatten(), strict=True))
    data, paths = fields["bytes"].to_pylist(), fields["path"].to_pylist()
    return [_image(d, p, mode, f"the image of row {row} ({name!r}{', ' + p if p else ''})")
            for row, d, p in zip(rows, data, paths, strict=True)]


def _image(data: bytes | None, path: str | None, mode: str | None, where: str) -> np.ndarray:
    """One Image feature value decoded as datasets decodes it, then as numpy."""
    from PIL import Image, ImageOps

    from agnostic_prefetch.sources import _storage
    from agnostic_prefetch.sources.images import ImageDecodeError, decode_image

    if data is None:
        if path is None:
            raise ValueError(f"{where} has neither bytes nor a path: the dataset is incomplete; write it again")
        with _storage.open_binary(path) as f:
            data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 (Pillow raises many kinds)
        raise ImageDecodeError(f"cannot decode {where}: {exc}") from None
    if data[:3] == b"\xff\xd8\xff" and img.mode in ("RGB", "L") and mode in (None, "RGB", img.mode):
        # libjpeg-turbo straight into numpy (simplejpeg), the same pixels as Pillow's decoding
        target = mode or img.mode
        arr = decode_image(data, name=where, color=target == "RGB", orient=True)
        return arr if target == "RGB" else arr[:, :, 0]
    try:
        img.load()
        if img.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            img = ImageOps.exif_transpose(img)
        if mode and mode != img.mode:
            img = img.convert(mode)
        return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode {where}: {exc}") from None


def _unnest(v: Any) -> Any:
    """The value of a 1-row column after NumpyArrowExtractor (``np.asarray([v])[0]``)."""
    if isinstance(v, np.ndarray) and v.dtype == object:
        return np.asarray([v], dtype=object)[0]
    return np.asarray([v])[0]


def _tree(v: Any) -> Any:
    """NumpyFormatter's ``recursive_tensorize`` of one value: dicts mapped, leaves tensorized."""
    if isinstance(v, dict):
        return {k: _tree(x) for k, x in v.items()}
    if hasattr(v, "__array__") and not isinstance(v, np.ndarray | np.character | np.number):
        v = v.__array__()
    if (isinstance(v, np.ndarray) and v.dtype == object) or isinstance(v, list | tuple):
        return _consolidate([_tree(x) for x in v])
    return _tensorize(v)


def _tensorize(v: Any) -> Any:
    if v is None or isinstance(v, str | bytes | np.character | np.number):
        return v
    if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.character):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "iuf":
        return np.asarray(v, dtype=np.int64 if v.dtype.kind in "iu" else np.float32)
    return np.asarray(v)


def _consolidate(parts: list[Any]) -> Any:
    if parts and all(isinstance(x, np.ndarray | np.number | np.bool_) and x.shape == parts[0].shape
                     and x.dtype == parts[0].dtype for x in parts):
        return np.stack(parts)
    out = np.empty(len(parts), dtype=object)
    out[:] = parts
    return out
