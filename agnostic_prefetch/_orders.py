"""Orders, parent to worker: which batch to fill into which slot, packed as bytes.

One or more orders travel as one message: a fixed header and the int64 indices each (no
pickling on the per-batch path, and several orders per write, since each write wakes the
worker).
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_prefetch._plan import RowPlan, segment_width

__all__ = ["Order", "pack_orders", "unpack_orders"]

# order_id, slot, epoch, number, first position, item count, then for a sequence batch its
# segment count (-1: none), rows and keys (its positions, row lengths and segments follow);
# for a stream batch -2, its flags and the length of the pickled state that follows
_ORDER_HEADER = struct.Struct("<9q")
_STREAM, _POISONED = -2, -3
RESTART, PAD_ONLY = 1, 2  # a stream order's flags


@dataclass(frozen=True)
class Order:
    """Fill ``slot`` with batch ``number`` of ``epoch``: these records, from this position on.

    Item j sits at ``first_position + j`` in the epoch's global order (its RNG seed), or, for
    a sequence batch, at ``positions[j]``; ``plan`` says where its pieces go (``_rows.py``).
    """

    order_id: int
    slot: int
    epoch: int
    number: int
    indices: np.ndarray
    first_position: int
    positions: np.ndarray | None = None
    plan: RowPlan | None = None
    # A stream's batch ``number`` of ``epoch`` from the worker's own stream (no indices):
    # ``RESTART`` opens the epoch's stream afresh, where ``state`` says if it is not ``None``;
    # ``PAD_ONLY`` fills a batch of padding only.
    stream_flags: int | None = None
    state: Any = None
    # Records found to kill their worker are given as ``-1 - index``: the worker leaves them
    # out as skipped records (``on_error="skip"``) instead of reading them.
    poisoned: bool = False


def pack_orders(orders: list[Order]) -> bytes:
    """Orders as one message: a header and the int64 indices for each (and a sequence batch's
    positions, row lengths and segments), back to back."""
    parts = []
    for o in orders:
        plan = o.plan
        if o.stream_flags is not None:
            blob = pickle.dumps(o.state) if o.stream_flags & RESTART and o.state is not None else b""
            parts += [_ORDER_HEADER.pack(o.order_id, o.slot, o.epoch, o.number, 0, 0, _STREAM, o.stream_flags,
                                         len(blob)), blob]
            continue
        if plan is None:
            parts.append(_ORDER_HEADER.pack(o.order_id, o.slot, o.epoch, o.number, o.first_position,
                                            len(o.indices), _POISONED if o.poisoned else -1, 0, 0))
            parts.append(o.indices.astype(np.int64, copy=False).tobytes())
            continue
        assert o.positions is not None
        parts.append(_ORDER_HEADER.pack(o.order_id, o.slot, o.epoch, o.number, o.first_position, len(o.indices),
                                        len(plan.segments), plan.rows, len(plan.lengths)))
        parts += [o.indices.astype(np.int64, copy=False).tobytes(), o.positions.astype(np.int64).tobytes(),
                  np.asarray(plan.lengths, np.int64).tobytes(), np.ascontiguousarray(plan.segments, np.int64).tobytes()]
    return b"".join(parts)


def unpack_orders(message: bytes) -> list[Order]:
    """The inverse of :func:`pack_orders`."""
    orders, offset = [], 0
    while offset < len(message):
        order_id, slot, epoch, number, first, n, segments, rows, keys = _ORDER_HEADER.unpack_from(message, offset)
        offset += _ORDER_HEADER.size
        indices = np.frombuffer(message, np.int64, n, offset)
        offset += 8 * n
        if segments == _STREAM:
            state = pickle.loads(message[offset : offset + keys]) if keys else None
            offset += keys
            orders.append(Order(order_id, slot, epoch, number, indices, first, stream_flags=rows, state=state))
            continue
        if segments < 0:
            orders.append(Order(order_id, slot, epoch, number, indices, first, poisoned=segments == _POISONED))
            continue
        positions = np.frombuffer(message, np.int64, n, offset)
        offset += 8 * n
        lengths = tuple(np.frombuffer(message, np.int64, keys, offset).tolist())
        offset += 8 * keys
        width = segment_width(keys)
        table = np.frombuffer(message, np.int64, segments * width, offset).reshape(segments, width)
        offset += 8 * segments * width
        orders.append(Order(order_id, slot, epoch, number, indices, first, positions, RowPlan(table, rows, lengths)))
    return orders
