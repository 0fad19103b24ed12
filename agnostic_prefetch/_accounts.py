"""Per-stage accounting: where each worker's time goes, kept in shared memory next to the ring.

Every worker (process, thread, or the caller with ``workers=0``) owns one row of float64
counters in a small block after the ring's slots. The worker adds to local floats item by
item and stores its row with one ``struct.pack_into`` after a batch (when 5 ms have passed
since the last store) and always before it waits for its next order; the parent reads the
rows only when asked (``stats()``, ``diagnose()``), so the per-batch path in the parent pays
nothing for them. A row is written by one worker only; a read that lands between two
stores of a row sees each counter whole (aligned 8-byte stores), at worst one batch apart.

Wall time is taken around each stage of every item (``perf_counter``, the system-wide
monotonic clock, so timestamps from every process share one time line). CPU time
(``thread_time``) costs a system call of about half a microsecond, so it is taken at the
stage boundaries of one item in every :data:`CPU_SAMPLE`: a stage's CPU time is estimated
as its wall time times the CPU/wall ratio of the sampled items.

The block's first word is the trace level the parent sets (``TRACE_OFF``, ``TRACE_BATCHES``,
``TRACE_ITEMS``); workers read it once per batch, so a trace started while they run
reaches them at their next batch.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np

CPU_SAMPLE = 16  # one item in this many has its CPU time taken
FLUSH_S = 0.005  # a worker stores its row after a batch at most this often (and before idling)
TRACE_OFF, TRACE_BATCHES, TRACE_ITEMS = 0, 1, 2

FIELDS = (
    "items", "batches", "read_s", "transform_s", "write_s",
    "sampled", "read_sampled_s", "read_cpu_sampled_s", "transform_sampled_s",
    "transform_cpu_sampled_s", "write_sampled_s", "write_cpu_sampled_s",
    "idle_s", "idle_since", "pid", "thread",
)
_F = {name: k for k, name in enumerate(FIELDS)}
ROW_FIELDS = len(FIELDS)
_ROW = struct.Struct(f"<{ROW_FIELDS}d")
_IDLE = struct.Struct("<2d")  # idle_s, idle_since
_HEADER_BYTES = 64  # control words; the trace level first


def board_bytes(rows: int) -> int:
    """Bytes of a block with ``rows`` worker rows."""
    return _HEADER_BYTES + rows * _ROW.size


class WorkerAccount:
    """One worker's counters: kept as floats, stored into its row of the shared block."""

    __slots__ = ("_board", "_offset", "acc", "flushed_at", "countdown", "control")

    def __init__(self, board: memoryview | None, row: int, pid: int, thread: int) -> None:
        self._board = board
        self._offset = _HEADER_BYTES + row * _ROW.size
        # control[0]: the trace level the parent sets, read per batch (an element of a
        # memoryview is the cheapest read Python has)
        self.control = (board[:8] if board is not None else memoryview(bytearray(8))).cast("d")
        self.acc = [0.0] * ROW_FIELDS
        self.acc[_F["pid"]], self.acc[_F["thread"]] = float(pid), float(thread)
        self.flushed_at = 0.0
        self.countdown = 0  # items until the next CPU sample

    def trace_level(self) -> int:
        return int(self.control[0])

    def add_sampled(self, sampled: list[float]) -> None:
        """Add a batch's CPU-sampled items: [count, read wall, read cpu, transform wall,
        transform cpu, write wall, write cpu] (``Filler.fill`` adds the rest itself)."""
        acc = self.acc
        acc[5:12] = [a + b for a, b in zip(acc[5:12], sampled, strict=True)]

    def flush(self, now: float) -> None:
        if self._board is not None:
            _ROW.pack_into(self._board, self._offset, *self.acc)
        self.flushed_at = now

    def idle(self) -> None:
        """The worker is about to wait for an order: store everything, and when it began."""
        now = time.perf_counter()
        self.acc[_F["idle_since"]] = now
        self.flush(now)

    def busy(self) -> None:
        """An order arrived: count the wait."""
        acc = self.acc
        since = acc[_F["idle_since"]]
        if since:
            acc[_F["idle_s"]] += time.perf_counter() - since
            acc[_F["idle_since"]] = 0.0
            if self._board is not None:
                _IDLE.pack_into(self._board, self._offset + _F["idle_s"] * 8, acc[_F["idle_s"]], 0.0)


