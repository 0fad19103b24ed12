"""A dead worker is replaced and its batches filled again; a record that kills is found (issue 22)."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading

import numpy as np
import pytest
from dying_sources import Killing, Raising, Slowish, noisy

import agnostic_prefetch as ap


def batches_of(loader_or_iter):
    return [{k: np.asarray(v).tolist() for k, v in b.items()} for b in loader_or_iter]


class Killer:
    """Kills a random worker of ``loader`` with SIGKILL every ``every`` seconds, ``times`` times."""

    def __init__(self, loader, every, times, seed=0):
        self.loader, self.every, self.times = loader, every, times
        self.rng = random.Random(seed)
        self.kills = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.kills < self.times and not self.stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
            pids = self.loader.worker_pids
            if not pids:
                continue
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass

    def join(self):
        self.stop.set()
        self.thread.join()


KWARGS = dict(workers=2, shuffle=True, seed=3, transform=noisy, epochs=2, max_worker_deaths=100)


@pytest.mark.parametrize("ordered", [True, False])
def test_workers_killed_at_random_moments_change_no_batch(ordered, caplog):
    source = Slowish(320, delay=0.002)
    with ap.Loader(source, 8, **KWARGS, ordered=ordered) as loader:
        want = batches_of(loader)
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(source, 8, **KWARGS, ordered=ordered) as loader:
            killer = Killer(loader, every=0.15, times=8)
            got = batches_of(loader)
            killer.join()
            stats = loader.stats()
    assert killer.kills >= 3
    if ordered:
        assert got == want
    else:  # out of order: the same batches, none lost or repeated
        key = lambda b: b["x"]  # noqa: E731
        assert sorted(got, key=key) == sorted(want, key=key)
    assert stats["worker_deaths"] >= 1 and stats["batches"] == len(want)
    assert "was killed by SIGKILL" in caplog.text and "filled again" in caplog.text


def test_through_prefetch_to_device_with_kills_the_batches_are_the_same():
    pytest.importorskip("jax")
    source = Slowish(240, delay=0.002)
    with ap.Loader(source, 8, **KWARGS) as loader:
        want = batches_of(loader)
    with ap.Loader(source, 8, **KWARGS) as loader:
        killer = Killer(loader, every=0.15, times=6, seed=1)
        got = batches_of(ap.prefetch_to_device(loader, size=2))
        killer.join()
    assert got == want


@pytest.mark.parametrize("how,signal_name", [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_a_record_that_kills_its_worker_is_named(how, signal_name):
    with ap.Loader(Killing(40, bad={13}, how=how), 4, workers=2) as loader:
        with pytest.raises(ap.WorkerDiedError, match=rf"record 13 \(line 14 of slowish.txt\) kills the worker.*"
                                                     rf"{signal_name}.*on_error='skip'"):
            batches_of(loader)
        deaths = loader.stats()["deaths"] if not loader.closed else None
    assert deaths is None or len(deaths) == 3


def test_a_record_that_kills_is_left_out_with_skip_like_a_record_that_raises(caplog):
    bad = {5, 6, 30}
    kwargs = dict(workers=2, shuffle=True, seed=1, transform=noisy, on_error="skip")
    with ap.Loader(Raising(48, bad), 4, **kwargs) as loader:
        want = batches_of(loader)
    with caplog.at_level(logging.WARNING, logger="agnostic_prefetch"):
        with ap.Loader(Killing(48, bad, how="segv"), 4, **kwargs) as loader:
            got = batches_of(loader)
            stats = loader.stats()
    assert got == want
    assert stats["skipped"] == 3 and all(d["record_blamed"] for d in stats["deaths"])
    assert "record 5 killed the worker reading it" in caplog.text


def test_deaths_past_the_limit_stop_the_loader_naming_each():
    source = Slowish(2000, delay=0.005)
    with ap.Loader(source, 4, workers=2, max_worker_deaths=2) as loader:
        killer = Killer(loader, every=0.1, times=10)
        with pytest.raises(ap.WorkerDiedError, match=r"3 workers died within 60 s, more than max_worker_deaths=2"):
            batches_of(loader)
        killer.join()


def test_max_worker_deaths_0_fails_at_the_first_as_before():
    source = Slowish(2000, delay=0.005)
    loader = ap.Loader(source, 4, workers=2, max_worker_deaths=0)
    it = iter(loader)
    next(it)
    os.kill(loader.worker_pids[0], signal.SIGKILL)
    with pytest.raises(ap.WorkerDiedError, match="SIGKILL.*build a new one"):
        for _ in it:
            pass
    assert loader.closed


def test_max_worker_deaths_is_checked():
    with pytest.raises(ValueError, match="max_worker_deaths"):
        ap.Loader(Slowish(8), 2, workers=0, max_worker_deaths=-1)


def test_a_death_says_whether_the_oom_killer_did_it(monkeypatch):
    from agnostic_prefetch import _recovery

    counts = iter([0, 0, 1])
    monkeypatch.setattr(_recovery, "oom_kills", lambda: next(counts))
    recovery = _recovery.Recovery(3)
    killed = "was killed by SIGKILL (SIGKILL is what the kernel's OOM killer sends: check memory)"
    assert "not by the OOM killer" in recovery.reason(killed)
    assert "the kernel's OOM killer (this cgroup counts 1 more oom_kill)" in recovery.reason(killed)


def test_a_found_culprit_that_kills_again_from_a_batch_ordered_earlier_is_blamed_at_once():
    """A batch holding the record may have been ordered before the probe found it: that death
    is the record's too, so it neither counts against the limit nor starts another probe."""
    from agnostic_prefetch._recovery import CULPRIT, PROBE, REDO, Death, Recovery

    recovery = Recovery(max_deaths=2, skip=True)

    def death(at):
        return Death(at, f"worker {at}", "killed by SIGSEGV", [(0, 1)], "record 6")

    assert recovery.died(death(1.0), seq=1, record=6, probe=False) == REDO
    assert recovery.died(death(2.0), seq=1, record=6, probe=False) == PROBE
    assert recovery.died(death(3.0), seq=1, record=6, probe=True) == CULPRIT
    # a batch of the next epoch, ordered before the probe answered, reaches record 6 again
    assert recovery.died(death(4.0), seq=9, record=6, probe=False) == CULPRIT
    assert all(d.blamed for d in recovery.deaths)
