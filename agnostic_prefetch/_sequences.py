"""The order of sequence batches (``Pad``, ``Bucket``, ``Pack``): a sampler over ``_plan.py``'s plans.

:class:`SequenceSampler` answers what the loader asks a ``Sampler`` (what this shard's part of
global batch ``k`` of an epoch is), from the epoch's item order (``Sampler``'s: the same for
any shard count) and each item's lengths. ``Pad`` and ``Bucket`` epochs have a fixed batch
count. A ``Pack`` epoch's count depends on its order; ``batches_per_epoch`` is then a bound
(batch numbers count from ``epoch * bound``), :meth:`SequenceSampler.batch` answers ``None``
past the epoch's real end, and the loader steps over those numbers. A planner thread keeps
``Pack`` plans ahead of the loader.
"""

from __future__ import annotations

import logging
import threading
import zlib
from typing import Any

import numpy as np

from agnostic_prefetch._plan import (
    BucketEpoch,
    Cursor,
    EpochPlan,
    RowPlan,
    bucket_sizes,
    concat_rows,
    fit_rows,
    items_of,
    pad_batch,
)
from agnostic_prefetch.batching import Bucket, Pack, Pad
from agnostic_prefetch.sampler import Batch, Sampler

__all__ = ["SequenceSampler"]

log = logging.getLogger("agnostic_prefetch")

AHEAD = 16  # Pack batches the planner keeps planned beyond the latest asked for


