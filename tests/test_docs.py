"""The runnable examples in docs/ (a code block after ``<!-- example: name -->``) run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", re.S)


def examples():
    return [(f"{path.name}:{name}", code) for path in sorted(DOCS.glob("*.md"))
            for name, code in EXAMPLE.findall(path.read_text())]


@pytest.mark.parametrize("name,code", examples(), ids=[n for n, _ in examples()])
def test_a_docs_example_runs_as_written(name, code, tmp_path):
    pytest.importorskip("jax")
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example printed nothing"


def test_the_docs_have_examples():
    assert any(name.startswith("sequences.md") for name, _ in examples())


def test_no_text_file_keeps_a_merge_conflict():
    root = DOCS.parent
    skip = {".git", ".venv", "build", "dist", "node_modules", "__pycache__"}
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    found = []
    for path in root.rglob("*"):
        if path.suffix not in {".py", ".md", ".toml", ".txt", ".cfg", ".yaml", ".yml"} and path.name != "Makefile":
            continue
        if skip.intersection(path.relative_to(root).parts) or not path.is_file():
            continue
        if marker.search(path.read_text(errors="replace")):
            found.append(str(path.relative_to(root)))
    assert not found, f"merge-conflict markers left in {found}"
