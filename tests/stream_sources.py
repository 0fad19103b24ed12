"""Streams for the tests; importable by workers. torch is imported only by the torch dataset's module."""

from __future__ import annotations

import numpy as np


def lengths_for(worker_id: int, lengths: tuple[int, ...]) -> int:
    return lengths[worker_id % len(lengths)]


class Items:
    """Worker ``w`` of ``W`` yields ``lengths[w]`` items ``{"x": w * 1000 + k, "w": w}``; stateful."""

    def __init__(self, worker_id, num_workers, lengths, epoch_offset=False):
        from agnostic_prefetch import stream_info

        info = stream_info()
        self.w = worker_id
        self.n = lengths_for(worker_id, lengths)
        self.k = 0
        self.base = 100_000 * info.epoch if (epoch_offset and info is not None) else 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.k >= self.n:
            raise StopIteration
        self.k += 1
        return {"x": np.int64(self.base + self.w * 1000 + self.k - 1), "w": np.int64(self.w)}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


class Plain(Items):
    """``Items`` without state."""

    state_dict = None
    load_state_dict = None


def stateful(lengths, epoch_offset=False):
    return lambda w, n: Items(w, n, lengths, epoch_offset)


def stateless(lengths):
    return lambda w, n: Plain(w, n, lengths)


def generator(lengths):
    def make(worker_id, num_workers):
        for k in range(lengths_for(worker_id, lengths)):
            yield {"x": np.int64(worker_id * 1000 + k), "w": np.int64(worker_id)}

    return make


class Chunks:
    """A Caffe2-style fetcher: worker ``w`` returns chunks of random lengths (0 included) of
    consecutive numbers ``w * 10**6 + k``, ``total[w]`` in all, then ``None``; stateful."""

    def __init__(self, totals, seed=0, max_chunk=7):
        self.totals, self.seed, self.max_chunk = totals, seed, max_chunk
        self.sent = {}
        self.calls = {}

    def __call__(self, worker_id, batch_size):
        sent = self.sent.get(worker_id, 0)
        total = self.totals[worker_id % len(self.totals)]
        if sent >= total:
            return None
        calls = self.calls.get(worker_id, 0)
        self.calls[worker_id] = calls + 1
        rng = np.random.default_rng([self.seed, worker_id, calls])
        n = min(int(rng.integers(0, self.max_chunk + 1)), total - sent)
        self.sent[worker_id] = sent + n
        k = np.arange(sent, sent + n, dtype=np.int64)
        return {"x": worker_id * 10**6 + k, "y": np.stack([k, -k], axis=1)}

    def state_dict(self):
        return {"sent": dict(self.sent), "calls": dict(self.calls)}

    def load_state_dict(self, state):
        self.sent = {int(k): v for k, v in state["sent"].items()}
        self.calls = {int(k): v for k, v in state["calls"].items()}


class Raising:
    """Worker ``w``'s stream raises at item ``at`` (only in worker ``bad``)."""

    def __init__(self, bad, at):
        self.bad, self.at = bad, at

    def __call__(self, worker_id, num_workers):
        for k in range(10):
            if worker_id == self.bad and k == self.at:
                raise ValueError(f"item {k} is corrupt")
            yield {"x": np.int64(k)}


def reshaped(worker_id, num_workers):
    for k in range(6):
        yield {"x": np.zeros(3 if k != 4 else 5, np.float32)}


def ragged_fetch(worker_id, batch_size):
    return {"x": np.zeros(4), "y": np.zeros(3)}


class Three(Items):
    """An iterator class given to ap.Stream as it is: three items per worker."""

    def __init__(self, worker_id, num_workers):
        super().__init__(worker_id, num_workers, (3,))


class Photos:
    """Worker ``w`` yields ``n`` JPEG-encoded photos (bytes) of varying sizes, with their numbers."""

    def __init__(self, n):
        self.n = n

    def __call__(self, worker_id, num_workers):
        import io

        from PIL import Image

        for k in range(self.n):
            rng = np.random.default_rng([worker_id, k])
            h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            yield {"image": buf.getvalue(), "n": np.int64(worker_id * 1000 + k)}
