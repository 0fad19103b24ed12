"""Sources of token sequences for the sequence-batching tests, and readers of packed rows.

Token ``t`` of item ``i`` is ``i * 1000 + t``, so every token in a batch says where it came from.
"""

from __future__ import annotations

import numpy as np

import agnostic_prefetch as ap


class Docs:
    """Items ``{"tokens": int32[sizes[i]]}`` (and an int ``label``), with ``lengths()``."""

    def __init__(self, sizes, *, label=False, with_lengths=True, broken=(), offset=0):
        self.sizes = np.asarray(sizes, np.int64)
        self.label, self.broken, self.offset = label, set(broken), offset
        if not with_lengths:
            self.lengths = None

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        if i in self.broken:
            raise ValueError(f"record {i} is broken on purpose")
        tokens = np.arange(self.sizes[i], dtype=np.int32) + (i + self.offset) * 1000
        return {"tokens": tokens, "label": np.int64(i)} if self.label else {"tokens": tokens}

    def lengths(self):
        return self.sizes


class Pairs:
    """Items with two sequence keys of unrelated lengths, ``inputs`` and ``targets``."""

    def __init__(self, a, b):
        self.a, self.b = np.asarray(a, np.int64), np.asarray(b, np.int64)

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return {"inputs": np.arange(self.a[i], dtype=np.int32) + i * 1000,
                "targets": np.arange(self.b[i], dtype=np.int32) + i * 1000}

    def lengths(self):
        return {"inputs": self.a, "targets": self.b}


def decode_rows(batch, key, limit):
    """Each row's pieces as ``(item, first token, count)``, after checking that segment ids run
    1, 2, ... over the pieces, positions restart at 0 in each, and padding is 0 with id 0."""
    tokens, ids, positions = batch[key], batch[f"{key}_segment_ids"], batch[f"{key}_positions"]
    if limit is not None:
        assert tokens.shape[1] == limit
    rows = []
    for r in range(tokens.shape[0]):
        row, at = [], 0
        while at < tokens.shape[1] and ids[r, at] != 0:
            seg = ids[r, at]
            end = at
            while end < tokens.shape[1] and ids[r, end] == seg:
                end += 1
            piece = tokens[r, at:end]
            assert positions[r, at:end].tolist() == list(range(end - at))
            assert (np.diff(piece) == 1).all() and len({int(t) // 1000 for t in piece}) == 1
            row.append((int(piece[0]) // 1000, int(piece[0]) % 1000, end - at))
            at = end
        assert [s for s in ids[r, :at]] == sorted(ids[r, :at]) and (ids[r, at:] == 0).all()
        assert (tokens[r, at:] == 0).all() and (positions[r, at:] == 0).all()
        rows.append(row)
    return rows


def stream_of(batches, key):
    """The real tokens of ``batches``, row after row."""
    return [int(t) for b in batches for row, ids in zip(b[key], b[f"{key}_segment_ids"], strict=True)
            for t in row[ids > 0]]


def global_rows(source, batching, g, shards, state=None, workers=0, **options):
    """Every global batch's rows of tokens, read by ``shards`` loaders (from ``state``)."""
    loaders = [ap.Loader(source, global_batch_size=g, shard_index=i, shard_count=shards, batching=batching,
                         workers=workers, backend="thread", **options) for i in range(shards)]
    try:
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        out = []
        for parts in zip(*loaders, strict=True):
            out.append(np.concatenate([p["tokens"] for p in parts]))
        return out
    finally:
        for loader in loaders:
            loader.close()
