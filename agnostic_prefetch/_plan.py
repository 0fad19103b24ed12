"""Planning sequence batches (``Pad``, ``Bucket``, ``Pack``): which pieces of which items fill
each row of global batch ``k`` of an epoch, from lengths known before the epoch.

A plan is a function of the epoch's item order (``sampler.py``: the same for any shard or
worker count), the lengths and the settings. A batch's plan is a :class:`RowPlan`: a table
of *segments*, one per piece of an item in a row (the row, the item's index and position
in the epoch's order, and per key where the piece starts in the item, how long it is,
where it starts in the row and the item's whole planned length), and each key's row length.

``Pad`` and ``Bucket`` batches are computed directly. ``Pack`` rows depend on the rows
before them, so they are planned in order from a *cursor* (where the epoch's item stream
stands at a batch's start: a short tuple of ints, kept in the state dict), never from the
start of the epoch on resume. How many batches a ``Pack`` epoch has is known once it is
planned to its end.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["BucketEpoch", "EpochPlan", "RowPlan", "bucket_sizes", "column", "concat_rows", "fit_rows",
           "items_of", "pad_batch", "segment_width"]

ROW, INDEX, POSITION = 0, 1, 2
# then, per key: SRC (where the piece starts in the item), LENGTH, DST (where it starts in
# the row), FULL (the item's planned length, which a worker checks the item against)
SRC, LENGTH, DST, FULL = 3, 4, 5, 6
PER_KEY = 4
CHECKPOINT_EVERY = 64  # Pack: a cursor kept every this many batches (re-planning starts there)

Cursor = tuple[int, ...]
Segment = tuple[int, ...]  # one row of a segment table, ROW first
Rows = Iterator[tuple[list[Segment], Cursor]]  # each row's segments and the cursor at its start


def segment_width(keys: int) -> int:
    """Columns of a segment table with ``keys`` sequence keys."""
    return 3 + PER_KEY * keys


def column(key: int, what: int) -> int:
    """The column of ``what`` (``SRC``, ``LENGTH``, ``DST``, ``FULL``) for key number ``key``."""
    return what + PER_KEY * key


@dataclass(frozen=True)
class RowPlan:
    """One global batch (or one shard's rows of it): its segments and each key's row length."""

    segments: np.ndarray  # int64, segment_width(keys) columns, rows in order, each row's pieces by DST
    rows: int  # rows that hold something (a short last batch has fewer than the batch's)
    lengths: tuple[int, ...]  # per key: this batch's row length

    def shard(self, lo: int, hi: int) -> RowPlan:
        """The rows ``[lo, hi)`` of this global batch, renumbered from 0."""
        rows = self.segments[:, ROW]
        part = self.segments[(rows >= lo) & (rows < hi)]
        part[:, ROW] -= lo  # (boolean indexing copied)
        return RowPlan(part, max(0, min(self.rows, hi) - lo), self.lengths)


def items_of(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items a segment table reads, each once, in the order they first appear: their
    indices and their positions in the epoch's order."""
    positions = segments[:, POSITION]
    _, first = np.unique(positions, return_index=True)
    first.sort()
    return segments[first, INDEX], positions[first]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _one_per_row(indices: np.ndarray, positions: np.ndarray, full: list[np.ndarray],
                 row_lengths: tuple[int, ...]) -> np.ndarray:
    segments = np.zeros((len(indices), segment_width(len(full))), np.int64)
    segments[:, ROW] = np.arange(len(indices))
    segments[:, INDEX] = indices
    segments[:, POSITION] = positions
    for k, lengths in enumerate(full):
        segments[:, column(k, LENGTH)] = np.minimum(lengths, row_lengths[k])
        segments[:, column(k, FULL)] = lengths
    return segments


def pad_batch(indices: np.ndarray, first_position: int, lengths: list[np.ndarray],
              fixed: tuple[int, ...] | None, multiple: int) -> RowPlan:
    """A ``Pad`` global batch: one item per row, each key padded to ``fixed`` or to the batch's
    longest rounded up to ``multiple``; an item longer than a fixed length is cut."""
    full = [m[indices] for m in lengths]
    if fixed is None:
        fixed = tuple(_round_up(int(f.max(initial=0)), multiple) for f in full)
    positions = first_position + np.arange(len(indices), dtype=np.int64)
    return RowPlan(_one_per_row(indices, positions, full, fixed), len(indices), fixed)


def _bucket_of(order: np.ndarray, lengths: list[np.ndarray], boundaries: tuple[int, ...]) -> np.ndarray:
    longest = np.max(np.stack([m[order] for m in lengths]), axis=0) if len(order) else np.zeros(0, np.int64)
    return np.minimum(np.searchsorted(np.asarray(boundaries), longest, side="left"), len(boundaries) - 1)


def bucket_sizes(every: np.ndarray, lengths: list[np.ndarray], boundaries: tuple[int, ...]) -> np.ndarray:
    """Items per bucket (the same every epoch: the same items, in another order)."""
    return np.bincount(_bucket_of(every, lengths, boundaries), minlength=len(boundaries))


class BucketEpoch:
    """The ``Bucket`` batches of one epoch, in delivery order.

    An item's bucket is the first whose boundary is at least its longest key (the last for
    longer items, which are cut to it). Each bucket's items, in the epoch's order, are cut
    into global batches of ``g``; a bucket's last batch may be short (``drop``: left out).
    The batches of all buckets are delivered in an order drawn from ``rng`` (shuffled runs),
    else by their first item's position.
    """

    def __init__(self, order: np.ndarray, lengths: list[np.ndarray], boundaries: tuple[int, ...], g: int,
                 drop: bool, rng: np.random.Generator | None) -> None:
        self._order, self._lengths, self._boundaries = order, lengths, boundaries
        bucket = _bucket_of(order, lengths, boundaries)
        self._members = [np.flatnonzero(bucket == b) for b in range(len(boundaries))]  # epoch positions
        starts = [(b, s) for b, m in enumerate(self._members) for s in range(0, len(m), g)
                  if not (drop and len(m) - s < g)]
        self._g = g
        if rng is not None:
            self._batches = [starts[i] for i in rng.permutation(len(starts))]
        else:
            self._batches = sorted(starts, key=lambda bs: int(self._members[bs[0]][bs[1]]))

    def __len__(self) -> int:
        return len(self._batches)

    def batch(self, k: int) -> RowPlan:
        b, start = self._batches[k]
        positions = self._members[b][start : start + self._g]
        indices = self._order[positions]
        bound = self._boundaries[b]
        full = [m[indices] for m in self._lengths]
        return RowPlan(_one_per_row(indices, positions.astype(np.int64), full, (bound,) * len(full)),
                       len(indices), (bound,) * len(full))


# ---- Pack: rows planned in order, from a cursor -----------------------------------------


def concat_rows(order: np.ndarray, lengths: list[np.ndarray], limits: tuple[int, ...], cursor: Cursor | None) -> Rows:
    """Rows as Grain's concat-then-split makes them: items are added while every key fits; an
    item that overflows a key is split there (what fits ends the row, the rest starts the
    next; its other keys go whole into the row that takes their first token). A cursor is
    ``(item position, offset per key)`` of the item the row starts with."""
    keys = len(limits)
    pos = 0 if cursor is None else cursor[0]
    offsets = [0] * keys if cursor is None else list(cursor[1:])
    n = len(order)
    columns = [lengths[k] for k in range(keys)]
    while pos < n:
        start = (pos, *offsets)
        used = [0] * keys
        row: list[Segment] = []
        while pos < n:
            index = int(order[pos])
            full = [int(c[index]) for c in columns]
            take = [min(full[k] - offsets[k], limits[k] - used[k]) for k in range(keys)]
            split = any(take[k] < full[k] - offsets[k] for k in range(keys))
            if split and not any(take):
                break  # nothing of it fits: the row is done
            piece: list[int] = [0, index, pos]
            for k in range(keys):
                piece += (offsets[k], take[k], used[k], full[k])
                used[k] += take[k]
            row.append(tuple(piece))
            if not split:
                pos, offsets = pos + 1, [0] * keys
                continue
            offsets = [offsets[k] + take[k] for k in range(keys)]
            break
        yield row, start


def fit_rows(order: np.ndarray, lengths: list[np.ndarray], limits: tuple[int, ...], best: bool, window: int,
             split: bool, cursor: Cursor | None) -> Rows:
    """Rows of whole items (or row-long pieces of longer ones, ``split``; else their first
    row's worth), window by window: a window's pieces, longest first, each go into the first
    row where every key fits (``best``: the one it leaves fullest), else a new row; a row
    lists its pieces in the epoch's order. A cursor is ``(window, row within the window)``."""
    keys = len(limits)
    limit = np.asarray(limits, np.int64)
    first_window, skip = (0, 0) if cursor is None else (cursor[0], cursor[1])
    for w in range(first_window, -(-len(order) // window)):
        lo, hi = w * window, min(len(order), (w + 1) * window)
        items = order[lo:hi]
        full = np.stack([lengths[k][items] for k in range(keys)], axis=1).astype(np.int64)  # (items, keys)
        count = np.maximum(1, (-(-full // limit)).max(axis=1)) if split else np.ones(len(items), np.int64)
        item = np.repeat(np.arange(len(items)), count)  # each piece's item number in the window
        part = np.arange(len(item)) - np.repeat(np.cumsum(count) - count, count)  # its piece number
        src = part[:, None] * limit[None, :]
        need = np.clip(full[item] - src, 0, limit[None, :])
        rows = _assign(need, limit, best)
        for r in range(skip, len(rows)):
            members = sorted(rows[r], key=lambda p: (item[p], part[p]))
            used = [0] * keys
            row: list[Segment] = []
            for p in members:
                i = int(item[p])
                piece: list[int] = [0, int(items[i]), lo + i]
                for k in range(keys):
                    n = int(need[p, k])
                    piece += (int(src[p, k]), n, used[k], int(full[i, k]))
                    used[k] += n
                row.append(tuple(piece))
            yield row, (w, r)
        skip = 0


def _assign(need: np.ndarray, limit: np.ndarray, best: bool) -> list[list[int]]:
    """Pieces (rows of ``need``) into rows of room ``limit``, longest first (first-fit or
    best-fit decreasing); returns each row's piece numbers."""
    count, keys = need.shape
    by_size = np.argsort(-(need / limit).max(axis=1), kind="stable")
    if best and keys == 1:
        return _best_fit_one(need[:, 0].tolist(), by_size.tolist(), int(limit[0]))
    room = np.empty((count, keys), np.int64)
    rows: list[list[int]] = []
    for p in by_size.tolist():
        want = need[p]
        open_rows = room[: len(rows)]
        fits = (open_rows >= want).all(axis=1) if keys > 1 else open_rows[:, 0] >= want[0]
        where = np.flatnonzero(fits)
        if len(where):
            r = int(where[np.argmin(((open_rows[where] - want) / limit).sum(axis=1))]) if best else int(where[0])
            room[r] -= want
            rows[r].append(p)
        else:
            room[len(rows)] = limit - want
            rows.append([p])
    return rows


def _best_fit_one(need: list[int], by_size: list[int], limit: int) -> list[list[int]]:
    """:func:`_assign`'s best fit for one key, the same rows: the open rows kept sorted by
    ``(room, row)``, so the fullest row that fits, the earliest of equals, is one bisection
    away rather than a scan of every open row."""
    rooms: list[tuple[int, int]] = []
    rows: list[list[int]] = []
    for p in by_size:
        at = bisect.bisect_left(rooms, (need[p], -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
            bisect.insort(rooms, (room - need[p], r))
            rows[r].append(p)
        else:
            bisect.insort(rooms, (limit - need[p], len(rows)))
            rows.append([p])
    return rows


class EpochPlan:
    """The ``Pack`` batches of one epoch, planned in order from a cursor, with bounded memory.

    Plans are kept from the oldest batch still wanted (:meth:`forget`) on; a cursor is kept
    every ``CHECKPOINT_EVERY`` batches, so a batch asked for again after it was forgotten
    is planned anew from the nearest one before it.

    Threads: any thread may call any method; ``_lock`` guards every field.

    Args:
        rows_from: the epoch's rows from a cursor (``None``: the epoch's start).
        g: rows per global batch.
        limits: each key's row length.
        drop: a last batch with fewer than ``g`` rows is left out.
        start, cursor: the first batch to plan and the cursor at its start (a resumed state).
    """

    def __init__(self, rows_from: Callable[[Cursor | None], Rows], g: int, limits: tuple[int, ...], drop: bool,
                 start: int = 0, cursor: Cursor | None = None) -> None:
        self._rows_from, self._g, self._limits, self._drop = rows_from, g, limits, drop
        self._lock = threading.Lock()
        self._plans: dict[int, tuple[RowPlan, Cursor | None]] = {}
        self._checkpoints: dict[int, Cursor | None] = {0: None, start: cursor}
        self._rows = rows_from(cursor)
        self._next = start  # the next batch the main stream plans
        self._floor = 0  # batches below it are not kept
        self.total: int | None = None  # batches in the epoch, once known

    def batch(self, k: int) -> tuple[RowPlan, Cursor | None] | None:
        """Batch ``k`` and the cursor at its start, or ``None`` past the epoch's end."""
        with self._lock:
            found = self._plans.get(k)
            if found is not None:
                return found
            while self.total is None and self._next <= k:
                self._advance()
            if self.total is not None and k >= self.total:
                return None
            found = self._plans.get(k)
            return found if found is not None else self._replan(k)

    def planned(self) -> int:
        """Batches the main stream has planned (the epoch's count once it ended)."""
        return self._next

    def forget(self, below: int) -> None:
        """Batches below ``below`` will not be asked for again (they may be, at a cost)."""
        with self._lock:
            self._floor = max(self._floor, below)
            for k in [k for k in self._plans if k < self._floor]:
                del self._plans[k]

    def count(self) -> int:
        """The epoch's batch count, planning to its end without keeping the plans."""
        with self._lock:
            if self.total is None:
                k = max(c for c in self._checkpoints if c <= self._next)
                rows = self._rows_from(self._checkpoints[k])
                while True:
                    taken, cursor = self._take(rows)
                    if not self._ends(taken, k):
                        break
                    if k % CHECKPOINT_EVERY == 0:
                        self._checkpoints[k] = cursor
                    k += 1
                self.total = k
            return self.total

    def _take(self, rows: Rows) -> tuple[list[Segment], Cursor | None]:
        """The next batch's segments (rows numbered) from ``rows``, and the cursor at its start."""
        segments: list[Segment] = []
        cursor = None
        for r in range(self._g):
            found = next(rows, None)
            if found is None:
                break
            row, start = found
            if r == 0:
                cursor = start
            segments += [(r, *s[1:]) for s in row]
        return segments, cursor

    def _ends(self, segments: list[Segment], k: int) -> bool:
        """Whether a batch with these segments is batch ``k`` (False: the epoch ended before it)."""
        if not segments:
            return False
        rows = segments[-1][ROW] + 1
        return not (self._drop and rows < self._g)

    def _advance(self) -> None:
        k = self._next
        segments, cursor = self._take(self._rows)
        if not self._ends(segments, k):
            self.total = k
            return
        if k % CHECKPOINT_EVERY == 0:
            self._checkpoints[k] = cursor
        if k >= self._floor:
            self._plans[k] = (self._plan(segments), cursor)
        self._next = k + 1

    def _replan(self, k: int) -> tuple[RowPlan, Cursor | None]:
        first = max(c for c in self._checkpoints if c <= k)
        rows = self._rows_from(self._checkpoints[first])
        for _ in range(first, k):
            self._take(rows)
        segments, cursor = self._take(rows)
        return self._plan(segments), cursor

    def _plan(self, segments: list[Segment]) -> RowPlan:
        table = np.array(segments, np.int64).reshape(len(segments), segment_width(len(self._limits)))
        return RowPlan(table, int(table[-1, ROW]) + 1, self._limits)
