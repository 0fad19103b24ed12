"""Resume: where an iteration stands, and its ``state_dict`` (small, JSON-able, checked on load).

Positions count *global batch sequence numbers*, ``seq = epoch * batches_per_epoch + k``:
global batch ``k`` of ``epoch`` is a pure function of ``seq`` and the global batch size, not
of the shard count (see ``sampler.py``), so a position is all it takes to continue exactly,
on any shard count that divides the global batch (docs/elastic.md has the rules). Positions
are immutable tuples, replaced whole on every delivery, so another thread can read one
(``state_dict()``) without a lock.
"""

from __future__ import annotations

from typing import Any, NamedTuple

STATE_VERSION = 2
ENDLESS = 1 << 62  # the end of an iteration with epochs=None
# Settings that decide which records form global batch k of epoch e: a state saved under
# other values would resume into other batches. The shard count and index are not among
# them: global batches do not depend on them (see ``check_shards`` for the one exception).
ORDER_SETTINGS = ("seed", "shuffle", "source_order", "source_len", "global_batch_size",
                  "drop_remainder", "batching", "batches_per_epoch")


def order_settings(sampler: Any, ordered: bool) -> dict[str, Any]:
    """What a loader's state must record about its order (``sampler`` is a ``Sampler``)."""
    return {
        "seed": sampler.seed, "shuffle": sampler.shuffle and not sampler.orders_itself,
        "source_len": sampler.source_len, "batch_order": sampler.orders_itself,
        "global_batch_size": sampler.global_batch_size, "drop_remainder": sampler.drop_remainder,
        "batches_per_epoch": sampler.batches_per_epoch, "batch_size": sampler.batch_size,
        "shard_index": sampler.shard_index, "shard_count": sampler.shard_count,
        "remainder": sampler.remainder, "ordered": ordered,
    }


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
        "epoch": epoch,
        "batch": number,  # global batches of this epoch delivered (on every shard alike)
        "delivered_ahead": [list(divmod(s, bpe)) for s in sorted(position.ahead)],
        # An interrupted iteration (epochs > 1, or a break) resumes up to its own end.
        "end_epoch": None if position.end is None or endless else position.end // bpe,
        **settings,
    }


def decode(state: dict[str, Any] | list[dict[str, Any]], settings: dict[str, Any]) -> Position:
    """The position a state dict describes, after checking it can be honoured under ``settings``.

    A state saved with any shard count loads into any other that divides the same global
    batch, except where an out-of-order set belongs to one process (``check_shards``).
    ``state`` may be the list of every process's states (see :func:`pick`).

    Raises:
        ValueError: an unknown version, or a state this loader cannot continue exactly
            (naming both values and the remedy).
    """
    if isinstance(state, list | tuple):
        state = pick(list(state), settings)
    if state.get("kind") == "stream":
        raise ValueError(f"this state was saved by a loader over a stream ({state.get('stream')}), and this "
                         "loader reads a map-style source: resume it with a loader over the same stream")
    version = state.get("version")
    if version == 1:
        state = _from_version_1(state, settings)
    elif version != STATE_VERSION:
        raise ValueError(f"unknown state version {version!r}; this agnostic_prefetch reads "
                         f"versions 1 and {STATE_VERSION}")
    for key in ORDER_SETTINGS:
        # A state saved before a setting existed had its default (no batching=).
        if (key in state or key == "batching") and state.get(key) != settings.get(key):
            raise ValueError(_mismatch(key, state, settings))
    check_shards(state, settings)
    bpe = settings["batches_per_epoch"]
    ahead = frozenset(e * bpe + b for e, b in state["delivered_ahead"])
    next_seq = state["epoch"] * bpe + state["batch"]
    while next_seq in ahead:  # the frontier never points at a delivered batch
        next_seq += 1
    end_epoch = state.get("end_epoch")
    return Position(next_seq, frozenset(s for s in ahead if s > next_seq),
                    None if end_epoch is None else end_epoch * bpe)


_POSITION = ("epoch", "batch", "delivered_ahead", "end_epoch", "plan_cursor")


