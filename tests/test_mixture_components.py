"""Mixture components that order themselves: nested mixtures, WindowSource, any BatchOrderSource.

Every leaf here reads ``{"i": 10000 * tag + index}``, so a delivered item names its leaf
(``tag``) and the index it was read at.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sources_for_tests import Doubled

import agnostic_prefetch as ap
from agnostic_prefetch.caffe.window import WindowSource


def leaf(n: int, tag: int) -> ap.ArraySource:
    return ap.ArraySource({"i": np.arange(n, dtype=np.int64) + 10000 * tag})


def delivered(source, batch_size: int, epochs: int, **options) -> list[int]:
    with ap.Loader(source, batch_size, epochs=epochs, **{"workers": 0, **options}) as loader:
        return [int(i) for batch in loader for i in batch["i"]]


def by_epoch(codes: list[int], epoch_items: int) -> list[list[int]]:
    return [codes[k : k + epoch_items] for k in range(0, len(codes), epoch_items)]


# --- the cases a reviewer found ----------------------------------------------------------


def test_a_nested_mixture_gives_each_inner_component_its_share_of_every_epoch():
    inner = ap.Mixture({"A": leaf(100, 1), "B": leaf(10, 2)}, {"A": 1, "B": 1})
    outer = ap.Mixture({"inner": inner, "C": leaf(20, 3)}, {"inner": 1, "C": 1})
    assert (len(inner), len(outer)) == (20, 40)
    codes = delivered(outer, 8, epochs=3)
    for epoch in by_epoch(codes, 40):
        assert Counter(c // 10000 for c in epoch) == {1: 10, 2: 10, 3: 20}
        # B's own epoch is ten draws, one inner epoch: every record of B, once
        assert sorted(c % 10000 for c in epoch if c // 10000 == 2) == list(range(10))


def test_the_outer_mixture_counts_a_nested_mixtures_items_as_its_component():
    inner = ap.Mixture({"A": leaf(100, 1), "B": leaf(10, 2)}, {"A": 1, "B": 1})
    outer = ap.Mixture({"inner": inner, "C": leaf(20, 3)}, {"inner": 1, "C": 1})
    with ap.Loader(outer, 8, workers=0, epochs=2) as loader:
        for _ in loader:
            pass
        assert loader.stats()["items_per_source"] == {"inner": 40, "C": 40}


CROP = 6  # the windows' side


@pytest.fixture
def windows(tmp_path) -> tuple[WindowSource, dict[bytes, int]]:
    """Eight foreground windows (labels 1..8) and four background ones on one image,
    mirrored; and which index reads each crop."""
    y, x = np.mgrid[0:24, 0:24]
    image = np.stack([x * 9 % 256, y * 5 % 256, (x * y) % 256], axis=2).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "img0.png")
    boxes = [(k, k, k + 8, k + 5) for k in range(12)]  # distinct, asymmetric crops
    rows = [f"{label} 0.9 " + " ".join(map(str, b)) for label, b in zip(range(1, 9), boxes[:8], strict=True)]
    rows += ["0 0.1 " + " ".join(map(str, b)) for b in boxes[8:]]
    (tmp_path / "windows.txt").write_text("\n".join(["# 0", "img0.png", "3", "24", "24", "12", *rows]) + "\n")
    source = WindowSource(tmp_path / "windows.txt", root_folder=f"{tmp_path}/", crop_size=CROP,
                          fg_fraction=0.5, mirror=True)
    index_of = {source[index]["image"].tobytes(): index for index in range(2 * len(source))}
    assert len(index_of) == 24  # every window and flip reads a different crop
    return source, index_of


def like_windows(n: int) -> ap.ArraySource:
    """Items shaped like a WindowSource's, labelled 100."""
    return ap.ArraySource({"image": np.zeros((n, CROP, CROP, 3), np.float32), "label": np.full(n, 100, np.int32),
                           "overlap": np.zeros(n, np.float32), "box": np.zeros((n, 4), np.int32)})


