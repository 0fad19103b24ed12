"""The member index of a tar file: where each regular file's data starts and how long it is.

Built once per tar by reading the headers only (each 512-byte header, then a seek over the
data), kept as JSON next to the tar or in an index directory, and reused while the tar's
signature (:func:`_storage.file_signature`: size and mtime, or an object's ETag) is
unchanged. The headers are read as Python's ``tarfile`` reads them (ustar prefixes, GNU long
names ``L``, pax ``x`` headers with ``path=`` and ``size=``, base-256 sizes), with one
difference: a header with a bad checksum is an error here, where ``tarfile`` (and so
webdataset) quietly ends the archive there.

Example:
    >>> import io, os, tarfile, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.tar")
    >>> with tarfile.open(path, "w") as tar:
    ...     info = tarfile.TarInfo("a.txt"); info.size = 3
    ...     tar.addfile(info, io.BytesIO(b"abc"))
    >>> scan_tar(path)
    [('a.txt', 512, 3)]
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any

from agnostic_prefetch.sources import _storage

__all__ = ["INDEX_SUFFIX", "TarFormatError", "index_path", "load_or_build", "scan_tar"]

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = {b"0", b"\0", b"7"}  # tarfile's REGULAR_TYPES less GNU sparse, which is refused
_NO_DATA = {b"1", b"2", b"3", b"4", b"5", b"6"}  # links, devices, directories, fifos: tarfile skips no data
_GNU = {b"L", b"K", b"S"}
_META_LIMIT = 1 << 20  # a long name or pax header beyond this is corrupt, not read
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_VERSION = 1
INDEX_SUFFIX = ".index.json"  # a glob result with this ending is an index, never a shard
_REWRITE = ("Remedy: restore the shard from its source, or write it again (webdataset's TarWriter, "
            "or tar -cf).")


class TarFormatError(ValueError):
    """A tar file that cannot be indexed: corrupt, truncated, compressed or unsupported."""


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str, where: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the first byte's high bit is set.

    Raises:
        TarFormatError: text that is no octal number, naming the field and ``where``.
    """
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip() or b"0"
    try:
        return int(text, 8)  # what tarfile takes, "0o7" and "-1" included
    except ValueError:
        raise TarFormatError(f"{where}: its {what} field {text!r} is no octal number. {_REWRITE}") from None


def _checksums(header: bytes) -> tuple[int, int]:
    """The header's sum with its checksum field read as spaces, unsigned and signed (tarfile accepts both)."""
    rest = header[:148] + header[156:]
    unsigned = 256 + sum(rest)
    signed = 256 + sum(b - 256 if b > 127 else b for b in rest)
    return unsigned, signed


