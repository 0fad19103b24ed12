"""One Caffe data layer (parsed by ``prototxt.py``) as a Loader: its source, transform and tops."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from agnostic_prefetch.sources.protocol import check_seed

__all__ = ["build"]

log = logging.getLogger("agnostic_prefetch.caffe")
_said: set[str] = set()  # what "has no effect here" notes were logged already, once each


def _once(note: str) -> None:
    if note not in _said:
        _said.add(note)
        log.info(note)


def build(type_name: str, layer: Any, options: Any, where: str) -> Any:
    """The Loader whose batches are ``layer``'s tops."""
    from agnostic_prefetch.loader import Loader

    tops = list(layer.top)
    if not 1 <= len(tops) <= 2:
        raise ValueError(f"{where} has {len(tops)} tops; a data layer has data and an optional label")
    t = layer.transform_param
    if t.force_color and t.force_gray:
        raise ValueError(f"{where}: force_color and force_gray cannot both be set (Caffe refuses them too)")
    kind = {"DATA": "Data", "IMAGE_DATA": "ImageData", "WINDOW_DATA": "WindowData"}.get(type_name, type_name)
    mean = _mean(t, options, where)
    # WindowData multiplies by its own window_data_param.scale and never reads transform_param.scale
    scale = layer.window_data_param.scale if kind == "WindowData" else t.scale
    if options.dtype == np.uint8 and (mean is not None or scale != 1):
        raise ValueError(f"{where}: dtype=uint8 needs no mean and scale 1 (this layer's values are fractional)")
    endless = options.loader_options.get("epochs", None) is None
    read = {"Data": _data, "ImageData": _image_data}.get(kind, _window_data)
    source, batch_size, shuffle, transform, rand_skip = read(layer, options, mean, where)
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be set and positive")
    settings = {"epochs": None, **options.loader_options}
    bound = _largest(kind, layer, source, batch_size)
    if bound is not None and _per_batch_allowed(settings):
        # Caffe reshapes each batch to its first datum: the slots hold the largest (a bound
        # where one is known: a crop, at most 4 channels; else the largest sampled).
        settings.update(shapes="per_batch", spec=_spec(bound, t.crop_size, tops, options))
    if endless and not hasattr(source, "batch_order"):
        source, shuffle = CaffeStream(source, shuffle, rand_skip), False
    return Loader(source, batch_size, shuffle=shuffle,
                  transform=Tops(transform, tops[0], tops[1] if len(tops) > 1 else None,
                                 options.layout == "NCHW" and kind == "WindowData", options.dtype),
                  **settings)


class _Spec:
    """A leaf of a slot layout given by its shape and dtype (no array behind it)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)


def _largest(kind: str, layer: Any, source: Any, batch_size: int) -> tuple[int, int, int] | None:
    """(H, W, C) bounding the images of a layer whose images may differ in size or channel
    count, before the crop; ``None`` when they all have one shape."""
    t = layer.transform_param
    if kind == "Data":
        encoded_native = source.kind == "datum (encoded)" and not (t.force_color or t.force_gray)
        if not (source.sizes_vary or encoded_native) or len(source.largest_image) != 3:
            return None
        h, w, c = source.largest_image
        return h, w, 4 if encoded_native else c  # a decoded image has at most 4 channels
    if kind == "ImageData":
        p = layer.image_data_param
        if p.new_height or p.new_width or t.crop_size:
            return None  # resized or cropped to one size; the channels follow is_color
        h, w = source.largest_size()
        return h, w, 3 if p.is_color else 1
    return None


def _per_batch_allowed(settings: dict[str, Any]) -> bool:
    """Per-batch shapes need one shard and no padding, and the user's own choice wins."""
    return ("shapes" not in settings and "spec" not in settings and settings.get("shard_count", 1) == 1
            and settings.get("remainder") != "pad")


def _spec(bound: tuple[int, int, int], crop: int, tops: list[str], options: Any) -> dict[str, Any]:
    h, w, c = bound
    if crop:
        h = w = crop
    shape = (c, h, w) if options.layout == "NCHW" else (h, w, c)
    spec = {tops[0]: _Spec(shape, options.dtype)}
    if len(tops) > 1:
        spec[tops[1]] = _Spec((), np.float32)
    return spec


