"""Small sources for the tests; importable by workers (no test framework imports here)."""

from __future__ import annotations

import os
import time

import numpy as np


class Counting:
    """Record i is {"x": i repeated in a (3, 2) float32 array, "i": i}.

    Records in ``slow`` take ``delay`` seconds, except in the process that built the source
    (the parent reads one example there to lay out the ring).
    """

    def __init__(self, n, slow=None, delay=0.0):
        self.n, self.slow, self.delay = n, set(slow or ()), delay
        self.owner = os.getpid()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.slow and os.getpid() != self.owner:
            time.sleep(self.delay)
        return {"x": np.full((3, 2), i, np.float32), "i": i}


class Failing(Counting):
    """Raises on the given record indices."""

    def __init__(self, n, bad):
        super().__init__(n)
        self.bad = set(bad)

    def __getitem__(self, i):
        if i in self.bad:
            raise KeyError(f"record {i} is corrupt")
        return super().__getitem__(i)


class Env:
    """Reports what the worker process sees: its env, pid and SIGINT disposition."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import signal

        return {"omp": os.environ.get("OMP_NUM_THREADS", ""), "pid": os.getpid(),
                "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "i": i}


class Hanging(Counting):
    def __getitem__(self, i):
        if i == 5:
            time.sleep(3600)
        return super().__getitem__(i)


class Dying(Counting):
    def __getitem__(self, i):
        if i == 3:
            os._exit(7)
        return super().__getitem__(i)


class ImportsFramework(Counting):
    def __getitem__(self, i):
        import sys
        import types

        sys.modules.setdefault("cupy", types.ModuleType("cupy"))  # stands in for a real import
        return super().__getitem__(i)


def add_noise(example, rng):
    return {**example, "noise": rng.standard_normal(2).astype(np.float32)}


class NamedRows:
    """Rows with a file name each: batches carry a list of strings next to the array."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        return {"x": np.full(3, i, np.float32), "name": f"row{i}.jpg"}


def rows_loader(rows: int = 10, batch_size: int = 2, **kwargs):
    """A workers=0 loader over ``rows`` rows of 4 float32: row r holds 4r .. 4r+3."""
    import agnostic_prefetch as ap

    source = ap.ArraySource({"x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)})
    return ap.Loader(source, batch_size, **{"workers": 0, **kwargs})


def lease_holder(leaf: np.ndarray) -> np.ndarray:
    """For a loader batch, the uint8 array over its ring slot, whose death ends the slot's
    lease (see _slots.py); for any other array, the array itself."""
    return leaf.base if isinstance(leaf.base, np.ndarray) else leaf


def in_a_worker(owner: int) -> bool:
    """True in a worker process or a worker thread, False where the loader lays out its ring."""
    import threading

    return os.getpid() != owner or threading.current_thread().name.startswith("agnostic_prefetch-worker")


class SlowFrom(Counting):
    """Records from ``first`` on take ``delay`` seconds each, in worker processes and threads."""

    def __init__(self, n, first, delay):
        super().__init__(n)
        self.first, self.delay = first, delay

    def __getitem__(self, i):
        if i >= self.first and in_a_worker(self.owner):
            time.sleep(self.delay)
        return super().__getitem__(i)


class OnHost:
    """The placement of a CPU framework that aliases host memory (JAX on the CPU, torch CPU);
    ``put_s``: seconds each placement takes (a slow transfer)."""

    def __init__(self, put_s: float = 0.0) -> None:
        self.put_s = put_s

    def put(self, host):
        if self.put_s:
            time.sleep(self.put_s)
        return host, None

    def hand_out(self, device, token) -> None:
        pass

    def done(self, token) -> bool:
        return True

    def close(self) -> None:
        pass


class Doubled:
    """A source that orders itself over an index space twice its length: ``n`` records,
    each read two ways (index ``2 * record + side``); record ``i`` of it reads
    ``{"i": 10000 * tag + index}``.

    Each epoch of its order is the first ``per_epoch`` indices (default all ``2 * n``) of a
    permutation of ``range(2 * n)`` from ``(seed, epoch)``, in batches of ``batch_size``:
    no index twice in an epoch, and with the default every index once.
    """

    def __init__(self, n: int, tag: int = 0, per_epoch: int | None = None) -> None:
        self.n, self.tag = n, tag
        self.per_epoch = 2 * n if per_epoch is None else per_epoch

    def __len__(self) -> int:
        return self.n

    @property
    def index_space(self) -> int:
        return 2 * self.n

    def __getitem__(self, index: int):
        if not 0 <= index < 2 * self.n:
            raise IndexError(f"index {index} out of range for {2 * self.n} indices")
        return {"i": np.int64(10000 * self.tag + index)}

    def batch_order(self, *, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(2 * self.n)[: self.per_epoch]
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    @property
    def order_fingerprint(self) -> dict:
        return {"doubled": self.n, "per_epoch": self.per_epoch}


class Records:
    """Record i is ``records[i]``, as given (a list of example trees)."""

    def __init__(self, records):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class TorchDataset:
    """A torch ``Dataset`` as users write them: tensors in items, torch imported by the source.

    Each item also reports what its worker sees: torch's thread counts and whether CUDA was
    initialised there.
    """

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        return {"x": torch.full((3,), float(i)), "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
                "cuda_initialized": bool(torch.cuda.is_initialized())}