def _pax(data: bytes, where: str) -> dict[str, str]:
    """The records ``"<length> <key>=<value>\\n"`` of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        if length <= 0 or pos + length > len(data):
            raise TarFormatError(f"{where}: a pax header record is malformed. {_REWRITE}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _pax_size(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TarFormatError(f"{where}: the pax header before it says size={text!r}, no decimal "
                             f"number. {_REWRITE}") from None


def _read_exact(f: IO[bytes], offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def scan_tar(path: str, storage_options: _storage.StorageOptions = None) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in the tar at ``path``, in order.

    Raises:
        TarFormatError: a compressed file, a truncated one, a header with a bad checksum, a
            member whose data runs past the end, or GNU sparse members; naming the byte offset.
    """
    size = _storage.file_size(path, storage_options)
    members: list[tuple[str, int, int]] = []
    # URLs are read in large blocks, so the headers of small members come with one request.
    with _storage.open_binary(path, storage_options, block_size=1 << 22) as f:
        head = f.read(6)
        for magic, kind in _MAGIC.items():
            if head.startswith(magic):
                raise TarFormatError(
                    f"{path} is {kind}-compressed: a compressed tar has no random access. Remedy: "
                    f"decompress the shards (e.g. gunzip, or python -m {kind} -d), or write them "
                    "uncompressed (TarWriter('shard.tar')); images and npy inside stay as they are.")
        offset, long_name, pax = 0, None, {}
        while offset < size:
            header = _read_exact(f, offset, _BLOCK)
            after = members[-1][0] if members else "the start"
            if len(header) < _BLOCK:
                raise TarFormatError(
                    f"{path} is truncated: the tar header at byte {offset} (after {after}) has "
                    f"{len(header)} of {_BLOCK} bytes; the file ends at byte {size}. {_REWRITE}")
            if header == _ZERO:
                break  # end of archive (tarfile stops at the first zero block too)
            where = f"{path}: the tar header at byte {offset} (after {after})"
            stored = _number(header[148:156], "checksum", where)
            if stored not in _checksums(header):
                raise TarFormatError(
                    f"{path}: the tar header at byte {offset} (after {after}) has a bad checksum "
                    f"(stored {stored}, computed {_checksums(header)[0]}): the shard is corrupt there. "
                    f"{_REWRITE}")
            kind = header[156:157]
            name = _text(header[0:100])
            prefix = _text(header[345:500])
            if prefix and kind not in _GNU:
                name = f"{prefix}/{name}"
            length = _pax_size(pax["size"], where) if "size" in pax else _number(header[124:136], "size", where)
            data = offset + _BLOCK
            if length < 0 or (kind not in _NO_DATA and data + length > size):
                raise TarFormatError(
                    f"{path}: member {long_name or pax.get('path') or name!r} (header at byte {offset}) "
                    f"says {length} bytes of data from byte {data}, but the file ends at byte {size}: "
                    f"it is truncated or the header is corrupt. {_REWRITE}")
            following = data + -(-length // _BLOCK) * _BLOCK
            if kind in (b"L", b"x", b"K", b"g"):
                if length > _META_LIMIT:
                    raise TarFormatError(
                        f"{path}: the {kind.decode()} header at byte {offset} says {length} bytes, "
                        f"more than {_META_LIMIT} a name or pax header can sensibly hold. {_REWRITE}")
                meta = _read_exact(f, data, length)
                if kind == b"L":
                    long_name = _text(meta)
                elif kind == b"x":
                    pax = _pax(meta, f"{path} at byte {offset}")
                    if any(k.startswith("GNU.sparse") for k in pax):
                        raise _sparse(path, offset)
                offset = following  # 'K' (long link name) and 'g' (global pax) name no file
                continue
            if kind == b"S":
                raise _sparse(path, offset)
            name = long_name or pax.get("path") or name
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                members.append((name, data, length))
            offset = data if kind in _NO_DATA else following
            long_name, pax = None, {}
    return members


def _sparse(path: str, offset: int) -> TarFormatError:
    return TarFormatError(
        f"{path}: the member at byte {offset} is a GNU sparse file, which has no plain byte range. "
        "Remedy: write the tar without --sparse.")


def index_path(shard: str, index_dir: str | os.PathLike[str] | None) -> str:
    """Where the index of ``shard`` lives: next to a local shard, else under ``index_dir``
    (or the user cache directory: ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``agnostic_prefetch/tar_index``), named by the shard's name and a hash of its full path."""
    if index_dir is None and not _storage.is_url(shard):
        local = shard[len("file://"):] if shard.startswith("file://") else shard
        if os.access(os.path.dirname(os.path.abspath(local)) or ".", os.W_OK):
            return f"{local}{INDEX_SUFFIX}"
    if index_dir is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        index_dir = os.path.join(cache, "agnostic_prefetch", "tar_index")
    digest = hashlib.sha1(shard.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(os.fspath(index_dir), f"{os.path.basename(shard.rstrip('/'))}.{digest}{INDEX_SUFFIX}")


def _read_index(where: str, signature: dict[str, Any]) -> list[tuple[str, int, int]] | None:
    try:
        with open(where, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("version") != _VERSION or saved.get("signature") != signature:
        return None  # another format, or the shard changed since: rebuilt
    return [(str(n), int(o), int(s)) for n, o, s in saved["members"]]


def load_or_build(shard: str, storage_options: _storage.StorageOptions = None,
                  index_dir: str | os.PathLike[str] | None = None) -> tuple[list[tuple[str, int, int]], dict[str, Any]]:
    """The members of ``shard`` and its signature: from its saved index while the signature
    matches, else scanned and saved (atomically) for next time."""
    signature = _storage.file_signature(shard, storage_options)
    where = index_path(shard, index_dir)
    members = _read_index(where, signature)
    if members is None:
        members = scan_tar(shard, storage_options)
        os.makedirs(os.path.dirname(where) or ".", exist_ok=True)
        # hidden while written, so a glob over the shards never matches it
        temporary = os.path.join(os.path.dirname(where), f".{os.path.basename(where)}.{os.getpid()}.tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"version": _VERSION, "shard": shard, "signature": signature,
                       "members": members}, f, separators=(",", ":"))
        os.replace(temporary, where)
    return members, signature
