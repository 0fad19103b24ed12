"""`agnostic-prefetch demo`: a tiny run end to end (photographs -> LMDB -> Loader -> JAX)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("skimage")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo(*args: str, tmpdir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=tmpdir, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "agnostic_prefetch.cli", "demo", "--steps", "5", "--batch-size", "16",
         "--workers", "1", "--records", "96", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_tiny_demo_trains_reports_and_removes_its_temporary_data(tmp_path):
    proc = demo(tmpdir=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("images/s", "step time", "waited for data", "loss", "diagnosis", "bound:", "remedy:"):
        assert line in proc.stdout, proc.stdout
    assert "96 JPEG records" in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith("agnostic_prefetch_demo_")]


def test_demo_keeps_and_reuses_a_given_data_dir(tmp_path):
    data = tmp_path / "data"
    first = demo("--data-dir", str(data), tmpdir=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (data / "photos_lmdb" / "data.mdb").exists()
    second = demo("--data-dir", str(data), tmpdir=str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "JPEG records" not in second.stdout  # reused, not rebuilt


def test_demo_rejects_nonsense_arguments(tmp_path):
    proc = demo("--steps", "0", tmpdir=str(tmp_path))
    assert proc.returncode == 2 and "--steps >= 1" in proc.stdout
