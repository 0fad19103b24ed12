"""Files on local disk or behind an fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

One place decides how a file-based source opens, sizes, lists and fingerprints its files, so
every format reads object storage the same way: whole ranges per call (a block, a row group,
a run of records), never one small request per record. fsspec is imported only for URLs.

Credentials and endpoints come from where fsspec and boto read them (the environment,
``AWS_ENDPOINT_URL`` included, config files), or from ``storage_options``, which travels to
the workers with the source.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "f.bin")
    >>> _ = open(path, "wb").write(b"abcdef")
    >>> read_range(path, 2, 3)
    b'cde'
    >>> file_size(path)
    6
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from typing import IO, Any

__all__ = ["expand_paths", "file_signature", "file_size", "filesystem", "is_url", "join", "open_binary", "read_range",
           "StorageOptions"]

StorageOptions = Mapping[str, Any] | None

# Indexes the sources keep beside a data file (TFRecord's, a tar shard's): never data themselves.
INDEX_SUFFIXES = (".apidx", ".index.json")


def is_url(path: str) -> bool:
    """Whether ``path`` names a file through an fsspec protocol rather than local disk."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(path: str, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """The fsspec filesystem for URL ``path`` and the path within it."""
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            f"reading {path} needs fsspec and the filesystem for its protocol: "
            "pip install 'agnostic_prefetch[remote]' (fsspec, s3fs, gcsfs)") from None
    fs, inner = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    return fs, inner


def open_binary(path: str, storage_options: StorageOptions = None, *, block_size: int | None = None) -> IO[bytes]:
    """``path`` opened for reading bytes; a URL is read in blocks of ``block_size`` bytes."""
    if not is_url(path):
        return open(_local(path), "rb")  # noqa: SIM115 (the caller owns it)
    fs, inner = filesystem(path, storage_options)
    kwargs = {} if block_size is None else {"block_size": block_size}
    return fs.open(inner, "rb", **kwargs)


def read_range(path: str, start: int, length: int, storage_options: StorageOptions = None) -> bytes:
    """``length`` bytes of ``path`` from ``start``: one ranged request for a URL."""
    if not is_url(path):
        with open(_local(path), "rb") as f:
            f.seek(start)
            return f.read(length)
    fs, inner = filesystem(path, storage_options)
    return bytes(fs.cat_file(inner, start=start, end=start + length))


def file_size(path: str, storage_options: StorageOptions = None) -> int:
    if not is_url(path):
        return os.path.getsize(_local(path))
    fs, inner = filesystem(path, storage_options)
    return int(fs.size(inner))


def file_signature(path: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """What changes when the file does: its size and modification time (or an object's ETag),
    kept beside an index built from it so a stale index is noticed."""
    if not is_url(path):
        st = os.stat(_local(path))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, inner = filesystem(path, storage_options)
    fs.invalidate_cache(inner)  # (a listing cached in this process would hide a replaced object)
    info = fs.info(inner)
    tag = info.get("ETag") or info.get("etag") or info.get("md5") or info.get("mtime") or info.get("LastModified")
    return {"size": int(info["size"]), "tag": str(tag) if tag is not None else None}


def expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                 storage_options: StorageOptions = None, *, what: str = "files") -> list[str]:
    """A path, a glob, a directory's files, or a list of them, as a sorted-within-glob list.

    A directory gives the files under it, at any depth, sorted by path, leaving out names
    that begin with ``.`` or ``_`` (``_SUCCESS``, ``_metadata``, as Arrow's datasets do) and
    the sources' own indexes (``*.apidx``, ``*.index.json``).

    Raises:
        FileNotFoundError: a path or glob that names nothing, or a directory with no files,
            naming it.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        if is_url(text):
            fs, inner = filesystem(text, storage_options)
            protocol = text.split("://", 1)[0]
            if glob.has_magic(inner):
                found = sorted(fs.glob(inner))
            elif fs.isdir(inner):
                found = _data_files(inner, sorted(fs.find(inner)))
            else:
                found = [inner] if fs.exists(inner) else []
            out += [f"{protocol}://{f}" if "://" not in f else f for f in found]
        else:
            local = _local(text)
            if glob.has_magic(local):
                found = sorted(glob.glob(local))
            elif os.path.isdir(local):
                found = _data_files(local, sorted(os.path.join(d, f) for d, _, files in os.walk(local) for f in files))
            else:
                found = [local] if os.path.exists(local) else []
            out += found
        if not found:
            raise FileNotFoundError(f"no {what} at {text}: check the path (or the glob, or the bucket and "
                                    "credentials for a URL)")
    return out


def _data_files(directory: str, files: list[str]) -> list[str]:
    """``files`` (under ``directory``) less hidden ones, those under hidden folders, and indexes."""
    kept = []
    for path in files:
        parts = path[len(directory):].replace(os.sep, "/").strip("/").split("/")
        if not any(p.startswith((".", "_")) for p in parts) and not parts[-1].endswith(INDEX_SUFFIXES):
            kept.append(path)
    return kept


def join(directory: str, name: str) -> str:
    """``name`` inside ``directory``, a local path or a URL."""
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)
