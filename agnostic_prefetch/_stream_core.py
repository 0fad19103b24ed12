"""A loader core over a stream: its order's settings, its position, and its iterations.

:class:`StreamCore` is a :class:`~agnostic_prefetch._core.LoaderCore` whose positions are
:class:`~agnostic_prefetch._stream_position.StreamPosition`\\ s and whose scheduler is a
``StreamScheduler``; what it shares with a map-style loader (the ring, the workers, stats,
closing) is the base class's.
"""

from __future__ import annotations

from typing import Any

from agnostic_prefetch._core import Cursor, LoaderCore
from agnostic_prefetch._resume import ENDLESS
from agnostic_prefetch._stream_position import (
    StreamPosition,
    decode_stream,
    encode_stream,
    stream_settings,
)

__all__ = ["StreamCore", "StreamOrder"]


class StreamOrder:
    """A stream's order settings, in the shape a loader core reads a sampler's."""

    shuffle = False
    orders_itself = False
    source_len = None
    ends_early = False

    def __init__(self, stream: Any, batch_size: int, *, seed: int, remainder: str, shard_index: int,
                 shard_count: int) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.global_batch_size = batch_size * shard_count
        self.seed, self.remainder = seed, remainder
        self.drop_remainder = remainder == "drop"
        self.shard_index, self.shard_count = shard_index, shard_count
        # A fixed epoch if the stream has one; otherwise what numbers batches in the base
        # class (a bound no epoch reaches).
        self.batches_per_epoch = stream.batches_per_epoch or ENDLESS


class StreamCore(LoaderCore):
    """The core of a loader over a stream (see :class:`~agnostic_prefetch._core.LoaderCore`)."""

    def __init__(self, *args: Any, workers: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = max(1, workers)
        self.stream = self.sampler.stream
        self.settings = stream_settings(self.stream, workers, self.sampler, self.ordered)
        self.start = StreamPosition.start(0, self.workers)  # type: ignore[assignment]
        self._reset = True  # the next iteration restarts every worker's stream from its position

    def begin(self, cursor: Cursor | None, position: Any, plan_cursor: Any = None) -> Cursor:
        self.check_open()
        self._cancel_latest(cursor)
        with self.scheduler.drive:
            self.check_open()
            self._cancel_latest(cursor)
            reset = self._reset or position is not None
            start: StreamPosition = self.position() if position is None else position  # type: ignore[assignment]
            if start.end is not None and start.end > start.epoch:
                end = start.end
            else:
                end = ENDLESS if self.epochs is None else start.epoch + self.epochs
            start = start._replace(end=end)
            if cursor is None:
                cursor = Cursor(start)  # type: ignore[arg-type]
            else:
                cursor.restart(start)  # type: ignore[arg-type]
            self.scheduler.restart(start, end, reset)  # type: ignore[arg-type, call-arg]
            self._reset = False
            self.latest = cursor
        return cursor

    def load(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.check_open()
        _, position = self.decode(state)
        self._cancel_latest(None)
        with self.scheduler.drive:
            self._cancel_latest(None)
            self.latest = None
            self.start = position  # type: ignore[assignment]
            self._reset = True

    def decode(self, state: dict[str, Any] | list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
        return {}, decode_stream(state, self.settings)

    def state_of(self, position: Any, endless: bool) -> dict[str, Any]:
        return encode_stream(position, self.settings, endless)

    def remaining(self, position: Any, end: int) -> int:
        cap = self.stream.batches_per_epoch
        if cap is None:
            raise TypeError(f"{self.stream!r} has no length: a stream's batches are known only once it ends. "
                            "Give batches_per_epoch= to ap.Stream or ap.Fetcher for a fixed one.")
        return max(0, (end - position.epoch) * cap - position.batches)

    def next_length(self) -> int:
        if self.epochs is None:
            raise TypeError("a Loader with epochs=None never ends and has no length")
        position: Any = self.position()
        end = position.end if position.end is not None and position.end > position.epoch else (
            position.epoch + self.epochs)
        return self.remaining(position, end)