def pick(states: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The state this shard continues from, out of every process's states of one run.

    They must agree on the settings that decide the order (always checked first); in an
    ordered run (or one with a single shard) every process delivered the same global
    batches, so they must agree on the position too and any of them will do. Out of order,
    each shard's own state is taken, or any one if all stand at one frontier.

    Raises:
        ValueError: no states, or states that are not one run's checkpoint at one step.
    """
    if not states:
        raise ValueError("no states to resume from (an empty list)")
    first = states[0]
    shared = ("version", *ORDER_SETTINGS, "shard_count", "ordered")
    _check_agree(states, shared, "the processes of one run share their settings")
    whole = first.get("ordered", True) or first.get("shard_count") == 1
    every_shard = {s.get("shard_index") for s in states} == set(range(first.get("shard_count", 1)))
    if not whole and every_shard and all(
            not s.get("delivered_ahead") and all(s.get(k) == first.get(k) for k in _POSITION) for s in states):
        # Out of order, but every process stands at the same frontier with nothing ahead:
        # each delivered exactly its slices of the same global batches.
        return {**first, "ordered": True}
    if whole:
        _check_agree(states, _POSITION, "an ordered run's processes deliver the same global "
                     "batches in step")
        return first
    mine = [s for s in states if s.get("shard_index") == settings["shard_index"]]
    return mine[0] if mine else first  # decode refuses another shard count, naming it


def _check_agree(states: list[dict[str, Any]], keys: tuple[str, ...], why: str) -> None:
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        for key in keys:
            if state.get(key) != first.get(key):
                raise ValueError(
                    f"the processes' states disagree: process 0 saved {key}={first.get(key)!r}, "
                    f"process {i} {key}={state.get(key)!r}. As {why}, these are not one "
                    "checkpoint: save every process's state at the same step, from loaders "
                    "with the same settings.")


def check_shards(state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse another shard where the saved position is one process's own.

    With ``ordered=False`` and several shards, each process delivered its own set of
    batches out of order: that set says nothing about the other processes' slices.
    """
    saved_count, saved_index = state["shard_count"], state["shard_index"]
    if state["ordered"] or saved_count == 1:
        return
    if saved_count != settings["shard_count"]:
        raise ValueError(
            f"this state was saved with ordered=False by shard {saved_index} of {saved_count}; "
            f"out of order, each process delivered its own set of batches, so the run cannot "
            f"continue on shard_count={settings['shard_count']}. Resume with shard_count="
            f"{saved_count}, or train with ordered=True to change the number of hosts.")
    if saved_index != settings["shard_index"]:
        raise ValueError(
            f"this state was saved with ordered=False by shard {saved_index} of {saved_count}, "
            f"but this loader is shard {settings['shard_index']}: out of order, each process "
            "must load its own state (agnostic_prefetch.orbax.CheckpointRestore picks it).")


def _mismatch(key: str, state: dict[str, Any], settings: dict[str, Any]) -> str:
    saved, here = state.get(key), settings.get(key)
    if key == "global_batch_size":
        count = settings["shard_count"]
        if saved % count == 0:
            remedy = (f"build the loader with batch_size={saved // count} (or "
                      f"global_batch_size={saved}) for shard_count={count}")
        else:
            divisors = [d for d in range(1, saved + 1) if saved % d == 0]
            remedy = (f"{saved} does not split into {count} equal slices; resume on a shard "
                      f"count that divides it ({', '.join(map(str, divisors))})")
        return (f"state_dict was saved with a global batch of {saved} items but this loader's "
                f"is {here} (batch_size={settings['batch_size']} x shard_count={count}); {remedy}.")
    if key == "source_order":
        return (f"state_dict was saved over a source whose order is defined by {saved!r}, but "
                f"this source's is {here!r} (another mixture's weights or components, say); "
                "resume with the same source.")
    if key == "batching":
        return (f"state_dict was saved with batching {saved or 'None (items stacked)'} but this loader's is "
                f"{here or 'None (items stacked)'}: other batching settings or other lengths give other "
                "batches. Resume with the same batching= and the same data.")
    if key == "source_len":
        return (f"state_dict was saved over a source of {saved} records but this source has "
                f"{here}: the order of a different source would differ. Resume with the same "
                "source.")
    return (f"state_dict was saved with {key}={saved!r} but this loader has {key}={here!r}; "
            "build the loader with the same setting to resume.")


def _from_version_1(state: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    # Version 1 sharded each epoch into contiguous runs: with one shard its batch k is global
    # batch k, with several no global batch corresponds to what a shard has seen.
    if settings.get("batch_order"):
        raise ValueError(
            "this state (version 1) was saved over a source that orders its own batches; "
            "version 2 lays those batches out differently (WindowSource spreads its foreground "
            "windows through each batch), so the state would resume into other batches. "
            "Resume it with the agnostic_prefetch release that saved it, or start the data "
            "order afresh (a new Loader without load_state_dict).")
    if state["shard_count"] > 1:
        raise ValueError(
            f"this state (version 1) was saved by shard {state['shard_index']} of "
            f"{state['shard_count']}, when shards were contiguous runs of each epoch; it cannot "
            "be mapped onto global batches. Resume it with the agnostic_prefetch release that "
            "saved it, or start the data order afresh (a new Loader without load_state_dict).")
    return {**state, "global_batch_size": state["batch_size"], "ordered": True}