def _mean(t: Any, options: Any, where: str) -> Any:
    if t.HasField("mean_file") and t.mean_value:
        raise ValueError(f"{where}: specify mean_file or mean_value, not both (as Caffe requires)")
    if t.HasField("mean_file"):
        return options.resolve(t.mean_file)
    if t.mean_value:
        values = list(t.mean_value)  # Caffe's order: BGR
        return values[::-1] if options.channel_order == "rgb" and len(values) == 3 else values
    return None


def _transform(t: Any, options: Any, mean: Any) -> Any:
    from agnostic_prefetch.caffe.transform import CaffeTransform

    by_file = isinstance(mean, str)
    return CaffeTransform(crop_size=t.crop_size, mirror=t.mirror, mean=None if by_file else mean,
                          mean_file=mean if by_file else None, scale=t.scale, train=options.train,
                          layout="CHW" if options.layout == "NCHW" else "HWC", dtype=options.dtype,
                          channel_order=options.channel_order)


def _ignored_legacy(params: Any, name: str, where: str, honoured: tuple[str, ...] = ()) -> None:
    """Warn about the deprecated fields that Caffe's layers never read in a ``layer {}`` net
    (only the V1 upgrade, ``_upgrade_v1``, moves them into ``transform_param``)."""
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if field not in honoured and params.HasField(field):
            log.warning("%s: %s.%s has no effect in Caffe's layers (they read transform_param.%s); "
                        "it is ignored here too. Set transform_param.%s instead.", where, name, field, field, field)


def _data(layer: Any, options: Any, mean: Any, where: str) -> tuple[Any, int, bool, Any, int]:
    from agnostic_prefetch.caffe.lmdb import LMDBSource

    p, t = layer.data_param, layer.transform_param
    if not p.source:
        raise ValueError(f"{where}: data_param.source is missing")
    if p.backend != 1:
        raise ValueError(
            f"{where}: data_param.backend is LEVELDB (Caffe's default when none is given); only LMDB "
            "is read here. Convert the database to LMDB (agnostic-prefetch convert), or set "
            "'backend: LMDB' if it is one.")
    if p.rand_skip:
        _once("data_param.rand_skip has no effect in Caffe's final master (its DataLayer never skips); ignored")
    if p.HasField("prefetch"):
        _once("data_param.prefetch has no effect here: the loader sizes its own read-ahead")
    if p.force_encoded_color:
        _once("data_param.force_encoded_color has no effect in Caffe's final master; use transform_param.force_color")
    _ignored_legacy(p, "data_param", where)
    source = LMDBSource(options.resolve(p.source), channel_order=options.channel_order,
                        force_color=t.force_color, force_gray=t.force_gray, allow_varying_sizes=True)
    return source, p.batch_size, False, _transform(t, options, mean), 0


def _image_data(layer: Any, options: Any, mean: Any, where: str) -> tuple[Any, int, bool, Any, int]:
    from agnostic_prefetch.caffe.image_list import ImageListSource

    p, t = layer.image_data_param, layer.transform_param
    if not p.source:
        raise ValueError(f"{where}: image_data_param.source is missing")
    if p.rand_skip and options.loader_options.get("epochs") is not None:
        raise ValueError(
            f"{where}: image_data_param.rand_skip={p.rand_skip} starts Caffe's endless stream at a "
            "random line; it has no meaning with epochs=. Leave epochs out, or remove rand_skip.")
    if t.force_color or t.force_gray:
        _once("transform_param.force_color/force_gray have no effect on ImageData (is_color decides); ignored")
    _ignored_legacy(p, "image_data_param", where)
    source = ImageListSource(options.resolve(p.source), root_folder=options.folder(p.root_folder), new_height=p.new_height,
                             new_width=p.new_width, is_color=p.is_color, channel_order=options.channel_order)
    return source, p.batch_size, p.shuffle, _transform(t, options, mean), p.rand_skip


