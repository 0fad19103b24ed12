"""JAX, torch and CuPy stay out of `import agnostic_prefetch` and of the adapter and device modules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = "{'jax', 'jaxlib', 'torch', 'cupy'}"


@pytest.mark.parametrize("module", [
    "agnostic_prefetch",
    "agnostic_prefetch.adapters",
    "agnostic_prefetch.device",
])
def test_importing_does_not_import_any_framework(module):
    code = (f"import {module}, sys; loaded = {FRAMEWORKS} & set(sys.modules); "
            "assert not loaded, f'imported: {loaded}'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr


def test_the_package_exposes_prefetch_to_device_lazily():
    code = ("import agnostic_prefetch as ap, sys; assert 'jax' not in sys.modules; "
            "f = ap.prefetch_to_device; assert 'jax' not in sys.modules; "
            "list(f(iter([{'x': __import__('numpy').zeros(2)}]))); assert 'jax' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr


FORMAT_LIBRARIES = "{'pyarrow', 'datasets', 'array_record', 'fsspec', 's3fs', 'webdataset'}"


@pytest.mark.parametrize("name", ["ArrayRecordSource", "ParquetSource", "HuggingFaceSource", "TFRecordSource",
                                  "WebDatasetSource", "ImageFolderSource", "Loader"])
def test_a_format_source_class_imports_no_format_library_until_it_reads(name):
    code = (f"import agnostic_prefetch as ap, sys; ap.{name}; loaded = {FORMAT_LIBRARIES} & set(sys.modules); "
            "assert not loaded, f'imported: {loaded}'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
