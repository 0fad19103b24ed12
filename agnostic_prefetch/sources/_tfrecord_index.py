"""The record offsets of a TFRecord file: found by one sequential scan of its frame headers,
saved as a small ``.npz`` with the file's signature, and reused while the file is unchanged.

A TFRecord frame is ``uint64 length | uint32 masked crc32c(length) | data | uint32 masked
crc32c(data)``, little-endian. The scan reads 12 header bytes per record and skips the data:
a header whose CRC does not match (a corrupt length) stops it, since nothing after it can be
found again; a data CRC is checked only when the record is read, so a record with bad data
is indexed and raises then (``on_error="skip"`` leaves it out).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from typing import Any

import numpy as np

from agnostic_prefetch.sources import _storage
from agnostic_prefetch.sources._crc32c import masked_crc32c
from agnostic_prefetch.sources._local_copy import cache_root

__all__ = ["FORMAT", "INDEX_SUFFIX", "TFRecordError", "index_location", "load_or_build", "scan"]

log = logging.getLogger("agnostic_prefetch")

FORMAT = "agnostic_prefetch tfrecord index 1"
INDEX_SUFFIX = ".apidx"  # a glob result with this ending is an index, never a TFRecord file
HEADER, FOOTER = 12, 4
_SCAN_BLOCK = 8 << 20  # bytes per request while scanning a URL


class TFRecordError(ValueError):
    """A TFRecord file that cannot be read as one: the message names the file, the record,
    its byte offset and the remedy."""


def _compression(path: str, head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b" or path.endswith(".gz"):
        return "GZIP"
    if len(head) >= 2 and head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0 or path.endswith(".zlib"):
        return "ZLIB"
    return None


def _refuse_compressed(path: str, kind: str) -> TFRecordError:
    return TFRecordError(
        f"{path} looks {kind}-compressed (its first bytes are no TFRecord frame"
        f"{' and it starts with the gzip magic 1f 8b' if kind == 'GZIP' else ''}): a compressed "
        "TFRecord file has no random access. Remedy: decompress it once (for GZIP: gunzip it, or "
        f"read it with tf.data.TFRecordDataset(path, compression_type={kind!r}) and write it again "
        "with tf.io.TFRecordWriter without compression), then pass the uncompressed file.")


def scan(path: str, storage_options: _storage.StorageOptions = None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of every record of ``path``: each frame's first byte and data size.

    Raises:
        TFRecordError: a compressed file, a header whose CRC fails (a corrupt length), or a
            record running past the end of the file (truncated), naming the record and offset.
    """
    size = _storage.file_size(path, storage_options)
    offsets: list[int] = []
    lengths: list[int] = []
    pos = 0
    with _storage.open_binary(path, storage_options, block_size=_SCAN_BLOCK) as raw:
        f = raw if _storage.is_url(path) else io.BufferedReader(raw, 1 << 16)
        while pos < size:
            f.seek(pos)
            header = f.read(HEADER)
            record = len(offsets)
            if len(header) < HEADER:
                raise TFRecordError(
                    f"{path} is truncated: record {record} at byte offset {pos} has {len(header)} of "
                    f"its {HEADER} header bytes before the file ends at {size}. Remedy: copy or "
                    f"write the file again; or cut it at byte {pos} to keep the {record} records before.")
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != crc:
                kind = _compression(path, header) if record == 0 else None
                if kind:
                    raise _refuse_compressed(path, kind)
                raise TFRecordError(
                    f"{path}: record {record} at byte offset {pos} has a corrupt length (the length "
                    f"field says {length} bytes; its CRC does not match), so no record after it can be "
                    f"found. Remedy: write the file again; or cut it at byte {pos} to keep the "
                    f"{record} records before.")
            if pos + HEADER + length + FOOTER > size:
                raise TFRecordError(
                    f"{path} is truncated: record {record} at byte offset {pos} holds {length} bytes "
                    f"but the file ends {size - pos - HEADER} bytes after its header (file size "
                    f"{size}). Remedy: copy or write the file again; or cut it at byte {pos} to keep "
                    f"the {record} records before.")
            offsets.append(pos)
            lengths.append(length)
            pos += HEADER + length + FOOTER
    return np.array(offsets, np.int64), np.array(lengths, np.int64)


def index_location(path: str, index_dir: str | None) -> str:
    """Where ``path``'s index lives: under ``index_dir`` if given; else next to a local file in a
    writable directory (``<file>.apidx``); else (a URL, a read-only directory) in the user's
    cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, ``/agnostic_prefetch/tfrecord-index``)."""
    unique = f"{hashlib.sha256(path.encode()).hexdigest()[:16]}-{os.path.basename(path.rstrip('/'))}{INDEX_SUFFIX}"
    if index_dir is not None:
        return os.path.join(os.fspath(index_dir), unique)
    if not _storage.is_url(path):
        beside = os.path.abspath(path[len("file://"):] if path.startswith("file://") else path) + INDEX_SUFFIX
        if os.path.exists(beside) or os.access(os.path.dirname(beside), os.W_OK):
            return beside
    return os.path.join(cache_root("tfrecord-index"), unique)


def _load(location: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    try:
        with np.load(location, allow_pickle=False) as saved:
            if str(saved["format"]) != FORMAT:
                return None
            return saved["offsets"], saved["lengths"], json.loads(str(saved["signature"]))
    except FileNotFoundError:
        return None
    except Exception as exc:  # an unreadable index is rebuilt, never trusted
        log.warning("the TFRecord index %s cannot be read (%s: %s); building it again", location,
                    type(exc).__name__, exc)
        return None


def _save(location: str, offsets: np.ndarray, lengths: np.ndarray, signature: dict[str, Any]) -> bool:
    try:
        os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".apidx-", dir=os.path.dirname(location) or ".")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, offsets=offsets, lengths=lengths, signature=np.array(json.dumps(signature)),
                     format=np.array(FORMAT))
        os.replace(tmp, location)  # readers never see half an index
        return True
    except OSError as exc:
        log.warning("the TFRecord index cannot be saved at %s (%s); it is kept in memory only. "
                    "Remedy: pass index_dir= a writable directory", location, exc)
        return False


def load_or_build(path: str, storage_options: _storage.StorageOptions, index_dir: str | None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    """(offsets, lengths, the file's signature, the index's location) for ``path``: the saved
    index while its signature matches the file's, else a new scan, saved (and logged)."""
    signature = _storage.file_signature(path, storage_options)
    location = index_location(path, index_dir)
    saved = _load(location)
    if saved is not None and saved[2] == signature:
        return saved[0], saved[1], signature, location
    if saved is not None:
        log.info("the TFRecord file %s changed since its index %s was built (%s, now %s): "
                 "building it again", path, location, saved[2], signature)
    offsets, lengths = scan(path, storage_options)
    if _save(location, offsets, lengths, signature):
        log.info("indexed %d records of %s; index saved at %s", len(offsets), path, location)
    return offsets, lengths, signature, location
