"""The soak (benchmarks/soak.py) in its short form: a loader's long life compressed, workers
killed; the parent's descriptors, threads, mappings and memory stay flat."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import soak  # noqa: E402


def test_a_compressed_long_run_with_kills_stays_flat():
    result = soak.soak(seconds=20, kill_every=1.0, log=lambda _: None)
    assert result["cycles"] >= 3 and result["kills"] >= 3
    assert result["flat"], {k: v for k, v in result.items() if k != "samples"}


@pytest.mark.slow
def test_the_soak_for_ten_minutes_stays_flat():
    result = soak.soak(seconds=600, kill_every=5.0)
    assert result["flat"], {k: v for k, v in result.items() if k != "samples"}
