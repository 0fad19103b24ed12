"""A quick run of benchmarks/plot_peers.py as its users run it: the JSON and the PNG it promises.

    pytest -m bench benchmarks/test_plot_peers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot_peers.py")
CONTENDERS = {"S1": {"ours", "torch", "grain"}, "S2": {"ours", "torch", "grain", "dali"},
              "S5": {"ours", "torch", "grain"}, "S3": {"ours", "torch", "grain"},
              "S6T": {"ours", "full", "torch", "dali"}, "S6E": {"ours", "full", "torch", "dali"}}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plot(tmp: Path, png: str, *args: str) -> subprocess.CompletedProcess[str]:
    # From outside the checkout, as the docs say: the package comes from the installed tree.
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp / png), *args],
                          cwd=tmp, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("plot_peers")
    proc = _plot(tmp, "peers.png", "--quick", "--rounds", "1", "--quiet", "--json", str(tmp / "peers.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, json.loads((tmp / "peers.json").read_text())


@pytest.mark.bench
def test_quick_run_writes_a_png_and_the_raw_figures(quick_run: tuple[Path, dict[str, Any]]) -> None:
    tmp, _ = quick_run
    assert (tmp / "peers.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp / "peers.png").stat().st_size < 200_000


@pytest.mark.bench
def test_every_scenario_has_every_contender_measured_or_a_skip_reason(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    assert set(results["scenarios"]) == set(CONTENDERS)
    for name, expected in CONTENDERS.items():
        contenders = results["scenarios"][name]["contenders"]
        assert set(contenders) == expected, name
        for key, c in contenders.items():
            if key in ("ours", "torch", "grain"):  # ours and the bench extra's peers must run
                assert "skipped" not in c, f"{name} {key}: {c.get('skipped')}"
            if "skipped" in c:
                assert c["skipped"].strip(), f"{name} {key}: an empty skip reason"
            else:
                assert len(c["values"]) == 1 and c["min"] <= c["median"] <= c["max"], (name, key)
        assert set(results["scenarios"][name]["ratios"]) == {k for k, c in contenders.items()
                                                             if k != "ours" and "skipped" not in c}


@pytest.mark.bench
def test_quick_run_leaves_no_worker_behind(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    assert results["meta"]["leftover_children"] == {}


@pytest.mark.bench
def test_from_json_replots_without_measuring(quick_run: tuple[Path, dict[str, Any]]) -> None:
    tmp, _ = quick_run
    proc = _plot(tmp, "replotted.png", "--from-json", str(tmp / "peers.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp / "replotted.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "round 1" not in proc.stderr  # nothing was measured
