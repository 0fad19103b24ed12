"""Sources that kill the worker reading them; importable by workers."""

from __future__ import annotations

import os
import signal
import time

import numpy as np


class Slowish:
    """Record i is {"x": i, "v": (4,) float32 of i}; each takes ``delay`` seconds in a worker."""

    def __init__(self, n, delay=0.002):
        self.n, self.delay, self.owner = n, delay, os.getpid()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if os.getpid() != self.owner:
            time.sleep(self.delay)
        return {"x": np.int64(i), "v": np.full(4, i, np.float32)}

    def locate(self, i):
        return f"line {i + 1} of slowish.txt"


class Killing(Slowish):
    """Records in ``bad`` kill the worker process reading them (``how``: "abort", "segv", "exit")."""

    def __init__(self, n, bad, how="abort", delay=0.0):
        super().__init__(n, delay)
        self.bad, self.how = set(bad), how

    def __getitem__(self, i):
        if i in self.bad and os.getpid() != self.owner:
            if self.how == "abort":
                os.abort()
            if self.how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(9)
        return super().__getitem__(i)


class Raising(Slowish):
    """Records in ``bad`` raise (the same records as ``Killing``, as an ordinary bad record)."""

    def __init__(self, n, bad):
        super().__init__(n, 0.0)
        self.bad = set(bad)

    def __getitem__(self, i):
        if i in self.bad:
            raise ValueError(f"record {i} is bad")
        return super().__getitem__(i)


def noisy(example, rng):
    return {**example, "noise": rng.standard_normal(3).astype(np.float32)}
