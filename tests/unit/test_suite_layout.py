"""The test ladder and its rule, read from the source with ``ast`` (nothing is imported or run):

- every test file lives directly in one rung: ``tests/unit`` (pure, no processes), ``tests/dist`` (gloo
  worlds), ``tests/e2e`` (scripts in subprocesses, the browser) or ``tests/gpu`` (CUDA);
- besides test files, ``tests/`` holds only ``conftest.py`` files and ``tests/run.py``: helpers shared by
  several test files live in ``megatron/testing/`` (or are fixtures in a ``conftest.py``), so no file is a
  "test_*_common.py" and test file names are unique across the rungs;
- no test file imports another test file (nor a ``conftest.py``, nor ``tests.*``);
- a file in ``tests/unit`` starts no process: it does not use ``subprocess``, ``multiprocessing``,
  ``megatron.testing.distributed`` / ``run_distributed`` or a browser driver (``selenium``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
RUNGS = ("unit", "dist", "e2e", "gpu")
ALLOWED_HELPERS = {TESTS / "conftest.py", TESTS / "run.py"} | {TESTS / rung / "conftest.py" for rung in RUNGS}
# What a unit test may not touch: a module that starts processes (or a browser), or its entry points.
PROCESS_MODULES = ("subprocess", "multiprocessing", "torch.multiprocessing", "megatron.testing.distributed",
                   "selenium")
PROCESS_NAMES = {"run_distributed", "subprocess", "multiprocessing", "Popen"}


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _test_files() -> list[Path]:
    return [p for p in _python_files() if p.name.startswith("test_")]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """Every import statement anywhere in the file: ``(line, as written, the modules it may load)``;
    ``from a import b`` may load ``a`` and ``a.b`` (``b`` may be a submodule)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            subs = [f"{node.module}.{a.name}" if node.module else a.name for a in node.names]
            found.append((node.lineno, base, ([node.module] if node.module else []) + subs))
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_test_file_is_on_a_rung():
    misplaced = [_rel(p) for p in _test_files() if p.parent.parent != TESTS or p.parent.name not in RUNGS]
    assert misplaced == [], f"test files outside tests/{{{','.join(RUNGS)}}}: {misplaced}"


def test_tests_hold_no_helper_modules():
    helpers = [_rel(p) for p in _python_files() if not p.name.startswith("test_") and p not in ALLOWED_HELPERS]
    common = [_rel(p) for p in _test_files() if p.stem.endswith("_common")]
    assert helpers + common == [], (
        f"helper modules in tests/ (move shared helpers to megatron/testing/ or into a conftest.py fixture): "
        f"{helpers + common}")


def test_test_file_names_are_unique():
    seen: dict[str, list[str]] = {}
    for p in _test_files():
        seen.setdefault(p.name, []).append(_rel(p))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def _test_module_imports(path: Path, local: set[str]) -> list[str]:
    """The imports in ``path`` of a test module: ``tests.*``, a relative import, or a bare name that is a
    file of ``tests/`` (a rung folder is on ``sys.path`` when pytest imports its files)."""
    return [f"{_rel(path)}:{line} imports {written}" for line, written, modules in _imports(_tree(path))
            if written.startswith(".") or any(m.split(".")[0] in local | {"tests"} for m in modules)]


def test_no_test_module_imports_another():
    local = {p.stem for p in _python_files()}  # test_x, conftest, run
    offenders = [use for path in _test_files() for use in _test_module_imports(path, local)]
    assert offenders == [], "test modules importing test modules (use megatron/testing/ or a fixture):\n" + \
        "\n".join(offenders)


def _process_uses(path: Path) -> list[str]:
    tree = _tree(path)
    uses = [f"{_rel(path)}:{line} imports {written}" for line, written, modules in _imports(tree)
            if any(_within(m, PROCESS_MODULES) or m.rsplit(".", 1)[-1] in PROCESS_NAMES for m in modules)]
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in PROCESS_NAMES:
            uses.append(f"{_rel(path)}:{node.lineno} uses {name}")
    return uses


def test_unit_tests_start_no_process():
    offenders = [use for path in _test_files() if path.parent == TESTS / "unit" for use in _process_uses(path)]
    files = sorted({use.split(":")[0] for use in offenders})
    assert offenders == [], (
        f"tests/unit must start no process; move these to tests/dist (gloo worlds) or tests/e2e "
        f"(subprocesses, browser): {files}\n" + "\n".join(sorted(set(offenders))))


# ------------------------------------------------------------------------------ the checks themselves

@pytest.mark.parametrize("source, expected", [
    ("from tests.unit.test_a import helper\n", True),
    ("import tests.unit.test_a\n", True),
    ("from test_a import helper\n", True),
    ("from . import test_a\n", True),
    ("def f():\n    from conftest import x\n", True),
    ("from megatron.testing.generation import engine\nimport pytest\n", False),
], ids=["tests-package", "plain-import", "bare-name", "relative", "in-a-function", "clean"])
def test_the_import_scan_finds_test_module_imports(tmp_path, monkeypatch, source, expected):
    path = tmp_path / "test_x.py"
    path.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert bool(_test_module_imports(path, {"test_a", "conftest"})) == expected


@pytest.mark.parametrize("source, expected", [
    ("import subprocess\n", ["imports subprocess"]),
    ("from megatron.testing.distributed import run_distributed\n", ["imports megatron.testing.distributed"]),
    ("import torch.multiprocessing as mp\n", ["imports torch.multiprocessing"]),
    ("from megatron.testing import distributed\n", ["imports megatron.testing"]),
    ("import multiprocessing as mp\n", ["imports multiprocessing"]),
    ("from selenium import webdriver\n", ["imports selenium"]),
    ("def f(h):\n    return h.run_distributed(1)\n", ["uses run_distributed"]),
    ("import os\nimport torch\n", []),
], ids=["subprocess", "run_distributed", "torch-mp", "distributed-module", "multiprocessing", "selenium", "attribute",
        "clean"])
def test_the_process_scan_finds_process_starters(tmp_path, source, expected, monkeypatch):
    path = tmp_path / "test_x.py"
    path.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = _process_uses(path)
    assert all(any(e in use for use in found) for e in expected) and bool(found) == bool(expected), found
