"""The example a loader's ring is laid out from: read in the parent, then let go."""

from __future__ import annotations

from typing import Any

from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import item_rng

__all__ = ["let_go", "read_example"]


def let_go(source: Any) -> None:
    """Release what reading the layout example opened in this process (an LMDB environment:
    py-lmdb allows one per path, and the user may open the database too), for a source that
    offers ``release()`` (it reopens lazily if read here again; see ``MapSource``)."""
    release = getattr(source, "release", None)
    if callable(release):
        release()


def read_example(sampler: Any, source: Any, transform: Any, skip: bool) -> Any:
    """The first example of global batch 0 that reads, transformed: what the ring's layout
    is made from (from the whole global batch: this shard's slice of it may be padding)."""
    try:
        errors = []
        for position, index in enumerate(sampler.global_batch(0, 0).tolist()):
            try:
                example = source[index]
                if transform is not None:
                    example = transform(example, item_rng(sampler.seed, 0, position))
                return example
            except Exception as exc:
                if not skip:
                    raise LoaderError(
                        f"reading record {index} in the parent to lay out the ring failed: "
                        f"{type(exc).__name__}: {exc}. Fix the record, pass on_error='skip', or "
                        "give spec= explicitly."
                    ) from exc
                errors.append(f"record {index}: {exc}")
        raise LoaderError("every record of the first batch failed; cannot lay out the ring:\n" + "\n".join(errors))
    finally:
        let_go(source)
