"""The ``convert``, ``inspect`` and ``compute-mean`` commands: building and examining Caffe-compatible LMDBs.

``convert`` does what Caffe's ``tools/convert_imageset`` does — keys ``%08d_<listed
path>`` (numbered after shuffling), raw ``Datum`` records in BGR C×H×W unless
``--encoded``, commits every 1000 records — so the database reads in Caffe and in
:class:`~agnostic_prefetch.caffe.lmdb.LMDBSource`. Unreadable images are skipped with a
warning each and counted at the end, as Caffe skips them.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import time
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from agnostic_prefetch.caffe._datum import Datum, decode_datum, encode_blobproto, encode_datum
from agnostic_prefetch.caffe._lmdb_write import LMDBWriter
from agnostic_prefetch.caffe._resize import resize_bilinear
from agnostic_prefetch.caffe.image_list import read_image_list
from agnostic_prefetch.caffe.lmdb import LMDBSource
from agnostic_prefetch.sources.images import ImageDecodeError, decode_image
from agnostic_prefetch.sources.packed_arrays import decode_record, is_array_record
from agnostic_prefetch.sources.protocol import check_seed

__all__ = ["add_commands", "convert_imageset", "inspect_db", "compute_mean"]

log = logging.getLogger("agnostic_prefetch.convert")

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}


def _extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _same_format(path: str, encode_type: str) -> bool:
    # Caffe's matchExt: the file's extension equals the requested type ("jpg" ~ "jpeg")
    ext, want = _extension(path), encode_type.lower()
    return ext == want or {ext, want} == {"jpg", "jpeg"}


def _encode(image: np.ndarray, encode_type: str) -> bytes:
    fmt = _FORMATS.get(encode_type.lower())
    if fmt is None:
        raise ValueError(f"cannot encode as {encode_type!r}; use one of {sorted(_FORMATS)}")
    buf = io.BytesIO()
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    # 95 is OpenCV's default JPEG quality, which Caffe's imencode uses
    pil.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def convert_imageset(
    root: str | os.PathLike[str],
    list_file: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    *,
    resize_height: int = 0,
    resize_width: int = 0,
    gray: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    encoded: bool = False,
    encode_type: str = "",
    check_size: bool = False,
    progress: bool = True,
    map_size: int = 1 << 28,
) -> dict[str, Any]:
    """Convert the images of a Caffe list file into a new LMDB of Caffe ``Datum`` records.

    Image paths are ``root + listed path`` (string concatenation, as in Caffe). With
    ``shuffle`` the lines are permuted by ``numpy.random.default_rng(seed)`` before numbering.
    Raw records hold BGR C×H×W uint8; ``encoded`` records hold the file's own bytes when
    the file already has the wanted format and needs no resize or channel change, and a
    fresh JPEG (quality 95) or PNG encoding otherwise. Colour images have 3 channels,
    ``gray`` ones 1.

    Returns:
        ``{"db", "written", "skipped", "skipped_paths", "shape", "encoded", "seconds"}``;
        ``shape`` is the first image's H×W×C.

    Raises:
        FileExistsError: ``db_path`` exists. ValueError: only one resize size, a ``seed``
        that is not a non-negative integer, or with ``check_size`` an image whose size
        differs from the first (the database is then incomplete: delete it).

    Example:
        >>> convert_imageset("images/", "train.txt", "train_lmdb", resize_height=256, resize_width=256)  # doctest: +SKIP
        {'db': 'train_lmdb', 'written': 1000, 'skipped': 0, ...}
    """
    if (resize_height > 0) != (resize_width > 0):
        raise ValueError(
            f"set both resize_height and resize_width, or neither; got {resize_height} and {resize_width}"
        )
    seed = check_seed(seed)
    root, list_file, db_path = os.fspath(root), os.fspath(list_file), os.fspath(db_path)
    lines = read_image_list(list_file)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    start = time.perf_counter()
    skipped: list[str] = []
    first_shape: tuple[int, ...] | None = None
    color = not gray
    with LMDBWriter(db_path, map_size=map_size) as writer:
        for number, (name, label) in enumerate(tqdm(lines, desc="convert", unit="img", disable=not progress)):
            path = root + name
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                image = decode_image(raw, name=repr(path), color=color, orient=True)
            except (OSError, ImageDecodeError) as exc:
                log.warning("skipping %r: %s", path, exc)
                skipped.append(path)
                continue
            if resize_height:
                image = resize_bilinear(image, resize_height, resize_width)
            if check_size and first_shape is not None and image.shape != first_shape:
                raise ValueError(
                    f"{path!r} is {'×'.join(map(str, image.shape))} but the first image is "
                    f"{'×'.join(map(str, first_shape))} (--check-size). The database at "
                    f"{db_path!r} is incomplete: delete it and convert with --resize-height/--resize-width."
                )
            first_shape = first_shape or image.shape
            if encoded:
                want = encode_type or _extension(name) or "png"
                # As convert_imageset: the file as it is whenever it needs no resize and has
                # the wanted format (a gray file too: the layer's force_color decides later).
                if not resize_height and _same_format(name, want):
                    data = raw
                else:
                    data = _encode(image, want)
                datum = Datum(data=data, label=label, encoded=True)
            else:
                chw = image[:, :, ::-1].transpose(2, 0, 1)  # RGB H×W×C -> Caffe's BGR C×H×W
                h, w, c = image.shape
                datum = Datum(channels=c, height=h, width=w, data=np.ascontiguousarray(chw).tobytes(), label=label)
            writer.put(f"{number:08d}_{name}".encode("utf-8", "surrogateescape"), encode_datum(datum))
    if skipped:
        log.warning("skipped %d of %d images that could not be read", len(skipped), len(lines))
    return {
        "db": db_path,
        "written": writer.puts,
        "skipped": len(skipped),
        "skipped_paths": skipped,
        "shape": first_shape,
        "encoded": bool(encoded),
        "seconds": time.perf_counter() - start,
    }


def _iter_items(db: str, progress: bool, desc: str) -> Any:
    source = LMDBSource(db, allow_varying_sizes=True)
    try:
        for i in tqdm(range(len(source)), desc=desc, unit="rec", disable=not progress):
            yield source, i
    finally:
        source.close()


def inspect_db(db: str | os.PathLike[str], *, first: int = 5, progress: bool = False) -> dict[str, Any]:
    """Count, first keys, kinds and shapes of the first records, and the label histogram of an LMDB.

    Labels are read from every record without decoding images (the Datum is walked,
    its pixel bytes are skipped).
    """
    db = os.fspath(db)
    source = LMDBSource(db, allow_varying_sizes=True)
    labels: collections.Counter[int] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    try:
        for i in tqdm(range(len(source)), desc="inspect", unit="rec", disable=not progress):
            value = source._value(i)
            if is_array_record(value):
                kinds["array"] += 1
                rec = decode_record(value)
                if "label" in rec and rec["label"].size == 1:
                    labels[int(rec["label"])] += 1
                continue
            datum = decode_datum(value)
            kinds["encoded" if datum.encoded else "float" if datum.float_data is not None else "raw"] += 1
            labels[datum.label] += 1
        firsts = []
        for i in range(min(first, len(source))):
            item = source[i]
            shapes = {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in item.items()}
            firsts.append({"key": source.key(i).decode("utf-8", "replace"), "shapes": shapes})
    finally:
        source.close()
    return {"db": db, "count": len(source), "kinds": dict(kinds), "first": firsts, "labels": dict(sorted(labels.items()))}


def compute_mean(
    db: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, bgr: bool = False, progress: bool = True
) -> dict[str, Any]:
    """The per-pixel mean image of an LMDB of images, H×W×C float32 (RGB, or BGR with ``bgr``).

    Accumulated as Caffe's ``compute_image_mean`` does: in float32, one record at a time in
    key order, then divided by the count in float32, so the values are Caffe's. A gray
    image (H×W, or a one-channel Datum) counts as C=1. Written to ``out`` as ``.npy``
    (H×W×C; ``.npy`` is appended to another name, as ``np.save`` does) or, for a name
    ending ``.binaryproto``, as the BlobProto bytes Caffe's tool writes (BGR 1×C×H×W). The
    file appears whole or not at all: it is written next to ``out`` and renamed.

    Raises:
        FileNotFoundError: no LMDB database at ``db``.
        ValueError: an empty database, a record without an ``image`` leaf, one that does
            not decode, an image that is not H×W or H×W×C, or images of different sizes
            (a mean image needs one size); each names the record and the remedy.
        OSError: writing ``out`` failed.

    Example:
        >>> compute_mean("train_lmdb", "mean.binaryproto")["channel_means"]  # doctest: +SKIP
        [104.0, 116.7, 122.7]
    """
    db = os.fspath(db)
    total, count = _image_sum(db, progress)
    mean = total / np.float32(count)  # float32, RGB as LMDBSource yields it
    if bgr and mean.shape[2] == 3:
        mean = np.ascontiguousarray(mean[:, :, ::-1])
    if out is not None:
        out = os.fspath(out)
        if out.endswith(".binaryproto"):
            caffe_mean = mean if bgr or mean.shape[2] == 1 else mean[:, :, ::-1]
            blob = encode_blobproto(caffe_mean.transpose(2, 0, 1))
            _write_whole(out, lambda f: f.write(blob))
        else:
            out = out if out.endswith(".npy") else out + ".npy"
            _write_whole(out, lambda f: np.save(f, mean, allow_pickle=False))
    return {"db": db, "count": count, "mean": mean, "out": out,
            "channel_means": mean.mean(axis=(0, 1)).tolist(), "order": "bgr" if bgr else "rgb"}


def _image_sum(db: str, progress: bool) -> tuple[np.ndarray, int]:
    """The float32 sum of every record's image (H×W×C; gray as C=1) and the record count."""
    total: np.ndarray | None = None
    count = 0
    for source, i in _iter_items(db, progress, "compute-mean"):
        record = source[i]
        where = f"record {i} (key {source.key(i)!r}) of {db!r}"
        if "image" not in record:
            raise ValueError(
                f"{where} has no 'image' leaf (it has {', '.join(map(repr, record))}); compute-mean "
                "averages images. Point it at a database of images: one convert wrote, or "
                "write_array_records with an 'image' array (H×W or H×W×C) in every record.")
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # gray: one channel, as Caffe's 1-channel Datum
        if image.ndim != 3 or image.dtype.kind not in "biuf":
            raise ValueError(
                f"{where} has an 'image' of shape {tuple(np.shape(record['image']))} and dtype "
                f"{image.dtype}; a mean image needs H×W (gray) or H×W×C real-valued images. "
                "Write the images in one of those layouts.")
        if total is None:
            total = np.zeros(image.shape, np.float32)
        elif image.shape != total.shape:
            raise ValueError(
                f"{where} is {'×'.join(map(str, image.shape))}, the first is "
                f"{'×'.join(map(str, total.shape))}; a mean image needs one size (convert with "
                "--resize-height/--resize-width)")
        total += image
        count += 1
    assert total is not None  # LMDBSource refuses an empty database
    return total, count


