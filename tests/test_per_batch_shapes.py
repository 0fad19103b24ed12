"""shapes="per_batch": items of different shapes; each batch takes its first item's, as Caffe's reshape does."""

from __future__ import annotations

import numpy as np
import pytest

import agnostic_prefetch as ap


class Sizes:
    """Record i: an image of ``sizes[i]`` (H, W) and C channels, every value i."""

    def __init__(self, sizes, channels=None):
        self.sizes, self.channels = sizes, channels or [3] * len(sizes)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        return {"image": np.full((h, w, self.channels[i]), i, np.uint8), "label": np.int32(i)}


SPEC = {"image": np.zeros((6, 6, 3), np.uint8), "label": np.int32(0)}


@pytest.mark.parametrize("workers, backend", [(0, "process"), (1, "thread"), (2, "process")])
def test_each_batch_takes_its_first_items_shape_and_channel_count(workers, backend):
    source = Sizes([(4, 5), (4, 5), (3, 2), (3, 2), (6, 6), (6, 6), (2, 2)], channels=[3, 3, 1, 1, 3, 3, 3])
    with ap.Loader(source, 2, workers=workers, backend=backend, spec=SPEC, shapes="per_batch", epochs=2) as loader:
        batches = list(loader)
    shapes = [(2, 4, 5, 3), (2, 3, 2, 1), (2, 6, 6, 3), (1, 2, 2, 3)]
    assert [b["image"].shape for b in batches] == shapes * 2
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6]] * 2
    for b in batches:
        for j, i in enumerate(b["label"].tolist()):
            assert (b["image"][j] == i).all()


def test_shapes_follow_each_batch_and_views_hold_the_right_values():
    source = Sizes([(4, 5), (4, 5), (3, 2), (3, 2), (6, 6), (6, 6), (2, 2)])
    with ap.Loader(source, 2, workers=1, spec=SPEC, shapes="per_batch") as loader:
        batches = list(loader)
    assert [b["image"].shape for b in batches] == [(2, 4, 5, 3), (2, 3, 2, 3), (2, 6, 6, 3), (1, 2, 2, 3)]
    for k, b in enumerate(batches):
        for j, i in enumerate(b["label"].tolist()):
            assert i == 2 * k + j and (b["image"][j] == i).all()


def test_an_item_that_does_not_fit_its_batch_names_both_records():
    with ap.Loader(Sizes([(4, 5), (3, 5)]), 2, workers=0, spec=SPEC, shapes="per_batch") as loader, pytest.raises(
            ap.WorkerError, match=r"record 1: leaf \['image'\] is uint8\[3, 5, 3\] but record 0's, the first of its "
                                  r"batch, is uint8\[4, 5, 3\].*batch_size=1 takes any"):
        list(loader)


@pytest.mark.parametrize("workers, backend", [(0, "process"), (1, "thread"), (2, "process")])
def test_a_batch_larger_than_its_slot_still_arrives_through_the_pipe_and_says_so_once(workers, backend, caplog):
    import logging

    source = Sizes([(4, 5), (7, 7), (2, 2), (10, 3), (6, 6)], channels=[3, 3, 1, 4, 3])
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(source, 1, workers=workers, backend=backend, spec=SPEC, shapes="per_batch", epochs=2) as loader:
            batches = [(b["image"].copy(), int(b["label"][0])) for b in loader]
            stats = loader.stats()
    assert [image.shape for image, _ in batches] == [(1, 4, 5, 3), (1, 7, 7, 3), (1, 2, 2, 1), (1, 10, 3, 4), (1, 6, 6, 3)] * 2
    assert all((image == label).all() for image, label in batches)
    assert stats["outside_ring"] == 4  # 7x7x3 and 10x3x4 exceed the 6x6x3 slot, in both epochs
    [note] = [r.getMessage() for r in caplog.records if "larger than the ring's slots" in r.getMessage()]
    assert "record 1: ['image'] [7, 7, 3] (the ring holds [6, 6, 3])" in note and "spec=" in note


def test_without_a_spec_per_batch_slots_are_laid_out_from_the_first_example():
    source = Sizes([(4, 5), (3, 2), (8, 8)])
    with ap.Loader(source, 1, workers=1, shapes="per_batch") as loader:
        assert [b["image"].shape for b in loader] == [(1, 4, 5, 3), (1, 3, 2, 3), (1, 8, 8, 3)]
        assert loader.stats()["outside_ring"] == 1


def test_a_leaf_with_another_number_of_dimensions_is_refused():
    class Flat(Sizes):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "image": item["image"].reshape(-1)} if i else item

    with ap.Loader(Flat([(2, 2), (2, 2)]), 1, workers=0, spec=SPEC, shapes="per_batch") as loader, pytest.raises(
            ap.WorkerError, match=r"not its number of dimensions"):
        list(loader)


def test_per_batch_shapes_need_one_shard_and_no_padding():
    with pytest.raises(ValueError, match="shard_count=2: every process must feed the same shape"):
        ap.Loader(Sizes([(2, 2)] * 4), 1, workers=0, spec=SPEC, shapes="per_batch", shard_count=2)
    with pytest.raises(ValueError, match="cannot pad"):
        ap.Loader(Sizes([(2, 2)] * 3), 2, workers=0, spec=SPEC, shapes="per_batch", remainder="pad")
    with pytest.raises(ValueError, match="'fixed' or 'per_batch'"):
        ap.Loader(Sizes([(2, 2)]), 1, workers=0, shapes="ragged")


def test_a_per_batch_loader_resumes_exactly():
    source = Sizes([(4, 5), (4, 5), (3, 2), (3, 2), (6, 6), (6, 6)])
    with ap.Loader(source, 2, workers=1, spec=SPEC, shapes="per_batch") as first:
        it = iter(first)
        next(it)
        state = it.state_dict()
    with ap.Loader(source, 2, workers=0, spec=SPEC, shapes="per_batch") as second:
        second.load_state_dict(state)
        assert [b["image"].shape for b in second] == [(2, 3, 2, 3), (2, 6, 6, 3)]
