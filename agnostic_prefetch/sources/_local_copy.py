"""A local copy of a file behind a URL, for readers that open local paths only.

Copied once, whole, in blocks, into a cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``,
then ``agnostic_prefetch/<kind>``), under a name unique to the URL; the object's signature
(size and ETag) is kept beside it, and a copy whose object changed is fetched again. A copy
appears under its name only when complete (written aside, then renamed), so processes that
copy the same file at once each get a whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from agnostic_prefetch.sources import _storage

__all__ = ["cache_root", "local_copy"]

log = logging.getLogger("agnostic_prefetch")
_BLOCK = 8 << 20


def cache_root(kind: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "agnostic_prefetch", kind)


def local_copy(url: str, storage_options: _storage.StorageOptions, cache_dir: str | None, kind: str) -> str:
    """The path of an up-to-date local copy of ``url``."""
    directory = cache_dir or cache_root(kind)
    name = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{os.path.basename(url.rstrip('/'))}"
    path, stamp = os.path.join(directory, name), os.path.join(directory, name + ".signature.json")
    signature = _storage.file_signature(url, storage_options)
    try:
        with open(stamp) as f:
            if json.load(f) == signature and os.path.getsize(path) == signature["size"]:
                return path
        log.info("%s changed since it was copied to %s: copying it again", url, path)
    except (OSError, ValueError):
        pass
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, _storage.open_binary(url, storage_options, block_size=_BLOCK) as src:
            shutil.copyfileobj(src, out, _BLOCK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(signature, f)
    os.replace(tmp, stamp)
    log.info("copied %s (%d bytes) to %s, for a reader of local files", url, signature["size"], path)
    return path
