"""One worker's stream: opened per epoch, read item by item, its state taken and restored.

The worker side of a stream source (``streams.py``). A :class:`StreamReader` owns this
worker's iterator (or, for a ``Fetcher``, the chunk being split into items) and knows how
to seed it, tell it where it runs (``stream_info()``, and torch's ``get_worker_info()`` for
code that asks torch), save its state after a batch and put it back after a resume.
"""

from __future__ import annotations

import pickle
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_prefetch._pickling import dumps
from agnostic_prefetch._tree import flatten, unflatten
from agnostic_prefetch.streams import Fetcher, Stream, StreamInfo, set_stream_info

__all__ = ["StreamError", "StreamJob", "StreamReader"]


class StreamError(ValueError):
    """A stream gave something the loader cannot batch (a chunk whose leaves disagree)."""


@dataclass(frozen=True)
class StreamJob:
    """What a worker needs to know to read its part of a stream."""

    workers: int  # workers on this host (the stream's num_workers is over every host)
    shard_index: int
    shard_count: int
    batch_size: int


class StreamReader:
    """This worker's stream for the current epoch.

    Args:
        stream: the ``Stream`` or ``Fetcher``.
        job: the worker count and shard.
        worker: this worker's index on this host.
        seed: the loader's seed (each worker's epoch seed is drawn from it).
        own_process: a worker process of its own: there, as in torch's workers, python's
            ``random`` and torch are seeded per epoch and torch's ``get_worker_info()``
            answers. Threads and ``workers=0`` share the caller's process, whose globals
            are left alone (torch's ``num_workers=0`` answers ``None`` there too).
    """

    def __init__(self, stream: Stream | Fetcher, job: StreamJob, worker: int, seed: int, own_process: bool) -> None:
        # A worker owns its stream object, as a worker process owns its unpickled copy: a
        # thread (or the caller) reading the user's own object would share a fetcher's or a
        # dataset's state with the other workers and with the caller.
        self.stream = stream if own_process else pickle.loads(dumps(stream))
        self._own_process = own_process
        self.job = job
        self.worker = worker
        self.global_id = job.shard_index * job.workers + worker
        self._seed = seed
        self.epoch: int | None = None  # the epoch the iterator reads, once opened
        self.info: StreamInfo | None = None  # what stream_info() answers while it reads
        self.ended = False
        self.items = 0  # items taken this epoch (an item's number in messages)
        self.chunks = 0  # chunks fetched this epoch (Fetcher)
        self._iterator: Any = None
        self.pull: Any = _exhausted  # the next example, or StopIteration: the stream's own __next__
        self._dataset: Any = None  # the iterable whose iter() made the iterator (its state too)
        # Fetcher: the chunk being split (its leaves, structure, length), the next row, and
        # the fetcher's state from before it was fetched.
        self._chunk: tuple[list[np.ndarray], Any, int] | None = None
        self._row = 0
        self._chunk_state: Any = None

    @property
    def stateful(self) -> bool:
        """Whether this stream can save and restore its position."""
        if isinstance(self.stream, Fetcher):
            return _has_state(self.stream.fetch)
        return _has_state(self._iterator) or (self._dataset is not None and _has_state(self._dataset))

    def open(self, epoch: int, state: Any = None) -> None:
        """Start ``epoch``'s stream afresh, or where ``state`` (from :meth:`state`) says."""
        self.close()
        job = self.job
        seed = int(np.random.SeedSequence([self._seed, epoch, self.global_id]).generate_state(1)[0])
        info = StreamInfo(self.global_id, job.workers * job.shard_count, self.worker, job.workers,
                          job.shard_index, job.shard_count, epoch, seed)
        self.info = info
        set_stream_info(info)
        stream = self.stream
        if self._own_process:
            random.seed(seed)  # as torch seeds each worker's ``random`` (and torch, below)
            _tell_torch(info, stream)
        self.epoch, self.ended, self.items, self.chunks = epoch, False, 0, 0
        if isinstance(stream, Fetcher):
            self._chunk, self._row = None, 0
            self.pull = self._next_row
            if state is not None:
                _load(stream.fetch, state["fetcher"])
                if state["row"]:  # the chunk being split: fetched again, cut where it was
                    self._fetch()
                    self._row = state["row"]
            return
        if stream.iterable:
            self._dataset = stream.make_iterator
            if state is not None and "dataset" in state:
                _load(self._dataset, state["dataset"])  # torchdata loads the dataset before iter()
            self._iterator = iter(self._dataset)
        else:
            self._iterator = stream.make_iterator(self.global_id, job.workers * job.shard_count)
            if not hasattr(self._iterator, "__next__"):
                self._iterator = iter(self._iterator)
        if state is not None and "iterator" in state:
            _load(self._iterator, state["iterator"])
        self.pull = self._iterator.__next__

    def state(self) -> Any:
        """Where the stream stands now, or ``None`` if it keeps no state."""
        stream = self.stream
        if isinstance(stream, Fetcher):
            if not _has_state(stream.fetch):
                return None
            if self._chunk is None or self._row >= self._chunk[2]:
                return {"fetcher": stream.fetch.state_dict(), "row": 0}
            return {"fetcher": self._chunk_state, "row": self._row}
        state = {}
        if self._dataset is not None and _has_state(self._dataset):
            state["dataset"] = self._dataset.state_dict()
        if _has_state(self._iterator):
            state["iterator"] = self._iterator.state_dict()
        return state or None

    def next_item(self) -> Any:
        """The stream's next example (``pull`` and the bookkeeping around it).

        Raises:
            StopIteration: the stream has ended (``ended`` is set).
            StreamError: a fetcher's chunk whose leaves disagree on their leading length.
            Exception: whatever the user's iterator raised.
        """
        try:
            example = self.pull()
        except StopIteration:
            self.end()
            raise
        except Exception:
            self.items += 1  # a failed item still counts: the next one is named after it
            raise
        self.items += 1
        return example

    def end(self) -> None:
        """The stream has ended (its iterator raised ``StopIteration``)."""
        self.ended = True
        self.pull = _exhausted

    def close(self) -> None:
        """Let go of the epoch's iterator (a generator's ``finally`` runs now)."""
        closer = getattr(self._iterator, "close", None)
        self._iterator = self._dataset = None
        self.pull = _exhausted
        self._chunk = None
        if callable(closer):
            try:
                closer()
            except Exception:
                pass

    # ---- Fetcher --------------------------------------------------------------------------

    def _next_row(self) -> Any:
        while self._chunk is None or self._row >= self._chunk[2]:
            if not self._fetch():
                raise StopIteration
        leaves, treedef, _ = self._chunk
        row = self._row
        self._row += 1
        return unflatten(treedef, [leaf[row] for leaf in leaves])

    def _fetch(self) -> bool:
        """The next chunk; ``False`` at the end of the stream."""
        fetch = self.stream.fetch  # type: ignore[union-attr]
        self._chunk_state = fetch.state_dict() if _has_state(fetch) else None
        chunk = fetch(self.global_id, self.job.batch_size)
        self.chunks += 1
        if chunk is None:
            self._chunk = None
            return False
        leaves, treedef = flatten(chunk)
        arrays = [np.asarray(leaf) for leaf in leaves]
        lengths = [a.shape[0] if a.ndim else None for a in arrays]
        if not arrays or None in lengths or len(set(lengths)) > 1:
            raise StreamError(
                f"chunk {self.chunks - 1} of worker {self.worker}'s fetcher (epoch {self.epoch}) has leaves of "
                f"leading lengths {lengths}: every leaf of a chunk must be an array with one leading (batch) "
                "axis of the same length, 0 included. Return a dict of arrays stacked on the first axis, or "
                "None when the stream ends.")
        self._chunk, self._row = (arrays, treedef, int(lengths[0])), 0
        return True


def _exhausted() -> Any:
    raise StopIteration


def _has_state(obj: Any) -> bool:
    return obj is not None and callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def _load(obj: Any, state: Any) -> None:
    if not _has_state(obj):
        raise StreamError(f"{type(obj).__name__} has no state_dict()/load_state_dict() to resume with")
    obj.load_state_dict(state)


def _tell_torch(info: StreamInfo, stream: Stream | Fetcher) -> None:
    """Make torch's ``get_worker_info()`` answer here as in a torch worker (torch is already
    imported by the user's dataset: a worker never imports it by itself)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        from torch.utils.data._utils import worker as torch_worker
    except ImportError:  # pragma: no cover - another torch layout
        return
    dataset = stream.make_iterator if isinstance(stream, Stream) and stream.iterable else None
    torch_worker._worker_info = torch_worker.WorkerInfo(id=info.id, num_workers=info.num_workers, seed=info.seed,
                                                        dataset=dataset)
    torch.manual_seed(info.seed)
