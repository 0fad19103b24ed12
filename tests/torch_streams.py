"""A torch IterableDataset that shards itself with ``get_worker_info()``, as torch's docs show."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


class Sharded(IterableDataset):
    """Items ``start .. end-1``, split into contiguous runs per worker (torch's docs example),
    each item ``{"x": i, "sq": [i, i*i]}``."""

    def __init__(self, start, end):
        super().__init__()
        self.start, self.end = start, end

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            lo, hi = self.start, self.end
        else:
            per = int(np.ceil((self.end - self.start) / info.num_workers))
            lo = self.start + info.id * per
            hi = min(lo + per, self.end)
        for i in range(lo, hi):
            yield {"x": torch.tensor(i), "sq": torch.tensor([i, i * i])}


class WhoAmI(IterableDataset):
    """Yields what ``get_worker_info()`` says in the worker, once."""

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # the parent, reading one example to lay out the ring
            yield {"id": np.int64(-1), "num_workers": np.int64(0), "seed": np.int64(0), "same_dataset": np.bool_(False)}
            return
        yield {"id": np.int64(info.id), "num_workers": np.int64(info.num_workers), "seed": np.int64(info.seed % 2**62),
               "same_dataset": np.bool_(isinstance(info.dataset, WhoAmI))}
