"""``Mixture``: several map-style sources interleaved in fixed proportions, deterministically.

A mixture orders its own batches (a :class:`~agnostic_prefetch.BatchOrderSource`): the loader
shards, resumes and seeds per-item draws for it like for any source.

How a mixture's epoch is laid out (``G`` the global batch, ``w_c`` the normalised weights):

* **Length.** An epoch holds ``len(mixture)`` items: by default as many as the component
  that runs out first, relative to its weight, allows (``min_c floor(len_c / w_c)``), so
  that component is read once per epoch and the others in proportion. ``epoch_items=``
  sets another length.
* **Counts per global batch.** Batch ``k`` (the last may be shorter, ``g`` items) gives
  component ``c`` either ``floor(w_c * g)`` or one more item: the items left over after the
  floors go to the components furthest behind their share so far in this epoch (ties to
  the earlier component). Every global batch holds each component's share to within one
  item; the running counts stay within 1.5 items of their shares; every epoch has the
  same counts.
* **Places in the batch.** Each component's items are spread evenly through the batch
  (its ``j``-th of ``n`` at ``(j + 0.5) / n`` of the way), so every shard's slice holds
  about its share too.
* **Which records.** Component ``c`` walks its own epochs: its ``m``-th draw of the run is
  element ``m % L_c`` of its epoch ``m // L_c``'s order. So each component starts a new
  epoch of its own when it has gone through one, whatever the mixture's epochs.

  - A plain component's epoch is its ``L_c = len_c`` records, permuted from
    ``(seed, c, that epoch)`` when ``shuffle`` (the loader's own ``shuffle`` does not
    apply to a source that orders its batches).
  - A component that orders its own batches (``batch_order``: a nested ``Mixture``, a
    ``WindowSource``) keeps its order rather than being read as ``range(len_c)``: its
    epoch is its ``batch_order(seed=s_c, epoch=e, batch_size=len_c)`` flattened, ``s_c``
    a seed hashed from ``(seed, c)`` (so two alike components do not draw alike), and
    ``L_c`` that order's length, which must be the same in every epoch (else the
    mixture stops, naming the component). ``len_c`` still counts in the default epoch
    length. One batch of its whole epoch is asked for so that the component lays the
    epoch out as it promises each batch: a nested mixture spreads its components evenly
    through it, the same way every epoch, so any run of ``r`` of its draws holds its
    component ``j`` to within two items of ``r * n_j / len_c`` (``n_j`` its count per
    epoch, within one item of ``w_j * len_c``; hypothesis-tested with up to three
    components per level, three levels deep); a ``WindowSource`` keeps its foreground
    share and its flips. It counts as one component (in ``items_by_source`` too).

Indices are ``offset_c + index`` with the components' index spaces back to back: a
component's index space is its ``index_space`` attribute where it has one (its indices
then run beyond ``len_c``: window × flip, or a nested mixture's own components), else
``len_c``. The mixture's own ``index_space`` is their sum, so it nests in turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from agnostic_prefetch._tree import flatten, key_paths
from agnostic_prefetch.sources.protocol import check_seed

__all__ = ["Mixture"]


class Mixture:
    """Interleave ``sources`` in the proportions ``weights``; see the module for the rules.

    Args:
        sources: map-style sources, as a sequence or a mapping of names to sources. A
            source that orders its own batches (a nested ``Mixture``, a ``WindowSource``,
            any :class:`~agnostic_prefetch.BatchOrderSource`) keeps its order: its items
            come from its own epochs, so a nested mixture keeps its weights and a window
            sampler its foreground share and flips.
        weights: positive numbers, one per source (in the same order or under the same
            names); normalised to sum to one.
        shuffle: permute each plain component's records on each of its own epochs
            (components that order themselves are not affected).
        epoch_items: items per mixture epoch (default: see the module).

    Every component must yield examples with the same tree structure (the same keys, in
    the same nesting); it is checked on each component's first record, in the process
    that builds the mixture (map a component to it with a wrapper source first). Shapes
    and dtypes are checked per record by the loader, as for any source.

    ``Loader.stats()["items_per_source"]`` counts the items delivered from each component
    (a nested mixture's as that one component's).

    Raises:
        ValueError: mismatched names or counts, a weight that is not positive, an empty
            component, or components whose examples differ in structure (naming both).
            When the order is computed: a component that orders itself and returns an
            index outside its index space, or epochs of different lengths (naming it).

    Example:
        >>> import numpy as np, agnostic_prefetch as ap
        >>> web = ap.ArraySource({"x": np.zeros(100)})
        >>> books = ap.ArraySource({"x": np.ones(30)})
        >>> mix = ap.Mixture({"web": web, "books": books}, {"web": 3, "books": 1})
        >>> len(mix)  # books run out first: 30 / 0.25
        120
        >>> with ap.Loader(mix, 8, workers=0) as loader:
        ...     x = next(iter(loader))["x"]
        ...     int(x.sum()), loader.stats()["items_per_source"]
        (2, {'web': 6, 'books': 2})
        >>> code = ap.ArraySource({"x": np.full(40, 2.0)})
        >>> nested = ap.Mixture({"text": mix, "code": code}, {"text": 1, "code": 1})
        >>> len(nested), nested.index_space  # text: 120 items an epoch, over 130 records
        (80, 170)
    """

    def __init__(self, sources: Sequence[Any] | Mapping[str, Any], weights: Sequence[float] | Mapping[str, float],
                 *, shuffle: bool = True, epoch_items: int | None = None) -> None:
        names, parts, raw = _pair(sources, weights)
        self.names = names
        self.sources = parts
        self.shuffle = bool(shuffle)
        self.sizes = [len(s) for s in parts]
        if empty := [n for n, length in zip(names, self.sizes, strict=True) if length == 0]:
            raise ValueError(f"Mixture: component {empty[0]!r} has no records")
        total = sum(raw, Fraction(0))
        self.weights = [w / total for w in raw]
        if epoch_items is None:
            epoch_items = min(int(length / w) for length, w in zip(self.sizes, self.weights, strict=True))
        if epoch_items < 1:
            raise ValueError(f"Mixture: epoch_items must be >= 1, got {epoch_items}")
        self.epoch_items = int(epoch_items)
        self._self_ordered = [callable(getattr(s, "batch_order", None)) for s in parts]
        self.index_spaces = [int(getattr(s, "index_space", len(s))) for s in parts]
        self.index_space = sum(self.index_spaces)
        self._offsets = np.cumsum([0, *self.index_spaces])
        try:
            self._check_structures()
        finally:
            self.release()
        # Bounded caches, rebuilt where needed (not pickled): per component, the latest two
        # of its own epochs' orders and, for one that orders itself, its epoch length.
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}  # (seed, c, its epoch)
        self._own_lengths: dict[int, tuple[int, int]] = {}  # c -> (seed, length)
        self._counts: dict[int, np.ndarray] = {}  # per global batch size: counts per batch

    def __len__(self) -> int:
        return self.epoch_items

    def __getitem__(self, index: int) -> Any:
        c, record = self._component(int(index))
        if not 0 <= c < len(self.sources):
            raise IndexError(f"index {index} out of range for a Mixture over an index space of {self.index_space}")
        return self.sources[c][record]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """The items at ``indices``, in order; a component's share in one ``__getitems__`` call."""
        at = np.asarray(indices, np.int64)
        which = np.searchsorted(self._offsets, at, side="right") - 1
        if len(at) and (which.min() < 0 or which.max() >= len(self.sources)):
            raise IndexError(f"an index out of range for a Mixture over an index space of {self.index_space}")
        items: list[Any] = [None] * len(at)
        for c in np.unique(which).tolist():
            places = np.flatnonzero(which == c)
            records = (at[places] - self._offsets[c]).tolist()
            getitems = getattr(self.sources[c], "__getitems__", None)
            found = getitems(records) if getitems else [self.sources[c][r] for r in records]
            for place, item in zip(places.tolist(), found, strict=True):
                items[place] = item
        return items

    def locate(self, index: int) -> str:
        """Where record ``index`` comes from: the component, and where in it if it says."""
        c, record = self._component(int(index))
        locate = getattr(self.sources[c], "locate", None)
        where = locate(record) if locate is not None else None
        return f"component {self.names[c]!r}, record {record}" + (f" ({where})" if where else "")

    def remedy(self, index: int, exc: BaseException) -> str | None:
        """The component's remedy for ``exc`` on that record, if it has one."""
        c, record = self._component(int(index))
        remedy = getattr(self.sources[c], "remedy", None)
        return remedy(record, exc) if remedy is not None else None

    def lengths(self) -> np.ndarray | dict[str, np.ndarray] | None:
        """Each index's sequence length (``ap.Pack`` and friends), over the mixture's index
        space: the components' ``lengths()`` laid end to end; ``None`` if one cannot say."""
        parts = []
        for source in self.sources:
            method = getattr(source, "lengths", None)
            part = method() if callable(method) else None
            if part is None:
                return None
            parts.append(part)
        if all(isinstance(p, dict) for p in parts):
            keys = set(parts[0])
            if any(set(p) != keys for p in parts):
                raise ValueError(f"Mixture: the components' lengths() name different keys: "
                                 f"{[sorted(p) for p in parts]}; every component must give the same")
            return {k: np.concatenate([np.asarray(p[k], np.int64) for p in parts]) for k in parts[0]}
        if any(isinstance(p, dict) for p in parts):
            raise ValueError("Mixture: some components' lengths() give one array and some a dict per "
                             "key; give the same kind from every component")
        return np.concatenate([np.asarray(p, np.int64) for p in parts])

    def _component(self, index: int) -> tuple[int, int]:
        c = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return c, index - int(self._offsets[c])

    def release(self) -> None:
        """Let every component that can release what it opened in this process do so."""
        for source in self.sources:
            release = getattr(source, "release", None)
            if callable(release):
                release()

    @property
    def order_fingerprint(self) -> dict[str, Any]:
        """What decides the order beyond the loader's settings (checked on resume).

        Components that order themselves, or have a fingerprint, add theirs (``None`` where
        they have none), so a resume over a changed nested mixture is refused too.
        """
        fingerprint = {"mixture": self.names, "lengths": self.sizes,
                       "weights": [str(w) for w in self.weights], "shuffle": self.shuffle,
                       "epoch_items": self.epoch_items}
        own = {name: getattr(source, "order_fingerprint", None)
               for name, source, orders in zip(self.names, self.sources, self._self_ordered, strict=True)
               if orders or getattr(source, "order_fingerprint", None) is not None}
        if own:  # absent for plain components, so their fingerprint, and saved states, hold
            fingerprint["components"] = own
        return fingerprint

    def items_by_source(self, indices: np.ndarray) -> dict[str, int]:
        """How many of ``indices`` come from each component."""
        c = np.searchsorted(self._offsets, indices, side="right") - 1
        return dict(zip(self.names, np.bincount(c, minlength=len(self.names)).tolist(), strict=True))

    def batch_order(self, *, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
        """All global batches of ``epoch`` (see the module's rules).

        Raises:
            ValueError: ``seed`` is not a non-negative integer, or a component that orders
                itself breaks its protocol (see the class).
        """
        seed = check_seed(seed)
        counts = self._batch_counts(batch_size)  # (batches, components)
        per_epoch = counts.sum(axis=0)
        taken = np.cumsum(counts, axis=0) - counts  # each batch's first draw, per component
        draws = [self._draws(seed, c, epoch * int(per_epoch[c]), int(per_epoch[c]))
                 for c in range(len(self.sources))]
        batches = []
        for k, row in enumerate(counts):
            parts, keys = [], []
            for c, n in enumerate(row.tolist()):
                if n:
                    start = int(taken[k, c])
                    parts.append(draws[c][start : start + n] + int(self._offsets[c]))
                    keys.append((np.arange(n) + 0.5) / n)
            order = np.argsort(np.concatenate(keys), kind="stable")
            batches.append(np.concatenate(parts)[order])
        return batches

    def _batch_counts(self, g: int) -> np.ndarray:
        cached = self._counts.get(g)
        if cached is not None:
            return cached
        sizes = [g] * (self.epoch_items // g) + ([self.epoch_items % g] if self.epoch_items % g else [])
        behind = [Fraction(0)] * len(self.weights)  # share so far minus items given, per component
        counts = np.zeros((len(sizes), len(self.weights)), np.int64)
        for k, size in enumerate(sizes):
            shares = [w * size for w in self.weights]
            base = [int(s) for s in shares]  # floor: shares are non-negative
            behind = [b + s - f for b, s, f in zip(behind, shares, base, strict=True)]
            extra = size - sum(base)
            for c in sorted(range(len(base)), key=lambda c: (-behind[c], c))[:extra]:
                base[c] += 1
                behind[c] -= 1
            counts[k] = base
        self._counts = {g: counts}
        return counts

    def _draws(self, seed: int, c: int, first: int, n: int) -> np.ndarray:
        """Indices of component ``c`` for its draws ``first .. first + n`` of the run."""
        length = self._epoch_length(seed, c)
        out = np.empty(n, np.int64)
        done = 0
        while done < n:
            m = first + done
            epoch, at = divmod(m, length)
            take = min(n - done, length - at)
            out[done : done + take] = self._order(seed, c, epoch)[at : at + take]
            done += take
        return out

    def _epoch_length(self, seed: int, c: int) -> int:
        if not self._self_ordered[c]:
            return self.sizes[c]
        known = self._own_lengths.get(c)
        if known is None or known[0] != seed:
            known = (seed, len(self._order(seed, c, 0)))
            self._own_lengths[c] = known
        return known[1]

    def _order(self, seed: int, c: int, epoch: int) -> np.ndarray:
        """Component ``c``'s indices in the order of its own ``epoch``."""
        key = (seed, c, epoch)
        cached = self._orders.get(key)
        if cached is None:
            if self._self_ordered[c]:
                cached = self._own_order(seed, c, epoch)
            elif self.shuffle:
                cached = np.random.default_rng([seed, 1 + c, epoch]).permutation(self.sizes[c])
            else:
                cached = np.arange(self.sizes[c], dtype=np.int64)
            # A mixture epoch spans at most a few component epochs: keep the latest per component.
            self._orders = {k: v for k, v in self._orders.items()
                            if k[:2] != (seed, c) or k[2] == epoch - 1}
            self._orders[key] = cached
        return cached

    def _own_order(self, seed: int, c: int, epoch: int) -> np.ndarray:
        source, name, space = self.sources[c], self.names[c], self.index_spaces[c]
        # One batch of the whole epoch: the component lays its epoch out as it promises per batch.
        batches = source.batch_order(seed=_component_seed(seed, c), epoch=epoch, batch_size=self.sizes[c])
        order = np.concatenate([np.asarray(b, np.int64).reshape(-1) for b in batches] or [np.empty(0, np.int64)])
        if not len(order):
            raise ValueError(
                f"Mixture: component {name!r} ({source!r}) returned no indices from "
                f"batch_order(epoch={epoch}, batch_size={self.sizes[c]}); a component must "
                "give every epoch of its own at least one index.")
        outside = (order < 0) | (order >= space)
        if outside.any():
            raise ValueError(
                f"Mixture: component {name!r} ({source!r}) put index {int(order[np.argmax(outside)])} "
                f"in epoch {epoch} of its own order, outside its index space range({space}). A "
                "source whose indices run beyond len() must say so with an index_space attribute "
                "(see BatchOrderSource), so the mixture places its indices apart from the others'.")
        first = self._epoch_length(seed, c) if epoch else len(order)
        if len(order) != first:
            raise ValueError(
                f"Mixture: component {name!r} ({source!r}) ordered epoch {epoch} of its own into "
                f"{len(order)} indices but epoch 0 into {first}; a component "
                f"that orders itself must give every epoch as many indices (batch_order with "
                f"batch_size={self.sizes[c]}), so the mixture can tell which epoch a draw is in.")
        return order

    def _check_structures(self) -> None:
        first = None
        for name, source in zip(self.names, self.sources, strict=True):
            paths = ", ".join(key_paths(flatten(source[0])[1]))
            if first is None:
                first = (name, paths)
            elif paths != first[1]:
                raise ValueError(
                    f"Mixture: component {name!r} yields examples with leaves {paths}, but "
                    f"component {first[0]!r} yields {first[1]}. Every component must yield the "
                    "same structure; wrap a component in a source that maps its examples to "
                    "the common keys first.")

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len_} records{' (orders itself)' if own else ''} x {float(w):.3g}"
                          for n, len_, own, w in zip(self.names, self.sizes, self._self_ordered, self.weights,
                                                     strict=True))
        return f"Mixture({parts}; epoch_items={self.epoch_items}, shuffle={self.shuffle})"

    def __getstate__(self) -> dict[str, Any]:
        # The caches are rebuilt where needed (workers only index).
        return {**self.__dict__, "_orders": {}, "_own_lengths": {}, "_counts": {}}