def test_a_window_source_in_a_mixture_reads_every_window_both_ways_with_its_foreground_share(windows):
    source, index_of = windows
    mix = ap.Mixture({"windows": source, "plain": like_windows(24)}, [1, 1])
    assert len(mix) == 24  # the windows run out first: 12 / 0.5
    with ap.Loader(mix, 8, workers=0, epochs=10) as loader:
        read = [index_of.get(image.tobytes(), -1)
                for batch in loader for image, label in zip(batch["image"], batch["label"], strict=True)
                if label != 100]
    assert len(read) == 120 and -1 not in read  # every item from the windows is one of its crops
    for epoch in by_epoch(read, 12):  # one WindowSource epoch per mixture epoch
        assert sum(i // 2 < 8 for i in epoch) == 6  # foreground: int(12 * 0.5) of its 12 draws
    assert {i // 2 for i in read} == set(range(12))  # every window, foreground and background
    assert {i % 2 for i in read} == {0, 1}  # mirrored and not


# --- the invariants, for mixtures of every kind of source ---------------------------------


@dataclass
class Node:
    """What a test knows about one source of a mixture tree, from how it was built."""

    source: object
    tags: set[int]  # the leaves below it
    kind: str = "plain"  # plain, doubled or mixture
    length: int = 0  # a leaf's records
    per_epoch: int = 0  # a leaf's indices per epoch of its own
    children: list[tuple[Node, Fraction]] = field(default_factory=list)


def build(spec, tags=None) -> Node:
    """``("plain", n)``, ``("doubled", n, per_epoch)`` or ``("mix", [(spec, weight), ...])``."""
    tags = itertools.count(1) if tags is None else tags
    if spec[0] == "plain":
        tag = next(tags)
        return Node(leaf(spec[1], tag), {tag}, "plain", spec[1], spec[1])
    if spec[0] == "doubled":
        tag = next(tags)
        return Node(Doubled(spec[1], tag, spec[2]), {tag}, "doubled", spec[1], spec[2])
    kids = [(build(child, tags), weight) for child, weight in spec[1]]
    total = sum(w for _, w in kids)
    mix = ap.Mixture([k.source for k, _ in kids], [w for _, w in kids])
    return Node(mix, set().union(*(k.tags for k, _ in kids)), "mixture",
                children=[(k, Fraction(w, total)) for k, w in kids])


plain_leaves = st.tuples(st.just("plain"), st.integers(1, 30))
doubled_leaves = st.integers(1, 12).flatmap(
    lambda n: st.tuples(st.just("doubled"), st.just(n), st.integers(1, 2 * n)))


def mixtures(children):
    return st.tuples(st.just("mix"), st.lists(st.tuples(children, st.integers(1, 5)), min_size=1, max_size=3))


leaves = st.one_of(plain_leaves, doubled_leaves)
inner = mixtures(leaves)
trees = mixtures(st.one_of(leaves, inner, mixtures(st.one_of(leaves, inner))))


def check_shares(node: Node, items: list[int], outermost: bool) -> None:
    """Each child's count of ``items`` (the node's draws in one run) against its weight."""
    n = len(items)
    # The outermost mixture: within 1.5 items of its share at the end of every epoch. A nested
    # one lays its epoch out as one batch, the same each epoch, so any run of its draws holds
    # each child to within 2 items of that epoch's count, which is within one item of w·len.
    tolerance = 1.5 if outermost else 2 + n / len(node.source)
    for child, weight in node.children:
        mine = [c for c in items if c // 10000 in child.tags]
        assert abs(len(mine) - weight * n) <= tolerance, (len(mine), float(weight), n)
        if child.kind == "mixture":
            check_shares(child, mine, outermost=False)


def leaf_nodes(node: Node):
    if node.kind == "mixture":
        for child, _ in node.children:
            yield from leaf_nodes(child)
    else:
        yield node


def check_coverage(node: Node, codes: list[int]) -> None:
    """Every leaf walks its own epochs: no index twice within one, all of a plain leaf's once."""
    for one in leaf_nodes(node):
        (tag,) = one.tags
        seen = [c % 10000 for c in codes if c // 10000 == tag]
        space = 2 * one.length if one.kind == "doubled" else one.length
        assert all(0 <= i < space for i in seen)
        for epoch in by_epoch(seen, one.per_epoch):
            assert len(set(epoch)) == len(epoch)
            if len(epoch) == one.per_epoch and one.kind == "plain":
                assert sorted(epoch) == list(range(one.length))
            if len(epoch) == one.per_epoch == 2 * one.length:
                assert sorted(epoch) == list(range(space))


@settings(max_examples=100, deadline=None)
@given(trees, st.integers(1, 12), st.integers(1, 2), st.integers(0, 2**32 - 1))
def test_every_component_keeps_its_share_and_its_own_epochs_whatever_its_kind(spec, batch_size, epochs, seed):
    tree = build(spec)
    codes = delivered(tree.source, batch_size, epochs, seed=seed)
    assert len(codes) == epochs * len(tree.source)
    for epoch in by_epoch(codes, len(tree.source)):
        check_shares(tree, epoch, outermost=True)
    check_coverage(tree, codes)


@settings(max_examples=40, deadline=None)
@given(trees, st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_the_same_seed_gives_the_same_batches_whatever_the_mixture_holds(spec, batch_size, seed):
    first = delivered(build(spec).source, batch_size, 2, seed=seed)
    assert delivered(build(spec).source, batch_size, 2, seed=seed) == first


def nested() -> ap.Mixture:
    inner = ap.Mixture({"A": leaf(40, 1), "B": leaf(9, 2), "D": Doubled(5, 4)}, {"A": 2, "B": 1, "D": 1})
    return ap.Mixture({"inner": inner, "C": leaf(20, 3)}, {"inner": 3, "C": 2})


def test_worker_processes_deliver_what_the_parent_orders():
    assert delivered(nested(), 6, 2, workers=2, backend="process") == delivered(nested(), 6, 2)


def test_a_nested_mixture_resumes_exactly_mid_epoch():
    whole = delivered(nested(), 7, 2)
    assert 4 * 7 < len(nested())  # four batches in is mid-epoch
    with ap.Loader(nested(), 7, workers=0, epochs=2) as first:
        it = iter(first)
        head = [int(i) for batch in itertools.islice(it, 4) for i in batch["i"]]
        state = it.state_dict()
    with ap.Loader(nested(), 7, workers=0, epochs=2) as second:
        second.load_state_dict(state)
        tail = [int(i) for batch in second for i in batch["i"]]
    assert head + tail == whole


def test_a_state_over_a_changed_inner_mixture_is_refused():
    def outer(weight_b):
        # the same length either way: only the inner weights differ
        inner = ap.Mixture({"A": leaf(40, 1), "B": leaf(40, 2)}, {"A": 1, "B": weight_b}, epoch_items=40)
        return ap.Mixture({"inner": inner, "C": leaf(40, 3)}, {"inner": 1, "C": 1})

    with ap.Loader(outer(1), 4, workers=0) as first:
        state = first.state_dict()
    with ap.Loader(outer(2), 4, workers=0) as second, pytest.raises(ValueError, match="another mixture's weights"):
        second.load_state_dict(state)


# --- components that break the protocol are named ----------------------------------------


class Strays:
    """Orders itself with indices past its length, and says nothing of its index space."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"i": np.int64(index)}

    def batch_order(self, *, seed, epoch, batch_size):
        return [np.arange(8)]


class Wavering(Strays):
    """Orders itself in epochs of different lengths."""

    def batch_order(self, *, seed, epoch, batch_size):
        return [np.arange(4 - epoch % 2)]


def test_an_index_outside_a_components_index_space_is_refused_with_the_remedy():
    mix = ap.Mixture({"strays": Strays(), "plain": leaf(4, 1)}, [1, 1])
    with pytest.raises(ValueError, match=r"'strays'.* index 4 .*range\(4\).*index_space"):
        mix.batch_order(seed=0, epoch=0, batch_size=4)


def test_a_component_whose_epochs_differ_in_length_is_refused():
    mix = ap.Mixture({"wavering": Wavering(), "plain": leaf(40, 1)}, [1, 1])
    with pytest.raises(ValueError, match=r"'wavering'.* epoch 1 .* 3 indices .* epoch 0 .* 4"):
        for epoch in range(3):
            mix.batch_order(seed=0, epoch=epoch, batch_size=4)
