"""Orbax checkpoints of the data position, next to the model's: every process's, restorable on
another process count.

``CheckpointSave(it)`` and ``CheckpointRestore(it)`` are Orbax checkpoint args (registered
with :class:`Handler` the way Orbax's API expects), for use inside ``ocp.args.Composite``.
Saving writes one small JSON file per process, ``process_<i>-of-<n>.json``, holding that
process's ``state_dict()``. Restoring reads *every* process file of the saved run (however
many processes saved it), checks that they agree, and positions ``it`` (a ``Loader``
iterator, a ``Loader`` or a prefetcher) with the state its shard needs; so a run saved on
two hosts restores on three, or one (docs/elastic.md).

Importing this module imports Orbax and JAX (``pip install agnostic_prefetch[orbax]``);
``import agnostic_prefetch`` never does.

Example:
    >>> import orbax.checkpoint as ocp  # doctest: +SKIP
    >>> from agnostic_prefetch.orbax import CheckpointRestore, CheckpointSave  # doctest: +SKIP
    >>> it = ap.prefetch_to_device(loader, sharding=sharding)  # doctest: +SKIP
    >>> manager.save(step, args=ocp.args.Composite(  # doctest: +SKIP
    ...     state=ocp.args.StandardSave(state), data=CheckpointSave(it)))
    >>> restored = manager.restore(step, args=ocp.args.Composite(  # doctest: +SKIP
    ...     state=ocp.args.StandardRestore(abstract_state), data=CheckpointRestore(it)))
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointRestore", "CheckpointSave", "Handler"]

_NAME = re.compile(r"process_(\d+)-of-(\d+)\.json")


class Handler(ocp.CheckpointHandler):
    """Saves this process's position as ``process_<i>-of-<n>.json``; restores from all of them."""

    # ``directory`` is Orbax's path object (an ``etils.epath.Path``: local, GCS, ...); only
    # its pathlib-like methods are used, so any storage Orbax supports works.

    def save(self, directory: Any, *args: Any, **kwargs: Any) -> None:
        save_args = _args(args, kwargs, CheckpointSave)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(save_args.state, sort_keys=True))

    def restore(self, directory: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Every process's state, in process order; positions ``args.iterator`` if given.

        Raises:
            FileNotFoundError: no process file, or some of the saved run's are missing.
            ValueError: the files disagree, or the iterator cannot continue from them.
        """
        restore_args = _args(args, kwargs, CheckpointRestore, required=False)
        states = read_states(directory)
        if restore_args is not None:
            restore_args.iterator.load_state_dict(states)
        return states

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


def read_states(directory: Any) -> list[dict[str, Any]]:
    """The states of every process of the run saved in ``directory``, in process order."""
    found: dict[int, dict[int, Any]] = {}
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if len(found) != 1:
        raise FileNotFoundError(
            f"{directory} holds data positions of {sorted(found) or 'no'} process counts; expected "
            "the process_<i>-of-<n>.json files of one run (saved with agnostic_prefetch.orbax.CheckpointSave)")
    (count, files), = found.items()
    missing = sorted(set(range(count)) - set(files))
    if missing:
        raise FileNotFoundError(
            f"{directory}: the run was saved by {count} processes but the files of processes "
            f"{missing} are missing; a checkpoint is complete only with every process's file")
    return [json.loads(files[i].read_text()) for i in range(count)]


@ocp.args.register_with_handler(Handler, for_save=True)
@dataclasses.dataclass
class CheckpointSave(ocp.args.CheckpointArgs):
    """Save ``iterator``'s position; it is taken now, when the args are built (a prefetch
    stage's thread keeps moving while Orbax saves)."""

    iterator: Any
    state: dict[str, Any] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        state = self.iterator.state_dict()
        if state is None:
            raise TypeError(f"{type(self.iterator).__name__} has no position to save (its source has no state_dict)")
        self.state = state


@ocp.args.register_with_handler(Handler, for_restore=True)
@dataclasses.dataclass
class CheckpointRestore(ocp.args.CheckpointArgs):
    """Restore the saved run's position into ``iterator`` (a ``Loader``, its iterator, or a prefetcher)."""

    iterator: Any


def _args(args: tuple[Any, ...], kwargs: dict[str, Any], kind: type, required: bool = True) -> Any:
    value = kwargs.get("args", args[0] if args else None)
    if value is None and not required:
        return None
    if not isinstance(value, kind):
        raise TypeError(f"agnostic_prefetch.orbax.Handler needs {kind.__name__}(iterator), got {value!r}")
    return value
