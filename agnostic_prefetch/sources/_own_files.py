"""The user's paths expanded, with the index files a source saves beside its data left out.

A source that saves an index beside each data file (``<file>.apidx`` for TFRecord,
``<shard>.index.json`` for tar shards) must not read that index back as data the next time
the same glob (``mnist-train.tfrecord-*``, ``shards/*``) matches it: whatever the data files
are called, a path the glob or a directory listing gave that ends with the source's index
suffix is left out. A path named exactly is kept (and read as data, as asked).

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for name in ("a-0", "a-0.apidx"):
    ...     _ = open(os.path.join(folder, name), "wb").write(b"")
    >>> [os.path.basename(p) for p in expand_data_paths(os.path.join(folder, "a-*"), index_suffix=".apidx")]
    ['a-0']
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from agnostic_prefetch.sources import _storage

__all__ = ["expand_data_paths"]


def expand_data_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                      storage_options: _storage.StorageOptions = None, *, index_suffix: str,
                      what: str = "files") -> list[str]:
    """:func:`_storage.expand_paths` of each item, less the matches ending with ``index_suffix``.

    Raises:
        FileNotFoundError: an item that names nothing, or only index files, naming it.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        found = _storage.expand_paths(text, storage_options, what=what)
        if found == [text] or found == [text[len("file://"):]]:
            out += found  # named exactly, not matched
            continue
        kept = [f for f in found if not f.endswith(index_suffix)]
        if not kept:
            raise FileNotFoundError(
                f"no {what} at {text}: it matches only the {len(found)} index file(s) (*{index_suffix}) "
                "this source saves beside its files. Remedy: check the pattern names the data files.")
        out += kept
    return out
