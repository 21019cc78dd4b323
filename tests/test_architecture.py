"""The shape of the code (docs/architecture.md): sizes, the packages the document names, and the
import rules that `lint-imports` checks (run by `make test`), shown to fail on a deliberate break."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80

# Justified exceptions: path -> reason (none at present).
MODULE_EXCEPTIONS: dict[str, str] = {}
FUNCTION_EXCEPTIONS: dict[str, str] = {}


def _sources():
    for root in ("lmmem", "data_prep"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("lmmem/experiments/"):
                continue
            yield rel, path.read_text(encoding="utf-8")


def test_no_module_over_500_lines():
    long = {rel: n for rel, text in _sources() if (n := len(text.splitlines())) > MAX_MODULE_LINES and rel not in MODULE_EXCEPTIONS}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_no_function_over_80_lines():
    long = {}
    for rel, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in FUNCTION_EXCEPTIONS:
                    long[f"{rel}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_packages_the_architecture_names_exist():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"`((?:lmmem|data_prep)(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", text)))
    assert "lmmem.training.trainer.fit" in names and "data_prep" in names  # the check reads the document
    missing = [name for name in names if not _resolves(name)]
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
    for path in re.findall(r"`((?:lmmem|data_prep)/[A-Za-z0-9_/.]+)`", text):
        assert (REPO / path).exists(), path


def _resolves(name: str) -> bool:
    """Whether ``name`` is a module, or a name inside one (``lmmem.training.run.Run``)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _lint_copy(tmp_path: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    """`lint-imports` on a copy of the packages with ``extra`` files added."""
    for package in ("lmmem", "data_prep"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for rel, text in extra.items():
        (tmp_path / rel).write_text(text)
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "", "PYTHONPATH": str(tmp_path)}, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("extra, broken", [
    ({}, None),
    # an upward import: the data layer reaching up into training
    ({"lmmem/data/upward.py": "from lmmem.training import config\n"}, "lmmem.data is not allowed to import lmmem.training"),
    # the library importing the corpus tool
    ({"lmmem/models/tool.py": "import data_prep.options\n"}, "lmmem is not allowed to import data_prep"),
    # a cycle inside one layer, which the layers cannot see
    ({"lmmem/data/cycle_a.py": "from lmmem.data import cycle_b\n", "lmmem/data/cycle_b.py": "from lmmem.data import cycle_a\n"},
     "No cycles are allowed in lmmem.data"),
])
def test_lint_imports_fails_on_a_deliberate_break(tmp_path, extra, broken):
    proc = _lint_copy(tmp_path, extra)
    out = proc.stdout + proc.stderr
    if broken is None:
        assert proc.returncode == 0, out
    else:
        assert proc.returncode == 1 and broken in out, out
