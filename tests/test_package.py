"""The package's shape: small modules, no reach into another package's private modules,
every declared dependency used and every import declared, the typing marker shipped."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agnostic_prefetch"
MAX_LINES = 400
# Imports whose distribution may not be installed here (the GPU and benchmark extras).
# Imported only by benchmarks (the bench extras), which a test environment need not have.
NOT_INSTALLED_HERE = {"cupy": "cupy-cuda12x", "grain": "grain", "absl": "absl-py",
                      "matplotlib": "matplotlib", "nvidia.dali": "nvidia-dali-cuda120"}
NAMESPACES = ("google", "nvidia")  # top-level names that many distributions share


def modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            # ``from package import _private_module``
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if alias.name.startswith("_") and (PACKAGE.parent / (node.module.replace(".", "/") + f"/{alias.name}.py")).exists()]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))  # importlib.import_module("cupy")
    return found


def package_of(name: str, path: pathlib.Path | None = None) -> str:
    return name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by what it owns"


def test_no_module_imports_another_packages_private_module():
    """A private module (``pkg._mod``) is imported only from ``pkg`` and the packages inside it."""
    offences = []
    for path in modules():
        importer = package_of(module_name(path), path)
        for line, name in imported_modules(path):
            if not name.startswith("agnostic_prefetch."):
                continue
            parts = name.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if importer != owner and not importer.startswith(owner + "."):
                        offences.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
                    break
    assert not offences, "\n".join(offences)


def import_graph() -> dict[str, set[str]]:
    """Which of the package's modules each module imports: at the top, under
    ``TYPE_CHECKING`` and inside functions alike (``from pkg import mod`` counts as ``pkg.mod``
    where that is a module)."""
    names = {module_name(path): path for path in modules()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in names else node.module)
        graph[name] = {e for e in edges if e in names and e != name}
    return graph


def test_no_import_circle_between_the_packages_modules():
    graph = import_graph()
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt][-1:]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(circles)


def declared() -> dict[str, set[str]]:
    """Distribution names per group: 'core' and each optional extra (normalized)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {normalize(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}

    groups = {"core": names(project["dependencies"])}
    for extra, requirements in project["optional-dependencies"].items():
        groups[extra] = names(requirements)
    return groups


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(paths: list[pathlib.Path]) -> dict[str, str]:
    """Top-level imported names that are neither ours nor the standard library -> a file using it."""
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    found: dict[str, str] = {}
    for path in paths:
        for _, name in imported_modules(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in local or top in ("agnostic_prefetch", "__future__"):
                continue
            found.setdefault(".".join(name.split(".")[:2]) if top in NAMESPACES else top,
                             str(path.relative_to(ROOT)))
    return found


def distribution_of(name: str) -> str:
    top = name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if name.startswith("google.protobuf"):
        return "protobuf"
    if name in NOT_INSTALLED_HERE and "." in name:  # a namespace package: the name says which
        return normalize(NOT_INSTALLED_HERE[name])
    if dists:
        return normalize(dists[0])
    return normalize(NOT_INSTALLED_HERE[top])


def test_every_import_is_declared():
    groups = declared()
    everything = set().union(*groups.values())
    package = third_party_imports(modules())
    for name, where in package.items():
        assert distribution_of(name) in everything, f"{where} imports {name}: declare {distribution_of(name)}"
    tests = third_party_imports(sorted((ROOT / "tests").glob("*.py")))
    for name, where in tests.items():  # CuPy needs a GPU: its tests skip without it
        assert distribution_of(name) in groups["test"] | groups["core"] | groups["cupy"], (
            f"{where} imports {name}: add {distribution_of(name)} to the test extra")
    benches = third_party_imports(sorted((ROOT / "benchmarks").glob("*.py")))
    for name, where in benches.items():  # bench_gpu.py uses CuPy where a GPU has it
        assert distribution_of(name) in groups["bench"] | groups["bench-dali"] | groups["core"] | groups["cupy"], (
            f"{where} imports {name}: add {distribution_of(name)} to the bench extra")


def test_every_declared_dependency_is_imported_somewhere():
    groups = declared()
    used = {distribution_of(name) for name in third_party_imports(modules())}
    unused_core = groups["core"] - used
    assert not unused_core, f"declared but never imported by the package: {sorted(unused_core)}"
    for extra in ("jax", "torch", "cupy"):  # caffe: protobuf, for the prototxt parser to come
        assert groups[extra] & used, f"the {extra} extra is imported nowhere"


def test_the_caffe_extra_has_a_protobuf_with_get_message_class():
    requirement = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                       ["optional-dependencies"]["caffe"] if r.startswith("protobuf"))
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))
    assert floor >= (4, 22), "GetMessageClass arrived in protobuf 4.22"
    from google.protobuf import message_factory

    assert hasattr(message_factory, "GetMessageClass")


def test_the_typing_marker_ships_with_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["agnostic_prefetch"]
    assert (PACKAGE / "py.typed").exists()
