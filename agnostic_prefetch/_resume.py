"""Resume: where an iteration stands, and its ``state_dict`` (small, JSON-able, checked on load).

Positions count *global batch sequence numbers*, ``seq = epoch * batches_per_epoch + k``:
batch ``k`` of ``epoch`` is a pure function of ``seq`` (see ``sampler.py``), so a position
is all it takes to continue exactly. Positions are immutable tuples, replaced whole on every
delivery, so another thread can read one (``state_dict()``) without a lock.
"""

from __future__ import annotations

from typing import Any, NamedTuple

STATE_VERSION = 1
ENDLESS = 1 << 62  # the end of an iteration with epochs=None
# Settings that change which records form batch k of epoch e: a state saved under other
# values would resume into other batches.
ORDER_SETTINGS = ("seed", "batch_size", "batches_per_epoch", "shard_index", "shard_count",
                  "shuffle", "drop_remainder")


class Position(NamedTuple):
    """How far an iteration has delivered.

    Attributes:
        next_seq: the lowest batch not yet delivered (never one that is in ``ahead``).
        ahead: batches above ``next_seq`` delivered out of order (only with ``ordered=False``).
        end: where the iteration in progress stops; ``None`` when none is in progress.
    """

    next_seq: int
    ahead: frozenset[int]
    end: int | None

    def after(self, seq: int) -> Position:
        """This position once batch ``seq`` has been delivered too."""
        if seq != self.next_seq:
            return Position(self.next_seq, self.ahead | {seq}, self.end)
        following = seq + 1
        ahead = self.ahead
        if ahead:
            while following in ahead:
                following += 1
            ahead = frozenset(s for s in ahead if s > following)
        return Position(following, ahead, self.end)

    def delivered(self, seq: int) -> bool:
        return seq < self.next_seq or seq in self.ahead

    def remaining(self, end: int) -> int:
        """Batches not yet delivered before ``end``."""
        return end - self.next_seq - sum(1 for s in self.ahead if s < end)


START = Position(0, frozenset(), None)


def iteration_end(position: Position, epochs: int | None, batches_per_epoch: int) -> int:
    """Where an iteration started from ``position`` stops: the end of one it interrupted, else
    ``epochs`` whole epochs after the epoch it starts in."""
    if epochs is None:
        return ENDLESS
    if position.end is not None and position.end > position.next_seq:
        return position.end
    return (position.next_seq // batches_per_epoch + epochs) * batches_per_epoch


def encode(position: Position, settings: dict[str, Any], *, endless: bool) -> dict[str, Any]:
    """``position`` as a state dict, with the ``settings`` that resuming must match."""
    bpe = settings["batches_per_epoch"]
    epoch, number = divmod(position.next_seq, bpe)
    return {
        "version": STATE_VERSION,
        "seed": settings["seed"],
        "epoch": epoch,
        "batch": number,
        "delivered_ahead": [list(divmod(s, bpe)) for s in sorted(position.ahead)],
        # An interrupted iteration (epochs > 1, or a break) resumes up to its own end.
        "end_epoch": None if position.end is None or endless else position.end // bpe,
        **{key: settings[key] for key in ORDER_SETTINGS if key != "seed"},
    }


def decode(state: dict[str, Any], settings: dict[str, Any]) -> Position:
    """The position a state dict describes, after checking it was saved under ``settings``.

    Raises:
        ValueError: an unknown version, or a setting that differs (naming both values).
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unknown state version {state.get('version')!r}; expected {STATE_VERSION}")
    for key in ORDER_SETTINGS:
        if state[key] != settings[key]:
            raise ValueError(
                f"state_dict was saved with {key}={state[key]!r} but this loader has "
                f"{key}={settings[key]!r}; build the loader with the same settings to resume."
            )
    bpe = settings["batches_per_epoch"]
    ahead = frozenset(e * bpe + b for e, b in state["delivered_ahead"])
    next_seq = state["epoch"] * bpe + state["batch"]
    while next_seq in ahead:  # the frontier never points at a delivered batch
        next_seq += 1
    end_epoch = state.get("end_epoch")
    return Position(next_seq, frozenset(s for s in ahead if s > next_seq),
                    None if end_epoch is None else end_epoch * bpe)
