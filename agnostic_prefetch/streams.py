"""Stream sources: each worker reads its own iterator, and the loader batches what it yields.

A map-style source (``len`` and ``[i]``) gives exact, elastic order; a stream gives what a
stream can: batches from the workers in turn, deterministic for a given worker count when
each worker's stream is, and exact resume where the stream keeps state (docs/streams.md).

Three shapes of stream, all accepted as a ``Loader``'s source:

- a torch ``IterableDataset`` (or any object whose ``__iter__`` shards itself with torch's
  ``get_worker_info()``), passed as it is: each worker calls ``iter()`` on its copy, and
  ``get_worker_info()`` answers there as it does in torch's workers;
- :class:`Stream` over ``make_iterator(worker_id, num_workers)``;
- :class:`Fetcher` over Caffe2's ``fetch(worker_id, batch_size)``, whose chunks of any length
  are rebatched.

Inside a worker, :func:`stream_info` says which worker, shard and epoch it serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

__all__ = ["Fetcher", "Stream", "StreamInfo", "as_stream", "stream_info"]


class StreamInfo(NamedTuple):
    """Where a stream runs (from :func:`stream_info`, inside a worker).

    ``id`` and ``num_workers`` count workers over every shard (``shard_index * workers +
    worker``, ``workers * shard_count``), so a stream that splits its data by them splits it
    over hosts as well; ``worker`` and ``workers`` are this host's own.
    """

    id: int
    num_workers: int
    worker: int
    workers: int
    shard_index: int
    shard_count: int
    epoch: int
    seed: int  # this worker's seed for this epoch (python's ``random`` is seeded with it)


_local = threading.local()


def stream_info() -> StreamInfo | None:
    """The stream this thread reads for, inside a loader's worker; ``None`` elsewhere.

    Example:
        >>> import agnostic_prefetch as ap
        >>> ap.stream_info() is None  # not inside a worker
        True
    """
    return getattr(_local, "info", None)


def set_stream_info(info: StreamInfo | None) -> None:
    """What :func:`stream_info` answers in this thread from now on (the workers set it)."""
    _local.info = info


class Stream:
    """A stream source: each worker iterates its own iterator.

    Args:
        make_iterator: ``make_iterator(worker_id, num_workers) -> iterator`` of examples (a
            generator function will do), called once per worker and epoch; or an iterable
            (a torch ``IterableDataset``) whose ``iter()`` each worker calls on its copy.
            It travels to the workers with cloudpickle.
        batches_per_epoch: if given, every epoch yields exactly this many batches on this
            process: streams that end early are followed by batches of padding only (with
            ``remainder="pad"``; without it, the epoch is shorter) and batches past it are
            not read. This is how hosts whose streams end unevenly still step together.
        thread_safe: your word that ``backend="thread"`` workers may each iterate their own
            iterator from this object at once.

    Resume: if the iterator (or the iterable) has ``state_dict()`` and ``load_state_dict()``
    (torchdata's ``Stateful``), ``Loader.state_dict()`` holds each worker's state at the
    batch the caller reached, and a loader with as many workers resumes exactly.

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> def numbers(worker_id, num_workers):
        ...     return ({"x": np.int64(i)} for i in range(worker_id, 8, num_workers))
        >>> with ap.Loader(ap.Stream(numbers), batch_size=2, workers=0) as loader:
        ...     [b["x"].tolist() for b in loader]
        [[0, 1], [2, 3], [4, 5], [6, 7]]
    """

    kind = "iterator"

    def __init__(self, make_iterator: Callable[[int, int], Iterator[Any]] | Iterable[Any], *,
                 batches_per_epoch: int | None = None, thread_safe: bool = False) -> None:
        if hasattr(make_iterator, "__next__") and not isinstance(make_iterator, type):
            raise TypeError(
                f"ap.Stream was given an iterator ({type(make_iterator).__name__}); a stream is read once per "
                "worker and epoch, so give the function that makes it: ap.Stream(lambda worker_id, num_workers: "
                "my_generator(...)), or an iterable whose iter() starts afresh")
        if not callable(make_iterator) and not hasattr(make_iterator, "__iter__"):
            raise TypeError(f"ap.Stream takes make_iterator(worker_id, num_workers) or an iterable, not "
                            f"{type(make_iterator).__name__}")
        _check_count(batches_per_epoch)
        self.make_iterator = make_iterator
        self.iterable = not callable(make_iterator) or _is_torch_iterable(make_iterator)
        self.batches_per_epoch = batches_per_epoch
        self.thread_safe = bool(thread_safe or getattr(make_iterator, "thread_safe", False))
        self.torch = _is_torch_iterable(make_iterator)

    def __repr__(self) -> str:
        target = self.make_iterator
        name = type(target).__name__ if self.iterable else getattr(target, "__qualname__", repr(target))
        bound = f", batches_per_epoch={self.batches_per_epoch}" if self.batches_per_epoch else ""
        return f"Stream({name}{bound})"


class Fetcher:
    """Caffe2's data-worker contract: ``fetch(worker_id, batch_size)`` returns a chunk.

    A chunk is a tree (dict, tuple, list) of arrays sharing a leading axis of any length,
    0 included (``batch_size`` is a hint), or ``None`` once that worker's stream ends. The
    loader splits chunks into items and fills whole batches from them, so batches are full
    but each worker's last. Arguments as :class:`Stream`; a ``fetch`` object with
    ``state_dict()`` and ``load_state_dict()`` makes it resumable (the state is taken before
    the chunk being split, which is fetched again and cut where it was: ``fetch`` must be
    deterministic given its state).

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> def fetch(worker_id, batch_size):
        ...     return {"x": np.arange(3)}  # endless chunks of 3
        >>> with ap.Loader(ap.Fetcher(fetch, batches_per_epoch=2), batch_size=4, workers=0) as loader:
        ...     [b["x"].tolist() for b in loader]
        [[0, 1, 2, 0], [1, 2, 0, 1]]
    """

    kind = "fetcher"
    iterable = False
    torch = False

    def __init__(self, fetch: Callable[[int, int], Any], *, batches_per_epoch: int | None = None,
                 thread_safe: bool = False) -> None:
        if not callable(fetch):
            raise TypeError(f"ap.Fetcher takes fetch(worker_id, batch_size), not {type(fetch).__name__}")
        _check_count(batches_per_epoch)
        self.fetch = fetch
        self.batches_per_epoch = batches_per_epoch
        self.thread_safe = bool(thread_safe or getattr(fetch, "thread_safe", False))

    def __repr__(self) -> str:
        bound = f", batches_per_epoch={self.batches_per_epoch}" if self.batches_per_epoch else ""
        return f"Fetcher({getattr(self.fetch, '__qualname__', repr(self.fetch))}{bound})"


def as_stream(source: Any) -> Stream | Fetcher | None:
    """``source`` as a stream, if it is one; ``None`` for a map-style source.

    Raises:
        TypeError: a generator or other one-shot iterator (it cannot be read afresh per
            worker and epoch), naming the remedy.
    """
    if isinstance(source, Stream | Fetcher):
        return source
    if hasattr(source, "__next__") and not hasattr(source, "__getitem__"):
        raise TypeError(
            f"the Loader was given a {type(source).__name__}, a one-shot iterator: it cannot be sent to "
            "worker processes or read afresh each epoch. Give the function that makes it instead: "
            "ap.Stream(lambda worker_id, num_workers: make_it(...)) (docs/streams.md)")
    if _is_torch_iterable(source) or (hasattr(source, "__iter__") and not hasattr(source, "__getitem__")):
        return Stream(source)
    return None


def _is_torch_iterable(obj: Any) -> bool:
    return any(c.__name__ == "IterableDataset" and c.__module__.startswith("torch.utils.data")
               for c in type(obj).__mro__)


def _check_count(batches_per_epoch: int | None) -> None:
    if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch < 1):
        raise ValueError(f"batches_per_epoch={batches_per_epoch!r}: give a positive integer, or None "
                         "(each epoch lasts until every worker's stream ends)")
