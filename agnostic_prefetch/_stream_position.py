"""Where an iteration over a stream stands, and its ``state_dict``.

A stream's batches come from the workers in turn: worker 0's first batch, worker 1's first,
..., then every worker's second, a worker whose stream has ended dropping out of the turn
(what torch's ``DataLoader`` does with an ``IterableDataset``). So the position is, per
worker, how many of its batches were taken this epoch, how many its stream has (once it
ended) and its stream's state after them; the next turn is the worker with the fewest taken
(the lowest index among equals) whose stream still has batches. Positions are immutable,
replaced whole on every delivery, so another thread may read one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from agnostic_prefetch._resume import STATE_VERSION

__all__ = ["StreamPosition", "decode_stream", "encode_stream", "stream_settings"]


class StreamPosition(NamedTuple):
    """How far an iteration over a stream has delivered.

    Attributes:
        epoch: the epoch in progress.
        taken: per worker, its batches taken this epoch (delivered, dropped or empty).
        ends: per worker, its stream's batch count this epoch, once it ended (else ``None``).
        states: per worker, its stream's state after its taken batches (``None``: at the
            epoch's start, or a stream that keeps no state).
        batches: batches delivered this epoch (``batches_per_epoch`` counts them).
        end: the epoch where the iteration in progress stops; ``None`` when none is.
    """

    epoch: int
    taken: tuple[int, ...]
    ends: tuple[int | None, ...]
    states: tuple[Any, ...]
    batches: int
    end: int | None

    @staticmethod
    def start(epoch: int, workers: int, end: int | None = None) -> StreamPosition:
        """Epoch ``epoch``'s start."""
        return StreamPosition(epoch, (0,) * workers, (None,) * workers, (None,) * workers, 0, end)

    def exhausted(self, worker: int) -> bool:
        """Whether ``worker``'s stream has no batch left this epoch."""
        end = self.ends[worker]
        return end is not None and self.taken[worker] >= end

    def turn(self) -> int | None:
        """The worker whose batch comes next in order; ``None`` once every stream ended."""
        best = None
        for w, n in enumerate(self.taken):
            if not self.exhausted(w) and (best is None or n < self.taken[best]):
                best = w
        return best

    def after(self, worker: int, ended: bool, state: Any, delivered: bool) -> StreamPosition:
        """This position once ``worker``'s next batch was taken: its stream ``ended`` with
        it (an empty batch then is no batch), its state after it, and whether it was
        delivered (not empty, dropped or padding)."""
        taken, ends, states = list(self.taken), list(self.ends), list(self.states)
        if ended:
            ends[worker] = taken[worker] + (1 if delivered else 0)
        taken[worker] += 1
        states[worker] = state
        return self._replace(taken=tuple(taken), ends=tuple(ends), states=tuple(states),
                             batches=self.batches + (1 if delivered else 0))

    def next_epoch(self) -> StreamPosition:
        return StreamPosition.start(self.epoch + 1, len(self.taken), self.end)


def stream_settings(stream: Any, workers: int, sampler: Any, ordered: bool) -> dict[str, Any]:
    """What a stream's state must record for a resume to be exact."""
    return {"kind": "stream", "stream": repr(stream), "workers": workers, "batch_size": sampler.batch_size,
            "global_batch_size": sampler.global_batch_size, "shard_index": sampler.shard_index,
            "shard_count": sampler.shard_count, "seed": sampler.seed, "remainder": sampler.remainder,
            "ordered": ordered}


def encode_stream(position: StreamPosition, settings: dict[str, Any], endless: bool) -> dict[str, Any]:
    """``position`` as a state dict (the streams' own states inside it, as they gave them)."""
    return {"version": STATE_VERSION, "epoch": position.epoch, "taken": list(position.taken),
            "ends": list(position.ends), "stream_states": list(position.states), "batches": position.batches,
            "end_epoch": None if position.end is None or endless else position.end, **settings}


_MUST_MATCH = ("kind", "workers", "batch_size", "shard_count", "shard_index", "seed", "remainder")


def decode_stream(state: dict[str, Any] | list[dict[str, Any]], settings: dict[str, Any]) -> StreamPosition:
    """The position ``state`` describes, after checking this loader can continue it exactly.

    Raises:
        ValueError: another kind of state, another worker count, shard, batch size, seed,
            or a stream without state saved mid-epoch; the message names the remedy.
    """
    if isinstance(state, list | tuple):
        mine = [s for s in state if s.get("shard_index") == settings["shard_index"]]
        if not mine:
            raise ValueError(f"none of the {len(state)} states was saved by shard {settings['shard_index']}: "
                             "a stream's state belongs to the process that read it")
        state = mine[0]
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unknown state version {state.get('version')!r}; this agnostic_prefetch reads "
                         f"version {STATE_VERSION}")
    if state.get("kind") != "stream":
        raise ValueError("this state was saved by a loader over a map-style source, and this loader reads a "
                         "stream: resume it with a loader over the same map-style source")
    for key in _MUST_MATCH:
        if state.get(key) != settings[key]:
            raise ValueError(_mismatch(key, state.get(key), settings[key]))
    taken = tuple(state["taken"])
    states = tuple(state["stream_states"])
    ends = tuple(state["ends"])
    lost = [w for w, (n, s, e) in enumerate(zip(taken, states, ends, strict=True))
            if n and s is None and not (e is not None and n >= e)]
    if lost:
        raise ValueError(
            f"this state was saved in the middle of epoch {state['epoch']}, and the stream {state['stream']} "
            f"keeps no state (workers {lost} had read into their streams; it has no state_dict()/"
            "load_state_dict()), so where it stood cannot be restored. Give the stream (or its iterator) "
            "state_dict() and load_state_dict() (torchdata's Stateful), resume from a state saved at an "
            "epoch's end, or use a map-style source (len and [i]) for exact and elastic resume "
            "(docs/streams.md).")
    return StreamPosition(state["epoch"], taken, ends, states, state["batches"], state.get("end_epoch"))


def _mismatch(key: str, saved: Any, here: Any) -> str:
    if key == "workers":
        return (f"this state was saved with workers={saved} and this loader has workers={here}: each worker "
                "reads its own part of a stream, so the run continues exactly only on as many workers. Build "
                f"the loader with workers={saved}, or use a map-style source (len and [i]) to resume on "
                "another worker count (docs/streams.md).")
    if key == "kind":
        return ("this state was saved by a loader over a map-style source, and this loader reads a stream: "
                "resume it with a loader over the same map-style source")
    return (f"this state was saved with {key}={saved!r} but this loader has {key}={here!r}; build the "
            "loader with the same setting to resume the stream.")