class Board:
    """The parent's view of the block: the trace level to set, the rows to read."""

    def __init__(self, buffer: Any, offset: int, rows: int) -> None:
        self.rows = rows
        self._words: np.ndarray | None = np.frombuffer(buffer, np.float64, board_bytes(rows) // 8, offset)
        self._final: np.ndarray | None = None
        # Element reads from a memoryview cost far less than from numpy: this is read per batch.
        self._cells: memoryview | None = memoryview(self._words).cast("B").cast("d")
        self._idle_cells = [_HEADER_BYTES // 8 + r * ROW_FIELDS + _F["idle_since"] for r in range(rows)]

    def serving(self, row: int) -> bool:
        """Whether the worker of ``row`` has started serving orders (it stored its row)."""
        cells = self._cells
        return cells is not None and cells[_HEADER_BYTES // 8 + row * ROW_FIELDS + _F["pid"]] != 0

    def idle_after(self, since: float) -> float:
        """Worker-seconds of waiting for an order from ``since`` until now, by workers idle now."""
        cells = self._cells
        if cells is None:
            return 0.0
        now = time.perf_counter()
        total = 0.0
        for k in self._idle_cells:
            began = cells[k]
            if began:
                total += now - (began if began > since else since)
        return total

    def set_trace_level(self, level: int) -> None:
        if self._words is not None:
            self._words[0] = level

    def trace_level(self) -> int:
        """The level workers read from the block (``TRACE_OFF`` once it is closed)."""
        return int(self._words[0]) if self._words is not None else TRACE_OFF

    def table(self) -> np.ndarray:
        """A copy of every row (rows x FIELDS), idle time of a wait in progress included."""
        if self._words is None:
            assert self._final is not None
            return self._final.copy()
        table = self._words[_HEADER_BYTES // 8:].reshape(self.rows, ROW_FIELDS).copy()
        since = table[:, _F["idle_since"]]
        waiting = since > 0
        table[waiting, _F["idle_s"]] += np.maximum(0.0, time.perf_counter() - since[waiting])
        return table

    def close(self) -> None:
        """Keep the last figures and let go of the shared memory (so the ring can be unmapped)."""
        if self._words is not None:
            self._final = self.table()
            self._final[:, _F["idle_since"]] = 0.0
            if self._cells is not None:
                self._cells.release()
            self._words = self._cells = None


def worker_totals(table: np.ndarray) -> dict[str, float]:
    """Sums over worker rows, with CPU times estimated from the sampled items."""
    total = table.sum(axis=0)
    out = {"items_read": float(total[_F["items"]])}
    for stage in ("read", "transform", "write"):
        wall = float(total[_F[f"{stage}_s"]])
        sampled_wall = float(total[_F[f"{stage}_sampled_s"]])
        sampled_cpu = float(total[_F[f"{stage}_cpu_sampled_s"]])
        out[f"{stage}_s"] = wall
        out[f"{stage}_cpu_s"] = wall * min(1.0, sampled_cpu / sampled_wall) if sampled_wall > 0 else 0.0
    out["worker_idle_s"] = float(total[_F["idle_s"]])
    return out


def per_worker(table: np.ndarray) -> list[dict[str, float]]:
    """Each row that was used: items, batches, busy and idle seconds."""
    rows = []
    for row in table:
        if row[_F["pid"]] == 0 and row[_F["batches"]] == 0:
            continue
        busy = float(row[_F["read_s"]] + row[_F["transform_s"]] + row[_F["write_s"]])
        rows.append({"items": float(row[_F["items"]]), "batches": float(row[_F["batches"]]),
                     "busy_s": busy, "idle_s": float(row[_F["idle_s"]]), "pid": int(row[_F["pid"]])})
    return rows
