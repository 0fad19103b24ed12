"""Each item's sequence lengths, known before the first batch: given, asked of the source, read
from a file, or measured in one parallel pass of the workers (with a progress bar, saved
where the user says, and one log line saying what it cost).

A length is per sequence key, along the item's first axis, *after* the transform, and a
function of the index alone: the plans of ``_plan.py`` are made from it, and a worker checks
every item against its planned length.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agnostic_prefetch.batching import Bucket, Pack, Pad
from agnostic_prefetch.sampler import item_rng

__all__ = ["Measure", "lengths_for", "sequence_keys"]

log = logging.getLogger("agnostic_prefetch")

MEASURE_BATCH = 1024  # items per batch of the measuring pass
_RECORDS = "__records__"


def sequence_keys(batching: Pad | Bucket | Pack, example: Any) -> tuple[str, ...]:
    """The sequence keys: ``keys=``, else those ``length=`` or ``lengths=`` name, else every leaf
    of the first example that is an array of at least one dimension.

    Raises:
        ValueError: the example is no dict, lacks a key, or a key is no sequence.
    """
    if not isinstance(example, dict):
        raise ValueError(f"sequence batching needs dict items (one leaf per sequence); this source yields "
                         f"{type(example).__name__}. Return a dict from the source or the transform.")
    if batching.keys is not None:
        keys = tuple(batching.keys)
    elif isinstance(getattr(batching, "length", None), Mapping):
        keys = tuple(batching.length)  # type: ignore[union-attr, arg-type]
    elif isinstance(batching.lengths, Mapping):
        keys = tuple(batching.lengths)
    else:
        keys = tuple(k for k, v in example.items() if np.ndim(v) >= 1 and not isinstance(v, str | bytes))
        if not keys:
            raise ValueError(f"the first example has no sequence leaf (an array of at least one dimension): "
                             f"its leaves are {_describe(example)}. Return the sequences as arrays.")
    for key in keys:
        if key not in example:
            raise ValueError(f"sequence key {key!r} is not a leaf of the first example, whose keys are "
                             f"{sorted(map(str, example))}")
        if np.ndim(example[key]) < 1:
            raise ValueError(f"sequence key {key!r} is {_describe({key: example[key]})} in the first example; a "
                             "sequence leaf has a first (time) axis. Name only sequence leaves in keys=.")
    return keys


def _describe(example: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {np.asarray(v).dtype}{list(np.shape(v))}" for k, v in example.items())


class Measure:
    """A source whose item ``i`` is the lengths of item ``i`` of another, transformed (the pass).

    With ``skip``, an item that fails gets length -1 for every key (left out when planned:
    its pieces hold nothing, and the worker that fills it skips it again).
    """

    thread_safe = True

    def __init__(self, source: Any, transform: Any, keys: tuple[str, ...], seed: int, skip: bool) -> None:
        self.source, self.transform, self.keys, self.seed, self.skip = source, transform, keys, seed, skip

    def __len__(self) -> int:
        return int(getattr(self.source, "index_space", len(self.source)))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        try:
            example = self.source[index]
            if self.transform is not None:
                example = self.transform(example, item_rng(self.seed, 0, index))
            return {"n": np.array([np.shape(example[k])[0] for k in self.keys], np.int64)}
        except Exception:
            if not self.skip:
                raise
            return {"n": np.full(len(self.keys), -1, np.int64)}

    def locate(self, index: int) -> str | None:
        locate = getattr(self.source, "locate", None)
        return locate(index) if locate is not None else None

    def release(self) -> None:
        release = getattr(self.source, "release", None)
        if callable(release):
            release()


def lengths_for(source: Any, batching: Pad | Bucket | Pack, keys: tuple[str, ...],
                measure: Callable[[Measure], Iterable[Any]], make: Callable[[], Measure]) -> list[np.ndarray]:
    """Per key, each index's length: from ``lengths=`` (an array, a dict, or a file), the
    source's ``lengths()``, or a pass of ``measure`` over ``make()`` (saved to a given path).

    Raises:
        ValueError: lengths of the wrong count, kind or sign, naming the remedy.
    """
    records = int(getattr(source, "index_space", len(source)))
    given = batching.lengths
    if isinstance(given, str | os.PathLike):
        path = Path(given)
        if path.exists():
            return _checked(_read(path), keys, records, f"the lengths file {path}")
        found = _checked(_measured(measure, make(), records, path), keys, records, "the measured lengths")
        return found
    if given is not None:
        return _checked(given, keys, records, "lengths=")
    method = getattr(source, "lengths", None)
    answer = method() if callable(method) else None
    if answer is not None:
        return _checked(answer, keys, records, f"{type(source).__name__}.lengths()")
    return _checked(_measured(measure, make(), records, None), keys, records, "the measured lengths")


def _measured(measure: Callable[[Measure], Iterable[Any]], source: Measure, records: int,
              path: Path | None) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    parts = []
    with tqdm(total=records, desc="agnostic_prefetch: measuring sequence lengths", unit="item",
              disable=None, leave=False) as bar:
        for batch in measure(source):
            parts.append(np.array(batch["n"], np.int64))
            bar.update(len(parts[-1]))
    table = np.concatenate(parts) if parts else np.zeros((0, len(source.keys)), np.int64)
    found = {k: table[:, i] for i, k in enumerate(source.keys)}
    took = time.perf_counter() - started
    where = ""
    if path is not None:
        _write(path, found, records)
        where = f"; saved to {path} (lengths= that path reads it next time)"
    log.info("measured the sequence lengths of %d items in %.1f s (%.0f items/s, one pass of the workers)%s",
             records, took, records / max(took, 1e-9), where)
    return found


def _write(path: Path, lengths: dict[str, np.ndarray], records: int) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **lengths, **{_RECORDS: np.int64(records)})
    os.replace(partial, path)


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {k: stored[k] for k in stored.files if k != _RECORDS}


def _checked(lengths: Any, keys: tuple[str, ...], records: int, origin: str) -> list[np.ndarray]:
    """``lengths`` as one int64 array per key, each with one entry per record."""
    if isinstance(lengths, Mapping):
        missing = [k for k in keys if k not in lengths]
        if missing:
            raise ValueError(f"{origin} has no lengths for {missing} (it has {sorted(map(str, lengths))}); "
                             "give one array per sequence key")
        arrays = [lengths[k] for k in keys]
    else:
        arrays = [lengths] * len(keys)  # one array for every key
    out = []
    for key, array in zip(keys, arrays, strict=True):
        m = np.asarray(array)
        if m.ndim != 1 or m.dtype.kind not in "iu":
            raise ValueError(f"{origin} for {key!r} is {m.dtype}{list(m.shape)}; give a 1-D integer array, "
                             "one length per record")
        if len(m) != records:
            raise ValueError(
                f"{origin} for {key!r} has {len(m)} entries but the source has {records} records"
                + (" (delete the file to measure them again)" if "file" in origin else "")
                + "; give one length per record")
        if len(m) and int(m.min()) < -1:
            bad = int(np.argmin(m))
            raise ValueError(f"{origin} for {key!r} gives record {bad} the length {int(m[bad])}; lengths are >= 0")
        out.append(np.maximum(m.astype(np.int64), 0))
    return out
