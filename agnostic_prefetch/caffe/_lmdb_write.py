"""Writing a new LMDB: chunked commits, and a memory map that grows when it fills.

LMDB needs its map size up front; Caffe asks for a terabyte of sparse file. We start
small and double the map whenever a commit hits ``MapFullError``, retrying the chunk,
so a database on a filesystem without sparse files costs only what it holds.
"""

from __future__ import annotations

import os

import lmdb

__all__ = ["LMDBWriter"]


class LMDBWriter:
    """Puts key/value pairs into a new LMDB directory, committing every ``chunk`` puts.

    Args:
        path: a directory that must not exist yet (or be empty).
        chunk: puts per transaction (Caffe's convert_imageset commits every 1000).
        map_size: the initial map size in bytes; doubled as needed.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory.
    """

    def __init__(self, path: str, *, chunk: int = 1000, map_size: int = 1 << 28) -> None:
        path = os.fspath(path)
        if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
            raise FileExistsError(
                f"{path!r} already exists; refusing to write into it. Remove it or choose "
                "another path for the new database."
            )
        self.path = path
        self.chunk = int(chunk)
        self.map_size = int(map_size)
        self.puts = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self._env = lmdb.open(path, map_size=self.map_size, subdir=True, meminit=False, map_async=True)

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        if len(self._pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
            except lmdb.MapFullError:
                # the failed transaction was aborted; grow the map and write the chunk again
                self.map_size *= 2
                self._env.set_mapsize(self.map_size)
                continue
            self.puts += len(self._pending)
            self._pending.clear()

    def close(self) -> None:
        if self._env is not None:
            try:
                self.flush()
                self._env.sync(True)
            finally:
                self._env.close()
                self._env = None

    def __enter__(self) -> LMDBWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
