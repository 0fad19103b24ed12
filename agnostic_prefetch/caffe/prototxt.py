"""``from_prototxt``: the data layers of a Caffe ``train_val.prototxt`` as Loaders.

Each returned Loader yields what the layer's tops hold in Caffe: a dict keyed by the top
names, ``data`` N×C×H×W float32 in Caffe's BGR order and the label float32 of shape (N,).
Caffe's own random choices (the mirror coin, the crop offsets in TRAIN, WindowData's choice
of windows, ImageData's shuffle) are drawn from the loader's generators with Caffe's
distributions, not from Caffe's random stream; everything else is Caffe's arithmetic.
docs/caffe.md says what is exact and what differs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from agnostic_prefetch.caffe._caffe_proto import messages
from agnostic_prefetch.caffe._net_text import Layer, included, layers_of, read_net_text

__all__ = ["from_prototxt"]

log = logging.getLogger("agnostic_prefetch.caffe")

_BUILT = {"Data": "DATA", "ImageData": "IMAGE_DATA", "WindowData": "WINDOW_DATA"}
# Layers that feed a net from outside (no bottoms) but that this package does not read.
_NOT_READ = {"HDF5Data", "MemoryData", "DummyData", "Python", "HDF5_DATA", "MEMORY_DATA", "DUMMY_DATA"}
_DEPLOY = {"Input"}  # a deploy net's placeholder: nothing to load


def from_prototxt(
    path: str | os.PathLike[str],
    phase: str = "TRAIN",
    *,
    stages: Iterable[str] = (),
    level: int = 0,
    root: str | os.PathLike[str] | None = None,
    channel_order: str = "bgr",
    layout: str = "NCHW",
    dtype: Any = np.float32,
    **loader_options: Any,
) -> dict[str, Any]:
    """``{layer name: Loader}`` for the data layers that ``phase`` includes in a NetParameter.

    Args:
        path: a ``.prototxt`` (new ``layer { type: "Data" }`` or legacy ``layers { type: DATA }``).
        phase: ``"TRAIN"`` (random crops) or ``"TEST"`` (centred crops).
        stages, level: the net state that ``include``/``exclude`` rules test.
        root: resolve relative paths against this directory (default: the working
            directory, as Caffe does).
        channel_order: ``"bgr"`` (Caffe's) or ``"rgb"``.
        layout: ``"NCHW"`` (Caffe's) or ``"NHWC"``.
        dtype: ``float32``, or ``uint8`` where no mean and no scale make the values fractional.
        loader_options: passed to every :class:`~agnostic_prefetch.Loader` (``workers``,
            ``seed``, ``epochs``...). ``batch_size`` comes from the prototxt. Like Caffe's
            layers the loaders never end (they wrap around, mid-batch) unless ``epochs`` is given.

    Raises:
        ValueError: a malformed prototxt or an unknown field in a data layer (naming the
            file and line), an unsupported layer or parameter (naming it), ``batch_size``
            in ``loader_options``, both include and exclude rules on a layer, two included
            data layers of one name or producing one top.
        LoaderError, OSError: what a layer's source, transform or Loader raised (a missing
            database or mean file, a record that does not fit). Every failure first closes
            the loaders built for earlier layers: no worker, ring or open LMDB is left behind.

    Example:
        >>> loaders = from_prototxt("train_val.prototxt", "TEST", workers=2)  # doctest: +SKIP
        >>> batch = next(iter(loaders["data"]))  # doctest: +SKIP
        >>> batch["data"].shape, batch["label"].dtype  # doctest: +SKIP
        ((50, 3, 227, 227), dtype('float32'))
    """
    if phase not in ("TRAIN", "TEST"):
        raise ValueError(f"phase must be 'TRAIN' or 'TEST', got {phase!r}")
    if "batch_size" in loader_options or "global_batch_size" in loader_options:
        raise ValueError("batch_size comes from the prototxt's data layers; do not pass it")
    if channel_order not in ("bgr", "rgb") or layout not in ("NCHW", "NHWC"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb' and layout 'NCHW' or 'NHWC'; got {channel_order!r}, {layout!r}")
    path = os.fspath(path)
    text = read_net_text(path)
    from agnostic_prefetch.caffe._layers import build

    state = (0 if phase == "TRAIN" else 1, int(level), frozenset(stages))
    base = os.fspath(root) if root is not None else os.getcwd()
    options = _Options(phase == "TRAIN", channel_order, layout, np.dtype(dtype), base, loader_options)
    loaders: dict[str, Any] = {}
    produced: dict[str, str] = {}  # layer names and tops of the layers built so far: which layer
    try:
        for number, block in enumerate(layers_of(text, path)):
            found = _data_layer(block, number, path, state)
            if found is not None:
                type_name, layer = found
                name = layer.name or f"layer {number}"
                where = f"{path}, layer {name!r} (line {block.line})"
                _check_unique(name, list(layer.top), where, f"layer {name!r} at line {block.line}", produced)
                loaders[name] = build(type_name, layer, options, where)
    except BaseException:
        # every loader built so far: its workers, its ring and the LMDB environment its
        # source may hold, so the caller can open the database again
        for loader in loaders.values():
            loader.close()
        raise
    return loaders


def _check_unique(name: str, tops: list[str], where: str, which: str, produced: dict[str, str]) -> None:
    """Refuse a second data layer of one name, or a top two layers produce (Caffe refuses that:
    "Top blob produced by multiple sources"); the loaders are returned by layer name."""
    if f"layer {name}" in produced:
        raise ValueError(
            f"{where}: the phase already includes a data layer named {name!r} ({produced[f'layer {name}']}); "
            "from_prototxt returns one loader per layer name. Rename one of them, or give them include "
            "rules that select one per phase, stage or level.")
    for top in tops:
        if f"top {top}" in produced:
            raise ValueError(
                f"{where}: top {top!r} is also produced by {produced[f'top {top}']}, which Caffe refuses "
                "('produced by multiple sources'). Give the layers include rules that select one per "
                "phase, stage or level, or distinct tops.")
    produced[f"layer {name}"] = which
    produced.update({f"top {top}": which for top in tops})


class _Options:
    def __init__(self, train: bool, channel_order: str, layout: str, dtype: np.dtype, base: str,
                 loader_options: dict[str, Any]) -> None:
        self.train, self.channel_order, self.layout, self.dtype = train, channel_order, layout, dtype
        self.base, self.loader_options = base, loader_options

    def resolve(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.base, name)

    def folder(self, root_folder: str) -> str:
        """A layer's ``root_folder`` (a prefix Caffe concatenates with each file name), against
        ``root=`` when one was given: an empty one then means ``root=`` itself."""
        if root_folder and not os.path.isabs(root_folder):
            return os.path.join(self.base, root_folder)
        if not root_folder and self.base != os.getcwd():
            return os.path.join(self.base, "")
        return root_folder


def _parse(block: Layer, kind: str, path: str, lenient: bool) -> Any:
    from google.protobuf import text_format

    message = messages()[kind]()
    try:
        text_format.Parse(block.text, message, allow_unknown_field=lenient)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        line = None if line is None else line + block.line - 1  # the text starts on the block's line
        what = str(exc).split(" : ", 1)[-1].replace("agnostic_prefetch_caffe.", "caffe.")
        at = f"line {line}, column {column}" if line is not None else f"the layer at line {block.line}"
        raise ValueError(f"{path}, {at} (in the layer that starts at line {block.line}): {what}") from None
    return message


def _data_layer(block: Layer, number: int, path: str, state: tuple[int, int, frozenset[str]]) -> tuple[str, Any] | None:
    """The type and strictly parsed data layer of ``block`` if ``state`` includes it and it is
    one to build."""
    header = _parse(block, "V1LayerHeader" if block.legacy else "LayerHeader", path, lenient=True)
    kind = header.DESCRIPTOR.fields_by_name["type"]
    type_name = kind.enum_type.values_by_number[header.type].name if block.legacy else header.type
    where = f"{path}, layer {header.name or number!r} (line {block.line})"
    if not included(header, *state, where):
        return None
    if type_name in _DEPLOY or (type_name not in _BUILT and type_name not in _BUILT.values()):
        if type_name in _NOT_READ or (not header.bottom and type_name not in _DEPLOY):
            raise ValueError(
                f"{where} is a {type_name} layer with no bottoms (a data layer), which agnostic_prefetch "
                "does not read; supported data "
                f"layers are {', '.join(_BUILT)}. Convert the data to an LMDB of Datums (agnostic-prefetch "
                "convert) and use a Data layer, or load it with your own map-style source.")
        return None
    layer = _parse(block, "V1DataLayer" if block.legacy else "DataLayer", path, lenient=False)
    if block.legacy:
        _upgrade_v1(layer)
    return type_name, layer


def _upgrade_v1(layer: Any) -> None:
    """As Caffe's ``UpgradeNetDataTransformation``: a V1 layer's legacy scale, mean_file,
    crop_size and mirror move from its data parameters into ``transform_param``."""
    transform = layer.transform_param
    for params in (layer.data_param, layer.image_data_param, layer.window_data_param):
        for field in ("scale", "mean_file", "crop_size", "mirror"):
            if params.HasField(field):
                setattr(transform, field, getattr(params, field))
                params.ClearField(field)