_OWN_ORDER = 0x4F574E  # "OWN": keeps the derived seeds apart from the permutations' (seed, 1 + c, epoch)


def _component_seed(seed: int, c: int) -> int:
    """The seed a self-ordering component ``c`` orders itself with, a pure function of ``(seed, c)``.

    Hashed rather than passed on: two nested mixtures alike would otherwise draw alike, and
    a component's own ``(seed, epoch, ...)`` streams would overlap the plain components'
    ``(seed, 1 + c, epoch)``. 63 bits, so a component may keep it in an int64.
    """
    return int(np.random.SeedSequence([seed, 1 + c, _OWN_ORDER]).generate_state(1, np.uint64)[0] >> 1)


def _pair(sources: Any, weights: Any) -> tuple[list[str], list[Any], list[Fraction]]:
    if isinstance(sources, Mapping):
        names = [str(n) for n in sources]
        parts = list(sources.values())
        if isinstance(weights, Mapping):
            if set(map(str, weights)) != set(names):
                raise ValueError(f"Mixture: weights are named {sorted(map(str, weights))} but sources {sorted(names)}")
            by_name = {str(k): v for k, v in weights.items()}
            weights = [by_name[n] for n in names]
    else:
        parts = list(sources)
        names = [str(i) for i in range(len(parts))]
        if isinstance(weights, Mapping):
            raise ValueError("Mixture: named weights need named sources (a mapping)")
    weights = list(weights)
    if len(weights) != len(parts) or not parts:
        raise ValueError(f"Mixture: {len(parts)} sources but {len(weights)} weights; give one weight per source")
    raw = []
    for name, w in zip(names, weights, strict=True):
        if not isinstance(w, int | float | Fraction | np.integer | np.floating) or not np.isfinite(float(w)) or w <= 0:
            raise ValueError(f"Mixture: the weight of {name!r} is {w!r}; weights must be positive numbers")
        # Exact arithmetic from the number as written (0.1 is 1/10), so counts never drift.
        raw.append(w if isinstance(w, Fraction) else Fraction(repr(float(w))) if isinstance(w, float | np.floating)
                   else Fraction(int(w)))
    return names, parts, raw
