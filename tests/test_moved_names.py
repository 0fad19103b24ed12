"""Names that moved in 0.2 still resolve where 0.1 had them, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

import agnostic_prefetch as ap


@pytest.mark.parametrize("name", ["LMDBSource", "ImageListSource", "WindowSource", "write_array_records"])
def test_caffe_sources_from_the_sources_package_warn_and_are_the_caffe_ones(name):
    import agnostic_prefetch.caffe as caffe
    import agnostic_prefetch.sources as sources

    with pytest.warns(DeprecationWarning, match=rf"moved to agnostic_prefetch.caffe.{name}"):
        moved = getattr(sources, name)
    assert moved is getattr(caffe, name)


def test_the_transforms_module_warns_and_gives_the_caffe_transform(monkeypatch):
    monkeypatch.delitem(sys.modules, "agnostic_prefetch.transforms", raising=False)
    with pytest.warns(DeprecationWarning, match="moved to agnostic_prefetch.caffe"):
        module = importlib.import_module("agnostic_prefetch.transforms")
    assert module.CaffeTransform is ap.CaffeTransform


def test_top_level_names_need_no_new_import_path():
    for name in ("LMDBSource", "ImageListSource", "WindowSource", "CaffeTransform", "ArraySource",
                 "BatchOrderSource", "Loader", "LoaderIterator", "Prefetcher"):
        assert getattr(ap, name).__name__ == name


def test_device_prefetcher_is_the_one_prefetcher_type():
    from agnostic_prefetch.device import DevicePrefetcher

    assert DevicePrefetcher is ap.Prefetcher
