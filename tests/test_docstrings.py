"""Every Example in the package's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The worker entry point runs a worker when imported as a script; the 0.1 module warns.
SKIP = {"agnostic_prefetch._worker_entry"}
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "agnostic_prefetch").rglob("*.py")
)


@pytest.mark.parametrize("name", [m for m in MODULES if m not in SKIP])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an example may use a tiny ring
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