class SequenceSampler:
    """This shard's part of each sequence batch, planned from the epoch's item order.

    Threads: the loader's driving thread asks; the planner thread (``Pack``) plans ahead;
    ``_lock`` guards ``_epochs``, ``_counts`` and ``_asked``; each ``EpochPlan`` has its own
    lock. :meth:`close` stops the planner.

    Args:
        source: the source (its length, or its ``batch_order``).
        batching: the ``Pad``, ``Bucket`` or ``Pack`` settings.
        keys: the sequence keys; ``lengths``: per key, each index's length.
        batch_size, shuffle, seed, remainder, shard_index, shard_count: as ``Sampler``.
    """

    def __init__(self, source: Any, batching: Pad | Bucket | Pack, keys: tuple[str, ...], lengths: list[np.ndarray],
                 *, batch_size: int, shuffle: bool, seed: int, remainder: str, shard_index: int,
                 shard_count: int) -> None:
        self.batching, self.keys, self.lengths = batching, keys, lengths
        self.items = Sampler(source, batch_size * shard_count, shuffle=shuffle, seed=seed)  # the item order
        # One item per row (Pad): the plain order's rules; else it checks the shard settings only.
        rows = Sampler(source, batch_size, shuffle=shuffle, seed=seed,
                       remainder=remainder if isinstance(batching, Pad) else "pad",
                       shard_index=shard_index, shard_count=shard_count)
        self._pad_rows = rows if isinstance(batching, Pad) else None
        for name in ("seed", "shuffle", "batch_size", "global_batch_size", "shard_index", "shard_count",
                     "source_len", "orders_itself"):
            setattr(self, name, getattr(rows, name))
        self.remainder, self.drop_remainder = remainder, remainder == "drop"
        # An epoch may end before batches_per_epoch: Pack's count depends on the order, and a
        # Bucket epoch's on which items a source that orders itself (a Mixture) draws.
        self.ends_early = isinstance(batching, Pack) or (isinstance(batching, Bucket) and self.orders_itself)
        self.row_lengths = self._row_lengths()
        self._refuse_longer()
        self.fingerprint = _fingerprint(batching, keys, lengths)
        self._epochs: dict[int, Any] = {}  # the two latest epochs' BucketEpoch or EpochPlan
        self._counts: dict[int, int] = {}  # Pack: each counted epoch's batches
        self._lock = threading.Lock()
        self._asked = (0, 0)
        self._planner: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        g = self.global_batch_size
        if isinstance(batching, Pad):
            self.batches_per_epoch = rows.batches_per_epoch
        elif isinstance(batching, Bucket) and self.ends_early:  # at most one short batch per bucket
            self.batches_per_epoch = self.items.batches_per_epoch + len(batching.boundaries)
        elif isinstance(batching, Bucket):
            sizes = bucket_sizes(self.items.epoch_order(0), lengths, batching.boundaries)
            self.batches_per_epoch = int(sum(n // g if self.drop_remainder else -(-n // g) for n in sizes.tolist()))
        else:
            self.batches_per_epoch = max(1, -(-self._rows_bound() // g))
        if not self.exists(0, 0):
            raise ValueError(
                f"an epoch has no batches: {'every bucket has' if isinstance(batching, Bucket) else 'packing fills'} "
                f"fewer than the global batch's {g} {'items' if isinstance(batching, Bucket) else 'rows'} and "
                "remainder='drop'; use a smaller batch, or keep the remainder (remainder='pad')")

    # ---- what the loader asks ------------------------------------------------------------

    def batch(self, epoch: int, number: int) -> Batch | None:
        """This shard's rows of global batch ``number`` of ``epoch`` (``None``: past its end)."""
        plan = self._global(epoch, number)
        if plan is None:
            return None
        lo = self.shard_index * self.batch_size
        part = plan.shard(lo, lo + self.batch_size)
        indices, positions = items_of(part.segments)
        first = int(positions[0]) if len(positions) else 0
        return Batch(epoch, number, indices, first, part, positions)

    def global_batch(self, epoch: int, number: int) -> np.ndarray:
        """Every item index global batch ``number`` of ``epoch`` reads (each once)."""
        plan = self._global(epoch, number)
        return np.zeros(0, np.int64) if plan is None else items_of(plan.segments)[0]

    def exists(self, epoch: int, number: int) -> bool:
        """Whether ``epoch`` has a batch ``number`` (``Pack``: plans up to it)."""
        if isinstance(self.batching, Pack):
            return self._pack(epoch).batch(number) is not None
        if isinstance(self.batching, Bucket) and self.ends_early:
            return 0 <= number < len(self._bucket(epoch))
        return 0 <= number < self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> int:
        """The batches ``epoch`` has (``Pack``: planned to its end, once, without keeping plans)."""
        if not isinstance(self.batching, Pack):
            return len(self._bucket(epoch)) if self.ends_early else self.batches_per_epoch
        with self._lock:
            known = self._counts.get(epoch)
            plan = self._epochs.get(epoch)
        if known is None:
            known = (plan if plan is not None else self._new_plan(epoch, 0, None)).count()
            with self._lock:
                self._counts[epoch] = known
        return known

    def forget(self, epoch: int, number: int) -> None:
        """Batches of ``epoch`` below ``number`` will not be asked for again (``Pack``)."""
        if isinstance(self.batching, Pack):
            with self._lock:
                plan = self._epochs.get(epoch)
            if plan is not None:
                plan.forget(number)

    def cursor(self, epoch: int, number: int) -> list[int] | None:
        """Where ``Pack``'s item stream stands at the start of batch ``number`` (for a state)."""
        if not isinstance(self.batching, Pack):
            return None
        found = self._pack(epoch).batch(number)
        return None if found is None or found[1] is None else list(found[1])

    def seek(self, epoch: int, number: int, cursor: list[int] | None) -> None:
        """Plan ``epoch`` from batch ``number``, whose start is ``cursor`` (a resumed state)."""
        if isinstance(self.batching, Pack) and cursor is not None:
            plan = self._new_plan(epoch, number, tuple(int(c) for c in cursor))
            with self._lock:
                self._epochs[epoch] = plan

    def close(self) -> None:
        """Stop the planner thread."""
        self._stop.set()
        self._wake.set()
        planner = self._planner
        if planner is not None and planner is not threading.current_thread():
            planner.join(5.0)

    # ---- plans ---------------------------------------------------------------------------

    def _row_lengths(self) -> tuple[int, ...]:
        """Each key's longest row (the slot is laid out for it)."""
        b = self.batching
        if isinstance(b, Bucket):
            return (b.boundaries[-1],) * len(self.keys)
        if b.length is not None:
            return tuple(int(b.length[k]) if isinstance(b.length, dict) else int(b.length) for k in self.keys)
        assert isinstance(b, Pad)
        return tuple(max(b.multiple, -(-int(m.max(initial=0)) // b.multiple) * b.multiple) for m in self.lengths)

    def _refuse_longer(self) -> None:
        """``longer="refuse"``: name a record longer than its row, before anything starts."""
        b = self.batching
        if b.longer != "refuse":
            return
        for key, m, limit in zip(self.keys, self.lengths, self.row_lengths, strict=True):
            over = np.flatnonzero(m > limit)
            if len(over):
                i = int(over[0])
                others = ("'truncate' (keep its first tokens) or 'split'" if isinstance(b, Pack)
                          else "'truncate' (keep its first tokens)")
                raise ValueError(
                    f"record {i}: {key!r} is {int(m[i])} long, longer than the rows' {limit} ({len(over)} of "
                    f"{len(m)} records are); pass longer={others}, or a larger length")

    def _rows_bound(self) -> int:
        """At most this many rows an epoch of ``Pack`` fills, whatever its order.

        ``concat``: every row but the last ends with a key full, so rows <= F + 1, F being
        the sum over keys of tokens / row length. Fit methods: a row was opened because its
        first piece fitted no earlier row, so any two rows overfill some key and at most one
        per window is half full or less: rows <= 2F + windows; and never more than pieces.
        A source that orders itself may repeat items, so there F and the pieces are bounded
        by its items per epoch times the most one item can bring.
        """
        b = self.batching
        assert isinstance(b, Pack)
        split = b.longer == "split"
        tokens = [m if split else np.minimum(m, L) for m, L in zip(self.lengths, self.row_lengths, strict=True)]
        pieces = np.maximum(1, np.max(np.stack([-(-m // L) for m, L in zip(tokens, self.row_lengths, strict=True)]),
                                      axis=0)) if split else np.ones(len(tokens[0]), np.int64)
        if self.orders_itself:
            items = self.items.batches_per_epoch * self.global_batch_size
            fill = items * sum(float(m.max(initial=0)) / L for m, L in zip(tokens, self.row_lengths, strict=True))
            most = items * int(pieces.max(initial=1))
        else:
            items = len(tokens[0])
            fill = sum(float(m.sum()) / L for m, L in zip(tokens, self.row_lengths, strict=True))
            most = int(pieces.sum())
        if b.method == "concat":
            return int(fill) + 2
        return min(most, int(2 * fill) + -(-items // self.window) + 1)

    @property
    def window(self) -> int:
        b = self.batching
        return (b.window or 8 * self.global_batch_size) if isinstance(b, Pack) else 0

    def _global(self, epoch: int, number: int) -> RowPlan | None:
        b = self.batching
        if isinstance(b, Pad):
            assert self._pad_rows is not None
            if not 0 <= number < self.batches_per_epoch:
                return None
            items = self._pad_rows.global_batch(epoch, number)
            fixed = self.row_lengths if b.length is not None else None
            return pad_batch(items, number * self.global_batch_size, self.lengths, fixed, b.multiple)
        if isinstance(b, Bucket):
            plans = self._bucket(epoch)
            return plans.batch(number) if 0 <= number < len(plans) else None
        found = self._pack(epoch).batch(number)
        self._ask(epoch, number)
        return None if found is None else found[0]

    def _bucket(self, epoch: int) -> BucketEpoch:
        with self._lock:
            plans = self._epochs.get(epoch)
        if plans is None:
            b = self.batching
            assert isinstance(b, Bucket)
            rng = np.random.default_rng([self.seed, epoch, 0xB0C4E7]) if self.shuffle else None
            plans = BucketEpoch(self.items.epoch_order(epoch), self.lengths, b.boundaries, self.global_batch_size,
                                self.drop_remainder, rng)
            with self._lock:
                self._epochs[epoch] = plans
                self._forget_before(epoch)
        return plans

    def _pack(self, epoch: int) -> EpochPlan:
        with self._lock:
            plan = self._epochs.get(epoch)
        if plan is None:
            plan = self._new_plan(epoch, 0, None)
            with self._lock:
                plan = self._epochs.setdefault(epoch, plan)
                self._forget_before(epoch)
        return plan

    def _new_plan(self, epoch: int, start: int, cursor: Cursor | None) -> EpochPlan:
        b = self.batching
        assert isinstance(b, Pack)
        order, lengths, limits = self.items.epoch_order(epoch), self.lengths, self.row_lengths
        if b.method == "concat":
            def rows(c: Cursor | None) -> Any:
                return concat_rows(order, lengths, limits, c)
        else:
            best, window, split = b.method == "best_fit", self.window, b.longer == "split"

            def rows(c: Cursor | None) -> Any:
                return fit_rows(order, lengths, limits, best, window, split, c)
        return EpochPlan(rows, self.global_batch_size, limits, self.drop_remainder, start, cursor)

    def _forget_before(self, epoch: int) -> None:
        # The two latest epochs: the loader's look-ahead straddles an epoch boundary.
        for old in [e for e in self._epochs if e < epoch - 1]:
            del self._epochs[old]

    # ---- the planner thread (Pack) -------------------------------------------------------

    def _ask(self, epoch: int, number: int) -> None:
        with self._lock:
            if (epoch, number) <= self._asked and self._planner is not None:
                return
            self._asked = max(self._asked, (epoch, number))
            if self._planner is None and not self._stop.is_set():
                self._planner = threading.Thread(target=self._plan_ahead, name="agnostic_prefetch-planner",
                                                 daemon=True)
                self._planner.start()
        self._wake.set()

    def _plan_ahead(self) -> None:
        """Keep ``AHEAD`` batches planned past the latest asked for, and the next epoch's first."""
        try:
            while not self._stop.is_set():
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    epoch, number = self._asked
                for e, target in ((epoch, number + AHEAD), (epoch + 1, AHEAD)):
                    plan = self._pack(e)
                    while not self._stop.is_set() and plan.total is None and plan.planned() <= target:
                        plan.batch(plan.planned())
                    if plan.total is None:
                        break
        except Exception:  # pragma: no cover - the driving thread plans what it needs itself
            log.exception("the sequence planner thread failed; batches are planned when asked for")


def _fingerprint(batching: Pad | Bucket | Pack, keys: tuple[str, ...], lengths: list[np.ndarray]) -> str:
    """What decides the batches beyond the order's settings: the batching and the lengths."""
    crc = 0
    for m in lengths:
        crc = zlib.crc32(np.ascontiguousarray(m, np.int64).tobytes(), crc)
    return f"{batching!r} keys={list(keys)} lengths crc32={crc:08x}"
