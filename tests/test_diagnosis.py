"""ap.diagnose(): the verdict names the stage that bounds throughput, over a window."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from sources_for_autotune import Burning, Waiting

import agnostic_prefetch as ap
from agnostic_prefetch.diagnosis import BOUNDS


def run(loader, step_s=0.0):
    for _ in loader:
        if step_s:
            time.sleep(step_s)
    return ap.diagnose(loader)


def test_a_source_that_sleeps_is_the_source_waiting_on_io():
    with ap.Loader(Waiting(160, 0.003), 8, workers=1) as loader:
        d = run(loader)
    assert d.bound == "source_io", str(d)
    assert d.numbers["read_cpu_share"] < 0.5 and d.numbers["consumer_wait"] > 0.5
    assert "backend='thread'" in d.remedy and "more workers" in d.remedy


def test_a_transform_that_burns_cpu_is_the_transform():
    with ap.Loader(ap.ArraySource({"x": np.arange(160)}), 8, workers=1, transform=Burning(0.003)) as loader:
        d = run(loader)
    assert d.bound == "transform", str(d)
    assert d.numbers["transform"] > d.numbers["read"]


def test_a_consumer_slower_than_source_and_transform_is_not_input_bound():
    with ap.Loader(Waiting(160, 0.003), 8, workers=2, transform=Burning(0.003), epochs=None) as loader:
        it = iter(loader)
        for _ in range(12):
            next(it)
            time.sleep(0.15)  # a step far slower than 8 items of 3 ms + 3 ms on two workers
        d = ap.diagnose(loader)
    assert d.bound == "none", str(d)
    assert not d.input_bound and d.numbers["consumer_wait"] < 0.1


def test_through_a_prefetcher_the_verdict_covers_its_loader():
    pytest.importorskip("jax")
    with ap.Loader(Waiting(160, 0.003), 8, workers=1) as loader, ap.prefetch_to_device(loader, size=2) as it:
        for _ in it:
            pass
        d = ap.diagnose(it)
    assert d.bound == "source_io", str(d)
    assert {"stage_pull", "stage_place", "stage_transfer"} <= set(d.numbers)
    assert "device stage" in str(d)


def test_the_default_window_is_since_the_previous_call():
    with ap.Loader(ap.ArraySource({"x": np.arange(400)}), 4, workers=1, epochs=None) as loader:
        it = iter(loader)
        for _ in range(30):
            next(it)
        first = ap.diagnose(loader)
        for _ in range(10):
            next(it)
        second = ap.diagnose(loader)
    assert second.numbers["batches"] == 10
    assert first.numbers["batches"] <= 30  # warm-up excluded


def test_a_window_of_the_last_seconds_starts_at_a_snapshot_that_long_ago():
    with ap.Loader(ap.ArraySource({"x": np.arange(400)}), 4, workers=1, epochs=None) as loader:
        it = iter(loader)
        deadline = time.perf_counter() + 2.0
        while time.perf_counter() < deadline:
            next(it)
            time.sleep(0.005)
        d = ap.diagnose(loader, seconds=1.0)
    assert 1.0 <= d.window_s < 1.7


def test_before_any_batch_there_is_nothing_to_diagnose():
    with ap.Loader(ap.ArraySource({"x": np.arange(8)}), 4, workers=0) as loader:
        d = ap.diagnose(loader)
    assert d.numbers["batches"] == 0 and "no batch" in str(d)


def test_the_report_is_short_and_names_the_bound_and_remedy():
    with ap.Loader(Waiting(160, 0.003), 8, workers=1) as loader:
        d = run(loader)
    text = str(d)
    assert d.bound in BOUNDS
    assert len(text.splitlines()) <= 8
    assert "waiting on I/O" in text and "remedy:" in text and "batches/s" in text


def test_diagnose_refuses_what_has_no_accounting():
    with pytest.raises(TypeError, match="Loader, its iterator or a prefetcher"):
        ap.diagnose([1, 2, 3])


def test_log_every_logs_a_diagnosis_line_periodically(caplog):
    caplog.set_level(logging.INFO, logger="agnostic_prefetch")
    with ap.Loader(ap.ArraySource({"x": np.arange(400)}), 4, workers=1, epochs=None, log_every=0.6) as loader:
        it = iter(loader)
        deadline = time.perf_counter() + 2.5
        while time.perf_counter() < deadline:
            next(it)
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "batches/s" in r.getMessage()]
    assert 2 <= len(lines) <= 4
    assert all("bound: none" in line for line in lines), lines


def test_log_every_must_be_positive():
    with pytest.raises(ValueError, match="log_every"):
        ap.Loader(ap.ArraySource({"x": np.arange(8)}), 4, workers=0, log_every=0)


def test_a_slow_placement_is_the_device_transfer():
    from sources_for_tests import OnHost

    from agnostic_prefetch.prefetch import Prefetcher

    # a transfer that takes far longer than loading 8 integers
    with ap.Loader(ap.ArraySource({"x": np.arange(400)}), 8, workers=1) as loader, \
            Prefetcher(loader, 2, OnHost(put_s=0.01)) as it:
        for _ in it:
            pass
        d = ap.diagnose(it)
    assert d.bound == "device_transfer", str(d)
    assert d.numbers["stage_place"] > 0.5