def _write_whole(path: str, write: Any) -> None:
    """Run ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``:
    a failure (a full disk, an interrupt) leaves no half-written file under either name."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        # os.open, not mkstemp: the file gets the umask's permissions, as open() would give it.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path!r}: {exc.strerror or exc}") from exc


# -- command line ------------------------------------------------------------------------


def _run_convert(args: argparse.Namespace) -> int:
    try:
        result = convert_imageset(
            args.root, args.list, args.db,
            resize_height=args.resize_height, resize_width=args.resize_width, gray=args.gray,
            shuffle=args.shuffle, seed=args.seed, encoded=args.encoded, encode_type=args.encode_type,
            check_size=args.check_size, progress=not args.quiet,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"convert: error: {exc}")
        return 1
    shape = "×".join(map(str, result["shape"])) if result["shape"] else "-"
    print(
        f"wrote {result['written']} records ({'encoded' if result['encoded'] else 'raw'}, first image "
        f"{shape}) to {result['db']} in {result['seconds']:.1f} s; skipped {result['skipped']} unreadable images"
    )
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_db(args.db, first=args.first, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"inspect: error: {exc}")
        return 1
    print(f"{info['db']}: {info['count']} records ({', '.join(f'{n} {k}' for k, n in info['kinds'].items())})")
    for rec in info["first"]:
        shapes = ", ".join(f"{k} {'×'.join(map(str, s)) or 'scalar'} {d}" for k, (s, d) in rec["shapes"].items())
        print(f"  {rec['key']}: {shapes}")
    print("labels: " + (", ".join(f"{k}: {n}" for k, n in info["labels"].items()) or "none"))
    return 0


def _run_compute_mean(args: argparse.Namespace) -> int:
    try:
        result = compute_mean(args.db, args.out, bgr=args.bgr, progress=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"compute-mean: error: {_error_text(exc)}")
        return 1
    means = result["channel_means"]
    names = ("BGR" if args.bgr else "RGB") if len(means) == 3 else ["gray"] if len(means) == 1 else [
        f"channel {i}" for i in range(len(means))]
    per_channel = ", ".join(f"{name} {m:.3f}" for name, m in zip(names, means, strict=True))
    print(f"mean of {result['count']} images ({'×'.join(map(str, result['mean'].shape))}) -> "
          f"{result['out']}; per channel: {per_channel}")
    return 0


def _error_text(exc: BaseException) -> str:
    """An error for the terminal: an OSError without its ``[Errno N]`` prefix, with its path."""
    if isinstance(exc, OSError) and exc.strerror:
        path = os.fsdecode(exc.filename) if exc.filename is not None else ""
        return exc.strerror if path in exc.strerror else f"{exc.strerror}: {path}"
    return str(exc)


def add_commands(subparsers: Any) -> None:
    """Add ``convert``, ``inspect`` and ``compute-mean`` to an argparse subparsers object (``func=`` set)."""
    p = subparsers.add_parser("convert", help="convert a Caffe image list into an LMDB of Datum records")
    p.add_argument("root", help="folder prefixed to every listed path (string concatenation)")
    p.add_argument("list", help="list file: 'path label' per line")
    p.add_argument("db", help="the new LMDB directory (must not exist)")
    p.add_argument("--resize-height", type=int, default=0)
    p.add_argument("--resize-width", type=int, default=0)
    p.add_argument("--gray", action="store_true", help="store one gray channel")
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines before numbering them")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--encoded", action="store_true", help="store encoded image bytes, not pixels")
    p.add_argument("--encode-type", default="", choices=["", "jpg", "jpeg", "png"], help="re-encode as this type")
    p.add_argument("--check-size", action="store_true", help="fail if an image's size differs from the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert)

    p = subparsers.add_parser("inspect", help="count, first keys, shapes and label histogram of an LMDB")
    p.add_argument("db")
    p.add_argument("--first", type=int, default=5, help="how many first records to show")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_inspect)

    p = subparsers.add_parser("compute-mean", help="per-pixel mean image of an LMDB (H×W×C float32 .npy)")
    p.add_argument("db")
    p.add_argument("out", help="output .npy (H×W×C) or .binaryproto (Caffe, BGR)")
    p.add_argument("--bgr", action="store_true", help="write the .npy in Caffe's BGR order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_compute_mean)
