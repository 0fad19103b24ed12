"""Benchmark: packing token sequences, our ``ap.Pack`` against Grain's packers, in one run.

One synthetic corpus (``--items`` token sequences, lognormal lengths: median ~300, p99 ~4000,
at least 1; seed ``--seed``), rows of ``--length`` tokens, global batches of ``--batch`` rows,
``--workers`` worker processes for every peer, the same items in the same order (no shuffle):

    ours    ap.Loader(batching=ap.Pack(length, method, window)) for concat, and first_fit /
            best_fit at each of ``--windows`` (items planned together; 0: the default,
            8 global batches); longer items are split into row-long pieces.
    Grain   MapDataset.source(the same source).to_iter_dataset(), then
            ConcatThenSplitIterDataset, or FirstFitPackIterDataset / BestFitPackIterDataset
            (num_packing_bins = the global batch) after a flat map that splits items longer
            than a row into row-long pieces (Grain's fit packers refuse such items), then
            .batch(global batch).mp_prefetch(MultiprocessingOptions(num_workers=workers)).

Reported, each peer run ``--repeats`` times over one whole epoch, interleaved:

    padding     1 - real tokens / (rows * length), real meaning segment id > 0, over the epoch;
                every method is checked to deliver every token once (count and checksum);
    tokens/s    real tokens per second after the first ``--warmup`` batches (the steady
                rate), and over the whole epoch from the constructor (start-up included);
                medians over repeats; ours/Grain as the median of per-round ratios;
    planning    our planner alone (``EpochPlan`` over ``concat_rows`` / ``fit_rows``, as the
                loader's planner thread runs it) for one epoch: microseconds per item;
    windows     padding of first_fit / best_fit against the window, from the planner.

    python benchmarks/bench_sequences.py [--items 20000] [--batch 32] [--workers 2] [--json out.json]
    pytest -m bench benchmarks/bench_sequences.py        # a short run as a test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytest
from bench_core import cpu_model, grain_ready, leftover_workers

import agnostic_prefetch as ap
from agnostic_prefetch._plan import LENGTH, EpochPlan, column, concat_rows, fit_rows

VOCAB = 32000
METHODS = ("concat", "first_fit", "best_fit")
LOADER_STATS = ("batches", "items", "items_read", "wait_s", "blocked_s", "handoff_s", "fill_s", "read_s", "write_s",
                "worker_idle_s", "workers")


# ---- the corpus ----------------------------------------------------------------------------


def lognormal_lengths(items: int, seed: int, median: float = 300.0, p99: float = 4000.0) -> np.ndarray:
    """``items`` lengths drawn from a lognormal with this median and 99th percentile, at least 1."""
    sigma = math.log(p99 / median) / 2.3263  # the standard normal's 99th percentile
    drawn = np.random.default_rng(seed).lognormal(math.log(median), sigma, items)
    return np.maximum(1, np.rint(drawn)).astype(np.int64)


class Tokens:
    """Items ``{"tokens": int32[lengths[i]]}``: the corpus is one stream of token ids
    ``p % VOCAB`` (``p`` the position in the stream) cut at ``lengths``, so the sum of every
    token an epoch delivers is known without reading the source."""

    def __init__(self, lengths: np.ndarray) -> None:
        self._lengths = np.asarray(lengths, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]])

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(self._starts[i])
        return {"tokens": (np.arange(start, start + int(self._lengths[i]), dtype=np.int64) % VOCAB).astype(np.int32)}

    def lengths(self) -> np.ndarray:
        return self._lengths

    def checksum(self) -> int:
        """The sum of every token of the corpus."""
        full, rest = divmod(int(self._lengths.sum()), VOCAB)
        return full * VOCAB * (VOCAB - 1) // 2 + rest * (rest - 1) // 2

    def __repr__(self) -> str:
        return f"Tokens({len(self)} items, {int(self._lengths.sum())} tokens)"


class RowPieces:
    """Grain flat map: an item longer than ``length`` as row-long pieces (what ``ap.Pack``'s
    default ``longer="split"`` does; Grain's fit packers raise on a longer item).

    Grain 0.2.18 exports no ``FlatMap`` base class (``grain.transforms`` has none);
    ``FlatMapIterDataset`` only calls ``flat_map`` and reads ``max_fan_out``.
    """

    def __init__(self, length: int, longest: int) -> None:
        self.length = length
        self.max_fan_out = max(1, -(-longest // length))

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens = element["tokens"]
        if len(tokens) <= self.length:
            return [element]
        return [{"tokens": tokens[s : s + self.length]} for s in range(0, len(tokens), self.length)]


# ---- the peers: each opens an iterable of batches and closes it on exit -----------------------


@dataclass(frozen=True)
class Peer:
    """One packer to measure: ``who`` is ``"ours"`` or ``"grain"``; ``window`` 0: the default."""

    who: str
    method: str
    window: int = 0

    @property
    def name(self) -> str:
        if self.method == "concat":
            return f"{self.who} concat"
        return f"{self.who} {self.method}" + (f" w={self.window}" if self.window else (" w=default" if self.who == "ours" else ""))

    def open(self, source: Tokens, length: int, batch: int, workers: int) -> AbstractContextManager[Iterable[Any]]:
        if self.who == "ours":
            return open_ours(source, ap.Pack(length=length, method=self.method, window=self.window or None), batch, workers)
        return open_grain(source, self.method, length, batch, workers)


@contextmanager
def open_ours(source: Tokens, pack: ap.Pack, batch: int, workers: int) -> Iterator[Iterable[Any]]:
    with ap.Loader(source, batch, workers=workers, batching=pack) as loader:
        yield loader


@contextmanager
def open_grain(source: Tokens, method: str, length: int, batch: int, workers: int) -> Iterator[Iterable[Any]]:
    grain_ready()
    import grain

    ds = grain.MapDataset.source(source).to_iter_dataset()
    struct = {"tokens": length}
    if method == "concat":
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=struct)
    else:
        packer = {"first_fit": grain.experimental.FirstFitPackIterDataset,
                  "best_fit": grain.experimental.BestFitPackIterDataset}[method]
        ds = grain.experimental.FlatMapIterDataset(ds, RowPieces(length, int(source.lengths().max())))
        ds = packer(ds, length_struct=struct, num_packing_bins=batch)
    ds = ds.batch(batch).mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it = iter(ds)
    try:
        yield it
    finally:
        it.close()


# ---- one epoch ---------------------------------------------------------------------------------


@dataclass
class Epoch:
    """What one epoch of one peer delivered, and when."""

    batches: int = 0
    rows: int = 0
    empty_rows: int = 0  # rows with no real token
    real: int = 0  # real tokens (segment id > 0)
    checksum: int = 0  # sum of the real tokens
    first_s: float = 0.0  # constructor to the first batch
    warm_s: float = 0.0  # constructor to the end of the warm-up batches
    total_s: float = 0.0  # constructor to the epoch's end
    warm_real: int = 0  # real tokens in the warm-up batches
    width: int = 0  # the row length
    errors: list[str] = field(default_factory=list)
    loader_stats: dict[str, Any] = field(default_factory=dict)  # ours: part of Loader.stats()

    @property
    def padding(self) -> float:
        return 1.0 - self.real / max(1, self.rows * self.width)

    @property
    def steady_rate(self) -> float:
        return (self.real - self.warm_real) / max(1e-9, self.total_s - self.warm_s)

    @property
    def whole_rate(self) -> float:
        return self.real / max(1e-9, self.total_s)


def run_epoch(open_batches: Callable[[], AbstractContextManager[Iterable[Any]]], length: int, warmup: int) -> Epoch:
    """Iterate one epoch, counting each batch's real tokens from its segment ids."""
    epoch = Epoch(width=length)
    start = time.perf_counter()
    with open_batches() as batches:
        for b in batches:
            ids, tokens = b["tokens_segment_ids"], b["tokens"]
            if ids.shape[1] != length or tokens.shape != ids.shape:
                epoch.errors.append(f"batch {epoch.batches}: shapes {tokens.shape} / {ids.shape}, rows of {length}")
            real = ids > 0
            epoch.batches += 1
            epoch.rows += ids.shape[0]
            epoch.empty_rows += int((~real.any(axis=1)).sum())
            epoch.real += int(np.count_nonzero(real))
            epoch.checksum += int(tokens[real].sum(dtype=np.int64))
            if epoch.batches == 1:
                epoch.first_s = time.perf_counter() - start
            if epoch.batches == warmup:
                epoch.warm_s, epoch.warm_real = time.perf_counter() - start, epoch.real
        epoch.total_s = time.perf_counter() - start
        if isinstance(batches, ap.Loader):
            stats = batches.stats()
            epoch.loader_stats = {k: stats[k] for k in LOADER_STATS}
    return epoch


# ---- the planner alone ---------------------------------------------------------------------


def plan_epoch(lengths: np.ndarray, method: str, window: int, length: int, batch: int) -> tuple[float, int, int]:
    """Seconds to plan one epoch as the loader's planner thread does (batch by batch,
    forgetting delivered ones), and the rows and real tokens the plan holds."""
    order, columns, limits = np.arange(len(lengths)), [lengths], (length,)
    if method == "concat":
        def rows(cursor: Any) -> Any:
            return concat_rows(order, columns, limits, cursor)
    else:
        def rows(cursor: Any) -> Any:
            return fit_rows(order, columns, limits, method == "best_fit", window, True, cursor)
    start = time.perf_counter()
    plan = EpochPlan(rows, batch, limits, drop=False)
    k = total_rows = real = 0
    while (found := plan.batch(k)) is not None:
        total_rows += found[0].rows
        real += int(found[0].segments[:, column(0, LENGTH)].sum())
        plan.forget(k + 1)
        k += 1
    return time.perf_counter() - start, total_rows, real


# ---- the run ---------------------------------------------------------------------------------


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--length", type=int, default=2048, help="row length L")
    parser.add_argument("--batch", type=int, default=32, help="rows per global batch (and Grain's packing bins)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--windows", default="0,1024,4096", help="fit windows to load with (0: the default)")
    parser.add_argument("--plan-windows", default="32,64,128,256,512,1024,2048,4096,8192,16384",
                        help="fit windows for the padding table (planner only)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved epochs per peer; medians are reported")
    parser.add_argument("--warmup", type=int, default=5, help="batches left out of the steady rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-grain", action="store_true")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    shm_before = shm_entries()

    lengths = lognormal_lengths(args.items, args.seed)
    source = Tokens(lengths)
    expected = {"real": int(lengths.sum()), "checksum": source.checksum()}
    corpus = {"items": args.items, "tokens": expected["real"], "median": float(np.median(lengths)),
              "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()), "mean": float(lengths.mean()),
              "longer_than_row": int((lengths > args.length).sum())}
    print(f"corpus: {corpus['items']} items, {corpus['tokens']} tokens, median {corpus['median']:.0f}, "
          f"p99 {corpus['p99']:.0f}, max {corpus['max']}, {corpus['longer_than_row']} longer than a row of "
          f"{args.length}; batch {args.batch} rows; {args.workers} workers", flush=True)

    # The planner alone, and the window table (deterministic: one plan each, timed --repeats times).
    planning: dict[str, Any] = {}
    for method, window in [("concat", 0)] + [(m, w) for m in METHODS[1:] for w in sorted({*windows, 0})]:
        w = window or 8 * args.batch
        times = []
        for _ in range(args.repeats):
            seconds, rows, real = plan_epoch(lengths, method, w, args.length, args.batch)
            times.append(seconds)
        planning[f"{method}" + ("" if method == "concat" else f" w={w}")] = {
            "us_per_item": statistics.median(times) / args.items * 1e6, "runs_s": times, "rows": rows,
            "padding": 1 - real / (rows * args.length)}
    window_table: dict[str, dict[int, float]] = {m: {} for m in METHODS[1:]}
    for w in [int(x) for x in args.plan_windows.split(",") if x.strip()] + [args.items]:
        for method in METHODS[1:]:
            _, rows, real = plan_epoch(lengths, method, w, args.length, args.batch)
            window_table[method][w] = 1 - real / (rows * args.length)
    _, rows, real = plan_epoch(lengths, "concat", 0, args.length, args.batch)
    concat_padding = 1 - real / (rows * args.length)
    bound = 1 - expected["real"] / (math.ceil(expected["real"] / args.length) * args.length)

    peers = [Peer("ours", "concat")] + [Peer("ours", m, w) for m in METHODS[1:] for w in windows]
    if not args.skip_grain:
        peers += [Peer("grain", m) for m in METHODS]
    epochs: dict[str, list[Epoch]] = {p.name: [] for p in peers}
    failures: dict[str, str] = {}
    for r in range(args.repeats):
        for peer in peers:
            if peer.name in failures:
                continue
            try:
                epoch = run_epoch(lambda p=peer: p.open(source, args.length, args.batch, args.workers),
                                  args.length, args.warmup)
            except Exception as exc:  # a peer that fails here is reported, not fatal
                failures[peer.name] = f"{type(exc).__name__}: {exc}"
                print(f"  {peer.name}: FAILED {failures[peer.name]}", flush=True)
                continue
            epochs[peer.name].append(epoch)
            gc.collect()  # Grain's closed iterator keeps its semaphores and shared memory until collected
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {e[-1].steady_rate / 1e6:.2f}M" for n, e in epochs.items() if len(e) == r + 1), flush=True)

    time.sleep(0.2)  # let just-closed workers finish exiting
    results = report(args, corpus, expected, peers, epochs, failures, planning, window_table, concat_padding, bound)
    results["leftover_children"] = leftover_workers()
    new_shm = sorted(shm_entries() - shm_before)
    results["shm_left"] = new_shm
    print(f"left-over child processes (besides multiprocessing's resource_tracker): {results['leftover_children'] or 'none'}")
    print(f"new /dev/shm entries: {new_shm or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()
    return results


def report(args: argparse.Namespace, corpus: dict[str, Any], expected: dict[str, int], peers: list[Peer],
           epochs: dict[str, list[Epoch]], failures: dict[str, str], planning: dict[str, Any],
           window_table: dict[str, dict[int, float]], concat_padding: float, bound: float) -> dict[str, Any]:
    """Print the tables; return every figure (JSON-able)."""
    grain_of = {m: epochs.get(Peer("grain", m).name, []) for m in METHODS}
    print(f"\npacked epochs ({args.items} items, rows of {args.length}, batch {args.batch}, {args.workers} workers); "
          f"Mtok/s = million real tokens per second, medians of {args.repeats}")
    print(f"{'peer':24} {'padding':>8} {'rows':>6} {'empty':>5} {'every token':>11} {'steady Mtok/s':>13} "
          f"{'vs grain':>8} {'whole Mtok/s':>12} {'vs grain':>8} {'first s':>7} {'idle':>5}")
    peers_out: dict[str, Any] = {}
    for peer in peers:
        runs = epochs[peer.name]
        if not runs:
            print(f"{peer.name:24} {failures.get(peer.name, 'no run')}")
            peers_out[peer.name] = {"error": failures.get(peer.name, "no run")}
            continue
        last = runs[-1]
        same = all((e.real, e.checksum, e.rows) == (last.real, last.checksum, last.rows) for e in runs)
        complete = last.real == expected["real"] and last.checksum == expected["checksum"] and same
        errors = [err for e in runs for err in e.errors]
        steady = statistics.median(e.steady_rate for e in runs)
        whole = statistics.median(e.whole_rate for e in runs)
        peer_grain = grain_of[peer.method]
        n = min(len(runs), len(peer_grain))
        vs_steady = vs_whole = None
        if peer.who == "ours" and n:
            vs_steady = statistics.median(runs[i].steady_rate / peer_grain[i].steady_rate for i in range(n))
            vs_whole = statistics.median(runs[i].whole_rate / peer_grain[i].whole_rate for i in range(n))
        peers_out[peer.name] = {
            "padding": last.padding, "rows": last.rows, "empty_rows": last.empty_rows, "batches": last.batches,
            "real_tokens": last.real, "every_token_once": complete, "shape_errors": errors[:5],
            "steady_tokens_per_s": steady, "whole_tokens_per_s": whole,
            "steady_vs_grain": vs_steady, "whole_vs_grain": vs_whole,
            "first_batch_s": statistics.median(e.first_s for e in runs),
            "runs": [asdict(e) | {"steady_tokens_per_s": e.steady_rate, "whole_tokens_per_s": e.whole_rate}
                     for e in runs]}
        idle = [e.loader_stats["worker_idle_s"] / (e.loader_stats["workers"] * e.total_s)
                for e in runs if e.loader_stats.get("workers")]
        peers_out[peer.name]["worker_idle"] = statistics.median(idle) if idle else None
        check = "yes" if complete else f"NO {last.real - expected['real']:+d}"
        print(f"{peer.name:24} {last.padding:8.2%} {last.rows:6d} {last.empty_rows:5d} {check:>11} {steady / 1e6:13.2f} "
              f"{_x(vs_steady):>8} {whole / 1e6:12.2f} {_x(vs_whole):>8} {peers_out[peer.name]['first_batch_s']:7.2f}"
              f" {f'{statistics.median(idle):.0%}' if idle else '':>5}"
              + (f"  {errors[0]}" if errors else ""))
    print(f"(fewest rows possible: padding {bound:.2%}; the planner's concat: {concat_padding:.2%}; idle: our "
          "workers' worker_idle_s over workers x the epoch, from Loader.stats())")

    print("\nplanning one epoch, our planner alone (EpochPlan batch by batch, as the planner thread runs it)")
    print(f"{'method':24} {'us/item':>8} {'padding':>8}")
    for name, p in planning.items():
        print(f"{name:24} {p['us_per_item']:8.2f} {p['padding']:8.2%}")

    print("\npadding against the window (items planned together), from the planner")
    ws = sorted(window_table["first_fit"])
    print(f"{'window':>10} " + " ".join(f"{'all' if w == args.items else w:>7}" for w in ws))
    for method, row in window_table.items():
        print(f"{method:>10} " + " ".join(f"{row[w]:7.2%}" for w in ws))
    return {"machine": {"nproc": os.cpu_count(), "cpu": cpu_model()}, "settings": vars(args), "corpus": corpus,
            "expected": expected, "peers": peers_out, "planning": planning,
            "window_padding": {m: {str(w): v for w, v in row.items()} for m, row in window_table.items()},
            "concat_padding_planned": concat_padding, "fewest_rows_padding": bound}


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


@pytest.mark.bench
def test_bench_sequences_runs_and_every_method_delivers_every_token() -> None:
    results = main(["--items", "1500", "--repeats", "1", "--windows", "0,512", "--plan-windows", "64,256",
                    "--warmup", "2"])
    for name, peer in results["peers"].items():
        assert "error" not in peer, f"{name}: {peer['error']}"
        assert peer["every_token_once"] and not peer["shape_errors"], name
        assert peer["steady_tokens_per_s"] > 0 and 0 <= peer["padding"] < 1, name
    assert all(p["us_per_item"] > 0 for p in results["planning"].values())
    assert not results["leftover_children"]
    assert not [n for n in results["shm_left"] if "agnostic_prefetch" in n]


if __name__ == "__main__":
    main()
