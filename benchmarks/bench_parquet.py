"""ParquetSource rates, one process, local disk: shuffled batches with and without the row-group cache,
and sequential batches (200,000 rows in 4 files of 10,000-row groups; id, x, 32 int32 tokens).

Run: python benchmarks/bench_parquet.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agnostic_prefetch.sources.parquet import ParquetSource

ROWS, BATCH, TIMED = 200_000, 64, 20_000


def main() -> None:
    rng = np.random.default_rng(0)
    where = tempfile.mkdtemp()
    for f in range(4):
        n = ROWS // 4
        tokens = pa.array([rng.integers(0, 1000, 32).astype(np.int32) for _ in range(n)], pa.list_(pa.int32()))
        pq.write_table(pa.table({"id": np.arange(n), "x": rng.random(n, dtype=np.float32), "tokens": tokens}),
                       os.path.join(where, f"{f}.parquet"), row_group_size=10_000)
    files = os.path.join(where, "*.parquet")
    order = rng.permutation(ROWS).tolist()
    for cache in (256 << 20, 0):
        source = ParquetSource(files, cache_bytes=cache)
        started = time.perf_counter()
        for k in range(0, TIMED, BATCH):
            source.__getitems__(order[k:k + BATCH])
        print(f"shuffled batches of {BATCH}, cache {cache >> 20} MiB: {TIMED / (time.perf_counter() - started):.0f} items/s")
    source = ParquetSource(files)
    started = time.perf_counter()
    for k in range(0, ROWS, BATCH):
        source.__getitems__(list(range(k, min(k + BATCH, ROWS))))
    print(f"sequential batches of {BATCH}: {ROWS / (time.perf_counter() - started):.0f} items/s")


if __name__ == "__main__":
    main()
