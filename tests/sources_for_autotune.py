"""Sources for the workers="auto" tests; importable by workers (no test framework imports here)."""

from __future__ import annotations

import os
import time

import numpy as np


class Waiting:
    """Record i is {"x": i in a float32[4], "i": i}; each read waits ``wait_s`` (I/O, little CPU)."""

    def __init__(self, n, wait_s=0.002, thread_safe=False):
        self.n, self.wait_s = n, wait_s
        self.thread_safe = thread_safe  # an instance attribute declares it as a class one does

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.wait_s)
        return {"x": np.full(4, i, np.float32), "i": i}


class Burning:
    """A transform that spends ``cpu_s`` of CPU per item (declared thread-safe, yet CPU-bound)."""

    thread_safe = True

    def __init__(self, cpu_s=0.002):
        self.cpu_s = cpu_s

    def __call__(self, example, rng):
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            pass
        return {**example, "noise": rng.random(2).astype(np.float32)}


class DiesAfter:
    """Fine in the parent; a worker process exits on record ``bad``."""

    thread_safe = False

    def __init__(self, n, bad):
        self.n, self.bad, self.owner = n, bad, os.getpid()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad and os.getpid() != self.owner:
            os._exit(7)
        time.sleep(0.001)
        return {"x": np.full(4, i, np.float32)}
