"""Soak: hours of a loader's life compressed into minutes, with workers killed; the parent stays flat.

Each cycle builds loaders and uses them the ways a long run does: several epochs, a
``state_dict`` mid-epoch and a new loader resumed from it (checked equal to the rest of an
undisturbed run), a second ``iter()`` restart, ``load_state_dict`` on a live loader, a
prefetch stage closed and rebuilt; meanwhile a thread SIGKILLs a random worker every
``--kill-every`` seconds (each is replaced and its batches redone). Between cycles, when no
loader is alive, the parent's open descriptors, threads, mapped regions and RSS are sampled.

Flat means: descriptors and threads back at their first between-cycles value after every
cycle (a leak of one per cycle would show at once); mapped regions within ``MAPS_SLACK`` of
it (the allocator keeps a few arenas); RSS growing by at most ``RSS_SLACK_MB`` from the
first third of the samples to the last third (caches warm up first; a leak of a batch per
cycle grows without bound).

    python benchmarks/soak.py --minutes 10 [--kill-every 5] [--json out.json]
    pytest tests/test_soak.py          # the short form (about 20 s) in the default suite
    pytest -m slow tests/test_soak.py  # the ten-minute form
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import statistics
import threading
import time
from typing import Any

import numpy as np

import agnostic_prefetch as ap

MAPS_SLACK = 16
RSS_SLACK_MB = 24.0


class Records:
    """Record i: {"x": i, "v": (16,) float32}; a little work per record in a worker."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": np.int64(i), "v": np.full(16, i, np.float32)}


def jitter(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**example, "v": example["v"] + rng.standard_normal(16).astype(np.float32)}


def sample() -> dict[str, float]:
    """The parent's descriptors, threads, mapped regions and RSS (MB) now."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "maps": maps,
            "rss_mb": int(status["VmRSS"].split()[0]) / 1024}


class Killer:
    """SIGKILLs a random worker of whichever loader is live, every ``every`` seconds on average."""

    def __init__(self, every: float | None, seed: int = 0) -> None:
        self.every, self.rng = every, random.Random(seed)
        self.live: ap.Loader | None = None
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-killer", daemon=True)
        if every:
            self._thread.start()

    def _run(self) -> None:
        assert self.every is not None
        while not self._stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
            loader = self.live
            pids = loader.worker_pids if loader is not None and not loader.closed else []
            if pids:
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def rows(batches: Any) -> list[list[int]]:
    return [np.asarray(b["x"]).tolist() for b in batches]


def cycle(k: int, killer: Killer, use_jax: bool) -> None:
    """One cycle of a long run's life; raises if a resumed run differs from the undisturbed one."""
    rng = random.Random(k)
    source = Records(rng.randrange(200, 600))
    kwargs = dict(workers=2, shuffle=True, seed=k, transform=jitter, epochs=2, max_worker_deaths=1000)
    batch = rng.choice([4, 8, 16])
    with ap.Loader(source, batch, **kwargs) as loader:
        killer.live = loader
        full = rows(loader)
    stop = rng.randrange(1, len(full))
    with ap.Loader(source, batch, **kwargs) as loader:
        killer.live = loader
        it = iter(loader)
        head = rows(next(it) for _ in range(stop))
        state = loader.state_dict()
        it = iter(loader)  # a second iter() continues where the first stopped
        head += rows(next(it) for _ in range(min(3, len(full) - stop)))
        loader.load_state_dict(state)  # and back
    with ap.Loader(source, batch, **kwargs) as loader:
        killer.live = loader
        loader.load_state_dict(state)
        tail = rows(loader)
    if head[:stop] + tail != full:
        raise AssertionError(f"cycle {k}: the resumed run differs from the undisturbed one")
    if use_jax:
        with ap.Loader(source, batch, **kwargs) as loader:
            killer.live = loader
            for _ in range(2):  # a prefetch stage closed and rebuilt over one loader
                stage = ap.prefetch_to_device(loader, size=2)
                got = rows(next(stage) for _ in range(3))
                stage.close()
                assert got, "no batch"
    killer.live = None


def soak(seconds: float, kill_every: float | None, log: Any = print) -> dict[str, Any]:
    """Run cycles for ``seconds``; the samples between cycles and whether they stayed flat."""
    try:
        import jax  # noqa: F401

        use_jax = True
    except ImportError:
        use_jax = False
    killer = Killer(kill_every)
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    k = 0
    try:
        while time.monotonic() - started < seconds or k < 3:
            cycle(k, killer, use_jax)
            gc.collect()
            samples.append({"t": round(time.monotonic() - started, 1), **sample()})
            if k % 10 == 0:
                log(f"cycle {k}: {samples[-1]} ({killer.kills} workers killed so far)")
            k += 1
    finally:
        killer.stop()
    return {"cycles": k, "kills": killer.kills, "samples": samples, **verdict(samples)}


def verdict(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Whether the samples are flat (the module's rules), with the numbers."""
    first = samples[0]
    third = max(1, len(samples) // 3)
    rss_growth = statistics.median(s["rss_mb"] for s in samples[-third:]) - statistics.median(
        s["rss_mb"] for s in samples[:third])
    out = {
        "fds_changed": sorted({s["fds"] for s in samples if s["fds"] != first["fds"]}),
        "threads_changed": sorted({s["threads"] for s in samples if s["threads"] != first["threads"]}),
        "maps_max_growth": max(s["maps"] for s in samples) - first["maps"],
        "rss_growth_mb": round(rss_growth, 1),
    }
    out["flat"] = (not out["fds_changed"] and not out["threads_changed"]
                   and out["maps_max_growth"] <= MAPS_SLACK and rss_growth <= RSS_SLACK_MB)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = soak(args.minutes * 60, args.kill_every or None)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
