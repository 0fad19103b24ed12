"""The example a loader's ring is laid out from: read in the parent, then let go."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from agnostic_prefetch._worker import explain
from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import item_rng

log = logging.getLogger("agnostic_prefetch")

__all__ = ["let_go", "read_example"]


def let_go(source: Any) -> None:
    """Release what reading the layout example opened in this process (an LMDB environment:
    py-lmdb allows one per path, and the user may open the database too), for a source that
    offers ``release()`` (it reopens lazily if read here again; see ``MapSource``)."""
    release = getattr(source, "release", None)
    if callable(release):
        release()


# With on_error="skip", how many records the parent tries before it gives up on laying out
# the ring from the data (a database whose every record is bad should not be read whole).
MAX_TRIED = 256


def read_example(sampler: Any, source: Any, transform: Any, skip: bool) -> Any:
    """The first example of the epoch's order that reads, transformed: what the ring's layout
    is made from (global batch 0 first: this shard's slice of it may be padding).

    A record that fails follows ``on_error``: with ``"raise"`` the error names it (its index,
    where the source says it comes from, the cause and a remedy); with ``"skip"`` the next
    record is read, up to ``MAX_TRIED`` of them.

    Raises:
        LoaderError: a record failed (``"raise"``), or every record tried did (``"skip"``).
    """
    try:
        errors = []
        for position, index in enumerate(_first_records(sampler)):
            try:
                example = source[index]
                if transform is not None:
                    example = transform(example, item_rng(sampler.seed, 0, position))
                return example
            except Exception as exc:
                where, remedy = explain(source, index, exc)
                record = f"record {index}" + (f" ({where})" if where else "")
                if not skip:
                    raise LoaderError(
                        f"reading {record} in the parent to lay out the ring failed: "
                        f"{type(exc).__name__}: {exc}. "
                        + (f"Remedy: {remedy}; or " if remedy else "Fix the record, ")
                        + "pass on_error='skip' (bad records are left out, counted and logged), or "
                        "give spec= explicitly.") from exc
                log.warning("skipped %s while laying out the ring (on_error='skip'): %s: %s",
                            record, type(exc).__name__, exc)
                errors.append(f"{record}: {type(exc).__name__}: {exc}")
                if len(errors) >= MAX_TRIED:
                    break
        raise LoaderError(f"every one of the first {len(errors)} records failed; cannot lay out the "
                          "ring from the data (give spec= explicitly, or fix the source):\n" + "\n".join(errors))
    finally:
        let_go(source)


def _first_records(sampler: Any) -> Iterator[int]:
    """Record indices in the order of epoch 0's global batches."""
    for number in range(sampler.batches_per_epoch):
        yield from sampler.global_batch(0, number).tolist()