def _window_data(layer: Any, options: Any, mean: Any, where: str) -> tuple[Any, int, bool, Any, int]:
    from agnostic_prefetch.caffe.window import WindowSource

    p, t = layer.window_data_param, layer.transform_param
    if not p.source:
        raise ValueError(f"{where}: window_data_param.source is missing")
    if t.crop_size < 1:
        raise ValueError(f"{where}: WindowData needs transform_param.crop_size > 0 (Caffe requires it)")
    if p.cache_images:
        _once("window_data_param.cache_images has no effect here: images are read when needed")
    # Caffe's WindowDataLayer<Dtype>::load_batch writes (pixel - mean) * window_data_param.scale;
    # it reads crop_size, mirror and the mean from transform_param, and never its scale.
    _ignored_legacy(p, "window_data_param", where, honoured=("scale",))
    if t.HasField("scale"):
        log.warning("%s: transform_param.scale has no effect on Caffe's WindowData layer (it multiplies by "
                    "window_data_param.scale, %g here; a V1 net's window_data_param.scale is moved into "
                    "transform_param by Caffe's upgrade and has no effect either); ignored here too",
                    where, p.scale)
    source = WindowSource(options.resolve(p.source), root_folder=options.folder(p.root_folder), fg_threshold=p.fg_threshold,
                          bg_threshold=p.bg_threshold, fg_fraction=p.fg_fraction, context_pad=p.context_pad,
                          crop_mode=p.crop_mode, crop_size=t.crop_size, mirror=t.mirror, mean=mean,
                          scale=p.scale, channel_order=options.channel_order)
    return source, p.batch_size, False, None, 0


class Tops:
    """An example as the layer's tops: ``{data top: image, label top: float32 label}``."""

    def __init__(self, inner: Any, data: str, label: str | None, to_chw: bool, dtype: np.dtype) -> None:
        self.inner, self.data, self.label, self.to_chw, self.dtype = inner, data, label, to_chw, dtype

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = self.inner(example, rng) if self.inner is not None else example
        image = out["image"]
        if self.to_chw:
            image = image.transpose(2, 0, 1)
        result = {self.data: np.asarray(image, dtype=self.dtype)}
        if self.label is not None:
            result[self.label] = np.float32(out["label"])
        return result


class CaffeStream:
    """A source read as Caffe's layers read it: an endless stream that wraps around mid-batch,
    in order, or (``shuffle``) in a new permutation from ``(seed, pass)`` on every pass,
    starting a number of items in drawn below ``rand_skip`` from the seed (ImageData's)."""

    def __init__(self, source: Any, shuffle: bool, rand_skip: int = 0) -> None:
        self.source, self.shuffle, self.n, self.rand_skip = source, bool(shuffle), len(source), int(rand_skip)

    def __len__(self) -> int:
        return self.n

    @property
    def index_space(self) -> int:
        """The wrapped source's: its indices are passed through unchanged."""
        return int(getattr(self.source, "index_space", self.n))

    def __getitem__(self, index: int) -> Any:
        return self.source[index]

    def release(self) -> None:
        release = getattr(self.source, "release", None)
        if callable(release):
            release()

    def locate(self, index: int) -> str | None:
        locate = getattr(self.source, "locate", None)
        return locate(index) if locate is not None else None

    def remedy(self, index: int, exc: BaseException) -> str | None:
        remedy = getattr(self.source, "remedy", None)
        return remedy(index, exc) if remedy is not None else None

    @property
    def order_fingerprint(self) -> dict[str, Any]:
        return {"caffe_stream": self.shuffle, "rand_skip": self.rand_skip,
                "source": getattr(self.source, "order_fingerprint", None)}

    def batch_order(self, *, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Batches ``epoch * ceil(n / B)`` on of the stream: item ``m`` is record ``m % n``
        of pass ``m // n``. Raises ValueError for a seed that is not a non-negative integer."""
        seed = check_seed(seed)
        per = -(-self.n // batch_size)
        # rand_skip: Caffe starts at line `rand() % rand_skip` of its first pass
        skip = int(np.random.default_rng([seed, 0x534B4950]).integers(0, self.rand_skip)) if self.rand_skip else 0
        m = skip + epoch * per * batch_size + np.arange(per * batch_size, dtype=np.int64)
        passes, at = np.divmod(m, self.n)
        if self.shuffle:
            for p in np.unique(passes).tolist():
                chosen = passes == p
                at[chosen] = np.random.default_rng([seed, p]).permutation(self.n)[at[chosen]]
        return list(at.reshape(per, batch_size))
