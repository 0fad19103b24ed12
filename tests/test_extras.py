"""The optional extras: lower bounds only, so that installing one beside a framework the user
already has keeps that framework; the CPU torch that `make test` installs is the lowest the
torch extra allows."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import site
import subprocess
import sysconfig
import venv

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
# The extras that name a framework a user may already have.
FRAMEWORK_EXTRAS = ("torch", "jax", "cupy", "orbax", "caffe")


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.13"`` -> ``(2, 13, 0)``: release numbers only, padded so that 2.13 == 2.13.0."""
    numbers = [int(x) for x in re.match(r"\d+(?:\.\d+)*", text).group().split(".")]
    return tuple(numbers + [0] * (3 - len(numbers)))


def test_no_extra_pins_one_version():
    pinned = [f"[{extra}] {r}" for extra, requirements in EXTRAS.items() for r in requirements
              if "==" in r.split(";")[0]]  # the version, not an environment marker
    assert not pinned, ("an extra that pins one version replaces the user's own; give a lower "
                        "bound and pin the test set-up in constraints.txt:\n" + "\n".join(pinned))


def test_every_extra_requirement_has_a_lower_bound():
    unbounded = [f"[{extra}] {r}" for extra, requirements in EXTRAS.items() for r in requirements
                 if ">=" not in r]
    assert not unbounded, ("give each the lowest version tested as its lower bound (>=):\n"
                           + "\n".join(unbounded))


def test_make_test_installs_the_lowest_torch_the_extras_allow():
    """CI tests the floor: constraints.txt pins the torch the extras' ``>=`` names."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    for extra in ("torch", "test", "bench"):
        requirement = next(r for r in EXTRAS[extra] if name_of(r) == "torch")
        floor = re.search(r">=\s*([\d.]+)", requirement)
        assert floor, f"the {extra} extra gives torch no lower bound: {requirement!r}"
        floor = floor.group(1)
        assert version_tuple(pins["torch"]) == version_tuple(floor), (
            f"the {extra} extra allows torch>={floor} but make test installs {pins['torch']}")


def environment_with_what_is_installed_here(path: pathlib.Path) -> pathlib.Path:
    """A fresh virtual environment that sees this interpreter's installed packages, as a
    user's own environment sees their framework; returns its python.

    ``--system-site-packages`` would show the base interpreter's packages, not those of the
    virtual environment the tests may run in, so a ``.pth`` file names them instead. pip
    uninstalls nothing outside the new environment, so this one cannot change the tests' own.
    """
    venv.create(path, with_pip=False)
    purelib = sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    inherited = [p for p in site.getsitepackages() if os.path.isdir(p)]
    pathlib.Path(purelib, "inherited.pth").write_text("\n".join(inherited) + "\n")
    return path / "bin" / "python"


@pytest.mark.parametrize("extra", FRAMEWORK_EXTRAS)
def test_installing_an_extra_keeps_the_framework_already_installed(extra, tmp_path):
    """``pip install agnostic_prefetch[extra]`` beside the framework resolves to nothing new.

    The requirements are passed to pip as the package's metadata lists them (its core
    dependencies and the extra's), rather than as ``.[extra]``: building that metadata needs
    setuptools>=77, which a fresh virtual environment lacks offline. ``--no-index`` with no
    configuration keeps pip off the network: every requirement must be met by what is
    installed, and one that is not fails the resolution with pip's message.
    """
    requirements = PROJECT["dependencies"] + EXTRAS[extra]
    for requirement in requirements:
        try:
            importlib.metadata.version(name_of(requirement))
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name_of(requirement)} (the {extra} extra) is not installed here")
    python = environment_with_what_is_installed_here(tmp_path / "env")
    report = tmp_path / "report.json"
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline["PIP_CONFIG_FILE"] = os.devnull  # no find-links, extra index or constraint files
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         "--no-index", "--disable-pip-version-check", *requirements],
        env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"agnostic_prefetch[{extra}] needs something this environment lacks, so installing it "
        f"would replace or add a package:\n{done.stderr}")
    installs = [f"{item['metadata']['name']} {item['metadata']['version']}"
                for item in json.loads(report.read_text())["install"]]
    assert installs == [], f"agnostic_prefetch[{extra}] would install {installs}"
