"""Short runs of benchmarks/bench_core.py: the benchmark works and cleans up (speed is not asserted).

    pytest -m bench benchmarks/test_bench_core.py
"""

from __future__ import annotations

import bench_core
import numpy as np
import pytest

SHORT = ["--quick", "--quiet", "--seconds", "0.2", "--warmup", "0.2", "--settle", "0.1",
         "--repeats", "1", "--first-batch-runs", "1"]


def _check_rates(loaders: dict, names: list[str]) -> None:
    for name in names:
        assert name in loaders, name
        result = loaders[name]
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert result["batches_per_s"] > 0
        assert len(result["windows"]) == 1


@pytest.mark.bench
def test_sources_match_the_brief() -> None:
    item = bench_core.FreshImages(10)[3]["image"]
    assert item.shape == (224, 224, 3) and item.dtype == np.uint8 and int(item[0, 0, 0]) == 3
    assert bench_core.FreshImages(10)[3]["image"] is not item  # a fresh array every time
    assert bench_core.TinyRecords(10)[7]["x"] == np.int64(7)
    assert list(zip(range(5), bench_core.Endless(2), strict=False)) == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]


@pytest.mark.bench
def test_s1_hand_off_runs_every_loader(capsys: pytest.CaptureFixture[str]) -> None:
    results = bench_core.main([*SHORT, "--only", "S1"])
    s1 = results["S1"]
    # ours must run; torch and Grain are installed in the bench extra, so they must run too
    _check_rates(s1["loaders"], ["ours process w=2", "ours thread w=2", "ours workers=0", "torch w=2", "grain w=2"])
    for key in ("copy_GBps_1", "copy_GBps_2", "bound_1", "bound_2"):
        assert s1[key] > 0
    assert results["leftover_children"] == {}
    out = capsys.readouterr().out
    assert "S1 hand-off" in out and "vs torch" in out and "copy limit" in out


@pytest.mark.bench
def test_s4_first_batch_in_fresh_interpreters() -> None:
    results = bench_core.main([*SHORT, "--only", "S4"])
    for kind in ("ours", "torch", "grain"):
        x = results["S4"][kind]
        assert "error" not in x, x.get("error")
        assert len(x["runs"]) == 1 and 0 < x["median_s"] < 120
    assert results["leftover_children"] == {}


@pytest.mark.bench
def test_s5_per_batch_overhead_runs() -> None:
    results = bench_core.main([*SHORT, "--only", "S5"])
    _check_rates(results["S5"]["loaders"], ["ours process w=2", "torch w=2", "grain w=2"])
    assert results["leftover_children"] == {}


@pytest.mark.bench
def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(SystemExit):
        bench_core.main(["--only", "S9"])
