"""A shard's ``.npy``, ``.npz`` and ``.gz`` members decoded without allocating more than their
bytes, or a stated bound, allow.

``np.load`` on bytes allocates the array its header asks for before reading the data, so a
corrupt header (a shape of 2**40 elements) costs that much memory before failing; here the
header is read first and its shape × item size checked against the bytes that follow it.
Decompression (gzip, an ``.npz``'s deflated entries) stops one byte past ``limit``.

Example:
    >>> import io, gzip
    >>> out = io.BytesIO(); np.save(out, np.arange(3))
    >>> load_npy(out.getvalue(), name="k.npy")
    array([0, 1, 2])
    >>> gunzip(gzip.compress(b"abc"), name="k.txt.gz", limit=3)
    b'abc'
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["DEFAULT_LIMIT", "gunzip", "load_npy", "load_npz"]

DEFAULT_LIMIT = 1 << 30  # bytes a decompressed member may hold unless the source says otherwise
_SKIP = "or pass on_error='skip' to the Loader to leave the sample out"


def _too_large(name: str, limit: int) -> ValueError:
    return ValueError(
        f"{name} decompresses to more than {limit} bytes (max_sample_bytes={limit}). Remedy: pass a "
        f"larger max_sample_bytes to WebDatasetSource if members this large are expected, {_SKIP}.")


def load_npy(data: bytes, *, name: str) -> np.ndarray:
    """The array of ``.npy`` bytes, its header checked against the bytes that follow it.

    Raises:
        ValueError: a malformed header, one asking for more bytes than follow it, or an
            object dtype (never unpickled), naming ``name``.
    """
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:  # (3, 0): a utf-8 header, which numpy reads with no public function
            shape, _, dtype = npy_format._read_array_header(f, version)
        needed, available = math.prod(shape) * dtype.itemsize, len(data) - f.tell()
        if not dtype.hasobject and needed > available:
            raise ValueError(
                f"its header says shape {shape} of {dtype} ({needed} bytes) but {available} bytes "
                "follow the header: the member is truncated or its header corrupt. Remedy: write the "
                f"sample again (np.save), {_SKIP}")
        f.seek(0)
        return np.load(f, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"cannot decode {name} as .npy: {exc}") from None


def load_npz(data: bytes, *, name: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """``dict(np.load(npz))``: entry name (less ``.npy``) → array, or the entry's bytes if it is
    no ``.npy``; the entries decompress to at most ``limit`` bytes together.

    Raises:
        ValueError: no zip file, a corrupt entry, an entry's header asking for more bytes than
            it holds, or more than ``limit`` bytes in all, naming ``name`` and the entry.
    """
    out: dict[str, Any] = {}
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                with archive.open(info) as entry:
                    raw = entry.read(limit - total + 1)
                total += len(raw)
                if total > limit:
                    raise _too_large(f"{name} (at its entry {info.filename!r})", limit)
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"entry {info.filename!r} of {name}"
                out[key] = load_npy(raw, name=where) if raw.startswith(npy_format.MAGIC_PREFIX) else raw
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise ValueError(f"cannot decode {name} as .npz: {exc}") from None
    return out


def gunzip(data: bytes, *, name: str, limit: int = DEFAULT_LIMIT) -> bytes:
    """``gzip.decompress(data)`` (every member, zero padding between them skipped), stopping
    one byte past ``limit``.

    Raises:
        ValueError: no gzip data, a truncated or corrupt stream, or more than ``limit`` bytes,
            naming ``name``.
    """
    pieces, size = [], 0
    while data:
        stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # a gzip header and trailer
        try:
            piece = stream.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise ValueError(f"cannot decompress {name}: {exc}") from None
        size += len(piece)
        if size > limit:
            raise _too_large(name, limit)
        if not stream.eof:
            raise ValueError(f"cannot decompress {name}: the gzip stream ends before its end marker "
                             f"(truncated). Remedy: write the sample again, {_SKIP}.")
        pieces.append(piece)
        data = stream.unused_data.lstrip(b"\0")
    return b"".join(pieces)
