"""The ring: sized and reserved up front, a clear error when it cannot fit, no name anywhere."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sources_for_tests import Counting

import agnostic_prefetch as ap
from agnostic_prefetch import _ring
from agnostic_prefetch._layout import ALIGN, HEADER_BYTES, PAGE, layout_from_example
from agnostic_prefetch._testing import internals


def test_ring_that_does_not_fit_is_an_error_with_numbers_and_remedies(monkeypatch):
    monkeypatch.setattr(_ring, "available_bytes", lambda *a, **k: (1_000_000, "MemAvailable in /proc/meminfo"))
    with pytest.raises(ap.RingTooLargeError) as info:
        ap.Loader(Counting(100), 64, workers=1, slots=5, spec={"x": np.zeros((64, 64), np.float32)})
    message = str(info.value)
    slot = layout_from_example({"x": np.zeros((64, 64), np.float32)}, 64).slot_bytes
    assert f"5 slots x {slot:,} bytes" in message and "1,000,000 bytes" in message
    assert "fewer slots" in message and "smaller batch_size" in message


def test_available_memory_accounts_for_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(_ring, "_meminfo_available", lambda: 10 << 30)
    monkeypatch.setattr(_ring, "_cgroup_room", lambda: 1 << 30)
    assert _ring.available_bytes(anonymous=True) == (1 << 30, "room under the cgroup memory limit")


def test_ring_memory_is_reserved_up_front():
    ring = _ring.Ring(3, 1 << 20)
    try:
        blocks = os.fstat(ring.fd).st_blocks * 512
        assert blocks >= 3 << 20  # allocated now, not on first touch
    finally:
        ring.close()


def test_fallback_without_memfd_uses_an_unlinked_file_and_works(monkeypatch):
    monkeypatch.delattr(os, "memfd_create")
    with ap.Loader(Counting(10), 4, workers=2) as loader:
        assert "unlinked file" in internals(loader).ring.kind
        assert [b["i"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_leaves_are_256_byte_aligned_and_slots_page_aligned():
    layout = layout_from_example({"a": np.zeros(3, np.uint8), "b": np.zeros((5, 7), np.float64), "c": 1}, 10)
    offsets = [a.offset for a in layout.arrays]
    assert offsets[0] == HEADER_BYTES and all(o % ALIGN == 0 for o in offsets)
    assert layout.slot_bytes % PAGE == 0
    assert offsets[1] - offsets[0] >= 3 * 10 and offsets[2] - offsets[1] >= 5 * 7 * 8 * 10
