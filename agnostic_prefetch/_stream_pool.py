"""Setting up a loader over a stream: the settings a stream allows, its workers, its layout example.

The parts of ``_assemble`` that only a stream needs: what is refused (with the reason and
the remedy), how many workers of which backend read it (``workers="auto"`` included), and
the example the ring is laid out from, read in the parent from worker 0's part of the stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agnostic_prefetch._cpus import cpu_budget
from agnostic_prefetch._example import MAX_TRIED
from agnostic_prefetch._settings import LoaderOptions
from agnostic_prefetch._stream_read import StreamJob, StreamReader
from agnostic_prefetch.errors import LoaderError
from agnostic_prefetch.sampler import item_rng
from agnostic_prefetch.streams import Fetcher, Stream, set_stream_info

log = logging.getLogger("agnostic_prefetch")

__all__ = ["StreamPool", "read_stream_example", "stream_pool"]


@dataclass(frozen=True)
class StreamPool:
    """The workers a stream is read by: ``started`` of ``backend`` (0: the caller), and what
    each worker is told (``job``)."""

    job: StreamJob
    started: int
    backend: str


def stream_pool(stream: Stream | Fetcher, options: LoaderOptions) -> StreamPool:
    """The workers for ``stream``, after checking the settings a stream allows.

    Raises:
        ValueError: a setting a stream cannot honour, naming the remedy.
    """
    order, pool, items = options.order, options.pool, options.items
    if order.shuffle:
        raise ValueError("shuffle=True with a stream: the loader cannot reorder what a stream has not yielded "
                         "yet. Shuffle in the stream (ap.stream_info().seed and .epoch give each worker a seed "
                         "per epoch), or use a map-style source (len and [i]).")
    if items.batching is not None:
        raise ValueError("batching= with a stream: Pad, Bucket and Pack plan batches from every item's length "
                         "before the epoch, which a stream cannot give. Pad or pack in the stream itself, or use "
                         "a map-style source (docs/sequences.md).")
    if items.shapes != "fixed":
        raise ValueError("shapes='per_batch' with a stream is not supported: give every item one shape (pad or "
                         "crop in the transform), or use a map-style source.")
    if order.shard_count > 1 and order.remainder == "short":
        raise ValueError(
            f"a stream with shard_count={order.shard_count} needs remainder='pad' or 'drop': each worker's last "
            "batch may be short, and every process must feed the same shapes. With 'pad' (and "
            "batches_per_epoch= on the stream, so every process steps as often) short batches are padded "
            "and a mask marks real rows (docs/streams.md).")
    backend = "thread" if pool.backend == "thread" else "process"
    if pool.workers == "auto":
        count = max(1, int(cpu_budget().cpus))
        log.info("workers='auto' with a stream: %d %s workers, one per CPU this process may use (each worker "
                 "reads its own part of the stream, so their number cannot change while it runs)", count, backend)
    else:
        count = int(pool.workers)
    if count and backend == "thread" and stream.torch:
        raise ValueError(
            "backend='thread' with a torch IterableDataset: torch's get_worker_info() answers per process, so "
            "threads would all see one worker. Use backend='process' (the default), or ap.Stream(make_iterator) "
            "with make_iterator(worker_id, num_workers) and thread_safe=True.")
    job = StreamJob(max(1, count), order.shard_index, order.shard_count, order.batch_size)
    return StreamPool(job, count, backend)


def read_stream_example(stream: Stream | Fetcher, transform: Any, seed: int, pool: StreamPool, skip: bool) -> Any:
    """The first item that reads, transformed, of worker 0's part of the stream (or, where it
    is empty, the next worker's): what the ring's layout is made from (read in the parent;
    give ``spec=`` to avoid it).

    Raises:
        LoaderError: the item failed (``on_error="raise"``), every one tried did, or every
            worker's part is empty.
    """
    errors: list[str] = []
    for worker in range(pool.job.workers):
        reader = StreamReader(stream, pool.job, worker, seed, own_process=False)
        try:
            reader.open(0)
            while len(errors) < MAX_TRIED:
                item = reader.items
                try:
                    example = reader.next_item()
                    if transform is not None:
                        example = transform(example, item_rng(seed, 0, item))
                    return example
                except StopIteration:
                    break
                except Exception as exc:
                    what = f"item {item} of worker {worker}'s part of {stream!r}"
                    if not skip:
                        raise LoaderError(f"reading {what} in the parent to lay out the ring failed: "
                                          f"{type(exc).__name__}: {exc}. Fix the stream, pass on_error='skip', "
                                          "or give spec= explicitly.") from exc
                    errors.append(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            reader.close()
            set_stream_info(None)
    if errors:
        raise LoaderError(f"every one of the first {len(errors)} items failed; cannot lay out the ring from the "
                          "stream (give spec= explicitly, or fix the stream):\n" + "\n".join(errors))
    raise LoaderError(f"every worker's part of {stream!r} yielded nothing when read in the parent to lay out the "
                      "ring; give spec= (an example tree, or arrays with each leaf's shape and dtype) to build "
                      "the loader without reading it.")
